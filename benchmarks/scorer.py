"""Incremental vs full-recompute scoring on one recorded CBS run: tokens run and wall time.

    .venv/bin/python benchmarks/scorer.py                  # replay benchmarks/data/cbs_w4k4l30.json
    .venv/bin/python benchmarks/scorer.py --record         # record that run first (needs ../shared data)
    .venv/bin/python benchmarks/scorer.py --random-arch mistral-7b --device cuda --dtype bfloat16

The run is a real `proxy.search` CBS search (W=K=4, L=30, max_new_tokens=512) for a ~200-token
prompt, guided by a prompt-contrast pair on SmolLM2-135M-Instruct (the offline demo's model).
Its upstream serves 30-token (cl100k_base, the encoding of gpt-3.5-turbo-instruct) windows of
AlpacaEval's GPT-4 reference answers, so the text is natural and chunks are cut where a real API
cuts them, not where the scorer's tokenizer would. Recording keeps every score call: which texts,
in which step; the replay sends the same calls, a step's calls concurrently as the search does,
to a fresh incremental scorer and a fresh full-recompute scorer, and prints the tokens each model
ran, the minimum (the prompt once, then each candidate's new tokens), forward passes and wall
time, all measured in this one run. With --random-arch the same replay runs on a randomly
initialised pair of that architecture (throughput does not depend on the weights' values).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from pydantic import BaseModel, ConfigDict  # noqa: E402

from proxy.config import ModelSpec, SearchConfig  # noqa: E402
from proxy.cost import get_encoding  # noqa: E402
from proxy.search import search  # noqa: E402
from proxy.types import Continuation, Conversation, SampleResult, SamplingParams, Usage  # noqa: E402
from proxy.upstreams.base import Upstream  # noqa: E402
from scorers.base import Scorer, ScorerPrompt, ScoringSession, as_messages  # noqa: E402
from scorers.implicit import ImplicitRewardScorer  # noqa: E402
from scorers.loading import load_causal_lm, pick_device_dtype  # noqa: E402
from scorers.reading import ModelReading  # noqa: E402

DEFAULT_RECORDING = ROOT / "benchmarks" / "data" / "cbs_w4k4l30.json"
DEFAULT_MODEL_DIR = Path.home() / ".cache" / "w2s-proxy" / "smollm2-135m-instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALPACA = ROOT.parent / "shared" / "data" / "alpaca_eval" / "alpaca_eval_gpt4_baseline.json"
POSITIVE = "You are a cheerful assistant. Answer warmly, with enthusiasm and encouragement."
NEUTRAL = "You are an assistant."


class Node(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parent: int | None
    chunk: str
    finished: bool


class Call(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: int
    nodes: list[int]


class Recording(BaseModel):
    """A CBS run as the scorer saw it: the prompt, and every score call in order."""

    model_config = ConfigDict(extra="forbid")
    instruction: str
    positive_system: str
    negative_system: str
    search: SearchConfig
    upstream: str
    nodes: list[Node]
    calls: list[Call]

    def text(self, i: int) -> str:
        parts = []
        node: int | None = i
        while node is not None:
            parts.append(self.nodes[node].chunk)
            node = self.nodes[node].parent
        return "".join(reversed(parts))


# ---------------------------------------------------------------- recording


class CorpusUpstream(Upstream):
    """Continuations cut from real answers: sample i of a request is the next `max_tokens`
    cl100k tokens of a seeded random long answer, from the beam's own token offset on."""

    name = "corpus"

    def __init__(self, answers: list[str]) -> None:
        self.enc = get_encoding("cl100k_base")
        self.answers = [self.enc.encode(a) for a in answers]

    async def sample(self, conversation: Conversation, partial: str, params: SamplingParams) -> SampleResult:
        offset = len(self.enc.encode(partial))
        rng = random.Random(params.seed)
        outs = []
        for _ in range(params.n):
            toks = rng.choice(self.answers)
            window = [toks[(offset + j) % len(toks)] for j in range(params.max_tokens)]
            outs.append(Continuation(self.enc.decode(window), False, params.max_tokens, "length"))
        usage = Usage(offset, params.n * params.max_tokens)
        self.record(usage)
        return SampleResult(outs, usage, 1)


@dataclass
class _Log:
    """Every score call of the recorded search, with the step it belongs to."""

    step: int = 1
    calls: list[tuple[int, list[str], list[bool]]] = field(default_factory=list)


class _RecordingSession(ScoringSession):
    def __init__(self, inner: ScoringSession, log: _Log) -> None:
        self.inner, self.log = inner, log

    async def score(self, texts: Sequence[str], finished: Sequence[bool]) -> list[float]:
        self.log.calls.append((self.log.step, list(texts), list(finished)))
        return await self.inner.score(texts, finished)

    def close(self) -> None:
        self.inner.close()


class _RecordingScorer(Scorer):
    def __init__(self, inner: Scorer, log: _Log) -> None:
        self.inner, self.log = inner, log

    def open(self, prompt: ScorerPrompt) -> ScoringSession:
        return _RecordingSession(self.inner.open(prompt), self.log)


def pick_instruction(data: list[dict], tokenizer, target: int) -> str:
    """The first instruction whose rendered prompt is within 10 tokens of `target`."""
    for row in data:
        msgs = [{"role": "system", "content": POSITIVE}, {"role": "user", "content": row["instruction"]}]
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        if abs(len(tokenizer(text)["input_ids"]) - target) <= 10:
            return row["instruction"]
    raise SystemExit(f"no instruction renders to about {target} tokens")


async def record(args: argparse.Namespace, loaded) -> Recording:
    model, tok = loaded
    data = json.loads(ALPACA.read_text())
    instruction = pick_instruction(data, tok, args.prompt_tokens)
    enc = get_encoding("cl100k_base")
    answers = [r["output"] for r in data if len(enc.encode(r["output"])) >= 600]
    cfg = SearchConfig(w=4, k=4, l=30, max_new_tokens=512, seed=0)
    scorer = contrast_scorer(model, tok, incremental=True, batch_size=args.batch_size)
    log = _Log()

    def on_step(trace, survivors) -> None:  # type: ignore[no-untyped-def]
        log.step = trace.step + 1

    result = await search(Conversation.instruction(instruction), CorpusUpstream(answers), _RecordingScorer(scorer, log),
                          cfg, on_step=on_step)
    await scorer.aclose()
    nodes: list[Node] = []
    index: dict[str, int] = {"": -1}
    calls: list[Call] = []
    for step, texts, finished in log.calls:
        ids = []
        for text, fin in zip(texts, finished):
            if text not in index:
                parent = max((t for t in index if text.startswith(t) and t != text), key=len)
                nodes.append(Node(parent=None if index[parent] < 0 else index[parent], chunk=text[len(parent):],
                                  finished=fin))
                index[text] = len(nodes) - 1
            ids.append(index[text])
        calls.append(Call(step=step, nodes=ids))
    print(f"recorded {len(calls)} score calls in {result.steps[-1].step} steps, answer of {result.tokens} tokens",
          file=sys.stderr)
    return Recording(instruction=instruction, positive_system=POSITIVE, negative_system=NEUTRAL, search=cfg,
                     upstream="30-token cl100k_base windows of AlpacaEval gpt4_baseline answers", nodes=nodes,
                     calls=calls)


# ---------------------------------------------------------------- replay


def contrast_scorer(model, tok, *, incremental: bool, batch_size: int, system=(POSITIVE, NEUTRAL)) -> ImplicitRewardScorer:
    spec = ModelSpec(path="bench")
    return ImplicitRewardScorer.from_loaded(
        (model, tok, spec.model_copy(update={"system_prompt": system[0]})),
        (model, tok, spec.model_copy(update={"system_prompt": system[1]})),
        incremental=incremental, batch_size=batch_size, max_batch_tokens=batch_size * 1024,
        max_cached_tokens=None,
    )


@dataclass
class Replay:
    wall_s: float
    tokens: tuple[int, int]
    forwards: int | None
    scores: list[float]


async def replay(rec: Recording, scorers: dict[str, ImplicitRewardScorer]) -> dict[str, Replay]:
    """Send the recorded calls to every scorer, a step's calls concurrently as the search does.

    Steps alternate between the scorers (step 1 to each, then step 2 to each, ...), so load from
    other processes on a shared machine falls on all of them alike.
    """
    steps: dict[int, list[Call]] = {}
    for call in rec.calls:
        steps.setdefault(call.step, []).append(call)
    sessions = {name: s.open(rec.instruction) for name, s in scorers.items()}
    walls = dict.fromkeys(scorers, 0.0)
    scores: dict[str, list[float]] = {name: [] for name in scorers}
    for step in sorted(steps):
        for name, session in sessions.items():
            t0 = time.perf_counter()
            outs = await asyncio.gather(*(
                session.score([rec.text(i) for i in c.nodes], [rec.nodes[i].finished for i in c.nodes])
                for c in steps[step]))
            walls[name] += time.perf_counter() - t0
            scores[name].extend(x for o in outs for x in o)
    for session in sessions.values():
        session.close()
    return {
        name: Replay(walls[name], s.tokens_run, s.forward_calls if s.incremental else None, scores[name])
        for name, s in scorers.items()
    }


@dataclass
class Concurrent:
    wall_s: float
    tokens: tuple[int, int]
    scores: list[list[float]]
    """Per search, its candidates' scores in call order."""


def calls_by_step(rec: Recording, max_step: int | None = None) -> dict[int, list[Call]]:
    """The recording's score calls grouped by search step (those after `max_step` left out)."""
    steps: dict[int, list[Call]] = {}
    for call in rec.calls:
        if max_step is None or call.step <= max_step:
            steps.setdefault(call.step, []).append(call)
    return steps


async def score_recording(rec: Recording, scorer: Scorer, prompt: str, steps: dict[int, list[Call]]) -> list[float]:
    """One search's worth of the recording in one session of `prompt`, as the search sends it (its
    steps in order, a step's calls at once): the candidates' scores in call order."""
    out: list[float] = []
    with scorer.open(prompt) as session:
        for step in sorted(steps):
            outs = await asyncio.gather(*(
                session.score([rec.text(n) for n in c.nodes], [rec.nodes[n].finished for n in c.nodes])
                for c in steps[step]))
            out.extend(x for o in outs for x in o)
    return out


async def concurrent_replay(rec: Recording, scorer: ImplicitRewardScorer, searches: int, *,
                            distinct_prompts: bool = True, max_step: int | None = None) -> Concurrent:
    """`searches` replays of the recording at once on one scorer, each in its own session, as that
    many concurrent CBS searches would send them (a search's steps in order, a step's calls at
    once). With `distinct_prompts` search i's instruction starts with "(i) ", so no two share a
    prompt. `max_step` cuts the recording after that step."""
    steps = calls_by_step(rec, max_step)
    before = scorer.tokens_run
    t0 = time.perf_counter()
    scores = await asyncio.gather(*(
        score_recording(rec, scorer, f"({i}) {rec.instruction}" if distinct_prompts else rec.instruction, steps)
        for i in range(searches)))
    wall = time.perf_counter() - t0
    after = scorer.tokens_run
    return Concurrent(wall, (after[0] - before[0], after[1] - before[1]), list(scores))


def minimum_tokens(rec: Recording, sides: Sequence[ModelReading]) -> list[int]:
    """Per side (a scorer's tuned and untuned reading): the prompt once, then each distinct
    candidate's tokens beyond its parent's.

    (Identical samples of one beam are one candidate: the search keeps one, and so does the cache.)"""
    distinct = sorted({i for call in rec.calls for i in call.nodes})  # nodes are distinct texts
    out = []
    for side in sides:
        prompt = side.encode_prompt(side.render(as_messages(rec.instruction)))
        lengths = {i: len(side.encode_response(prompt, rec.text(i), False).ids) for i in distinct}
        total = len(prompt.ids)
        for i in distinct:
            parent = rec.nodes[i].parent
            total += lengths[i] - (len(prompt.ids) if parent is None else lengths[parent])
        out.append(total)
    return out


def random_pair(arch: str, tokenizer, device: torch.device, dtype: torch.dtype, *, vocab_size: int | None = None,
                num_hidden_layers: int | None = None, attn_implementation: str | None = None):
    """Two randomly initialised models of a named architecture (for throughput only).

    `vocab_size` (default: the tokenizer's) and `num_hidden_layers` override the architecture's;
    `attn_implementation` "eager" gives batch-independent numbers for exactness checks."""
    from transformers import MistralConfig, MistralForCausalLM

    sizes = {
        "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8),
        "mistral-small-test": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2),
    }[arch]
    if num_hidden_layers is not None:
        sizes = sizes | {"num_hidden_layers": num_hidden_layers}
    cfg = MistralConfig(vocab_size=vocab_size or len(tokenizer), max_position_embeddings=32768, sliding_window=4096,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **sizes)
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    models = []
    default = torch.get_default_dtype()
    for seed in (1, 2):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            with device:
                models.append(MistralForCausalLM(cfg).eval())
        finally:
            torch.set_default_dtype(default)
    return models


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows[1:])])


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recording", type=Path, default=DEFAULT_RECORDING)
    ap.add_argument("--record", action="store_true", help="record the run first (needs the AlpacaEval file in ../shared)")
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--gguf-file", default=DEFAULT_GGUF)
    ap.add_argument("--random-arch", choices=["mistral-7b", "mistral-small-test"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--skip-full", action="store_true", help="only the incremental scorer")
    args = ap.parse_args()

    device, dtype = pick_device_dtype(args.device, args.dtype)
    spec = ModelSpec(path=str(args.model_dir), gguf_file=args.gguf_file)
    t0 = time.perf_counter()
    model, tok = load_causal_lm(spec, device, dtype)
    print(f"loaded {spec.path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.record:
        rec = await record(args, (model, tok))
        args.recording.parent.mkdir(parents=True, exist_ok=True)
        args.recording.write_text(rec.model_dump_json(indent=1))
    rec = Recording.model_validate_json(args.recording.read_text())
    name = "SmolLM2-135M-Instruct, prompt contrast (one model, two system prompts)"
    if args.random_arch:
        tuned, untuned = random_pair(args.random_arch, tok, device, dtype)
        spec_t = ModelSpec(path=f"{args.random_arch}-a", system_prompt=rec.positive_system)
        spec_u = ModelSpec(path=f"{args.random_arch}-b", system_prompt=rec.negative_system)

        def make(incremental: bool) -> ImplicitRewardScorer:
            return ImplicitRewardScorer.from_loaded((tuned, tok, spec_t), (untuned, tok, spec_u), incremental=incremental,
                                                    batch_size=args.batch_size, max_batch_tokens=args.batch_size * 1024,
                                                    max_cached_tokens=None)
        name = f"random-weight {args.random_arch} pair (two models)"
    else:
        def make(incremental: bool) -> ImplicitRewardScorer:
            return contrast_scorer(model, tok, incremental=incremental, batch_size=args.batch_size,
                                   system=(rec.positive_system, rec.negative_system))

    n_scored = sum(len(c.nodes) for c in rec.calls)
    steps = len({c.step for c in rec.calls})
    scorers = {"incremental": make(True)}
    if not args.skip_full:
        scorers["full recompute"] = make(False)
    minimum = minimum_tokens(rec, (scorers["incremental"].tuned, scorers["incremental"].untuned))
    with scorers["incremental"].open(rec.instruction) as probe:
        prompt_tokens = [len(sm.encode_prompt(t).ids) for sm, t in
                         zip((scorers["incremental"].tuned, scorers["incremental"].untuned), probe.prompt_texts)]
    print(f"replaying {len(rec.calls)} calls ({n_scored} candidates, {steps} steps) on {device} {dtype}", file=sys.stderr)
    results = await replay(rec, scorers)
    for s in scorers.values():
        await s.aclose()
    inc, full = results["incremental"], results.get("full recompute")

    print(f"\nRecorded CBS run: W={rec.search.w} K={rec.search.k} L={rec.search.l}, max_new_tokens="
          f"{rec.search.max_new_tokens}, {steps} steps, {n_scored} candidates scored, prompt of {prompt_tokens[0]} / "
          f"{prompt_tokens[1]} tokens (tuned / untuned); upstream: {rec.upstream}")
    print(f"Scorer: {name}; {device} {str(dtype).removeprefix('torch.')}, batch_size {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}\n")
    rows = [["scorer", "tuned tokens", "untuned tokens", "x minimum", "forward passes", "wall s", "scored tok/s"]]
    rows.append(["minimum (prompt once + new tokens)", str(minimum[0]), str(minimum[1]), "1.00", "", "", ""])
    for label, r in (("incremental", inc), ("full recompute", full)):
        if r is None:
            continue
        ratio = max(r.tokens[0] / minimum[0], r.tokens[1] / minimum[1])
        rows.append([label, str(r.tokens[0]), str(r.tokens[1]), f"{ratio:.3f}", str(r.forwards or "-"),
                     f"{r.wall_s:.1f}", f"{sum(r.tokens) / r.wall_s:.0f}"])
    if full is not None:
        rows.append(["full / incremental", f"{full.tokens[0] / inc.tokens[0]:.1f}x", f"{full.tokens[1] / inc.tokens[1]:.1f}x",
                     "", "", f"{full.wall_s / inc.wall_s:.1f}x", ""])
    print(table(rows))
    if full is not None:
        diff = max(abs(a - b) for a, b in zip(inc.scores, full.scores))
        print(f"\nmax |incremental - full| score difference over {len(inc.scores)} candidates: {diff:.2e}")
    print("scored tok/s = tokens run through the models (both sides) per second of wall time.")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
