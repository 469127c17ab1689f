"""The AlpacaEval runner end to end, in process: the loopback OpenAI server as upstream (real
openai client), the tiny scorer models for guidance, outputs checked against independent
recomputations (billing recorded by the server, scores recomputed by a fresh session)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from aiohttp import web

from proxy.alpaca_eval.checkpoint import CHECKPOINT_NAME, read_checkpoint
from proxy.alpaca_eval.dataset import Instruction, Selection, Shard, read_instruction_file, select
from proxy.alpaca_eval.merge import merge_shards
from proxy.alpaca_eval.outputs import OUTPUTS_NAME, SUMMARY_NAME, RunSummary, _umask
from proxy.alpaca_eval.runner import run_alpaca_eval
from proxy.cli import build_parser
from proxy.client import GuidedClient
from proxy.config import AppConfig, ConfigError, ScorerConfig, SearchConfig
from proxy.cost import count_tokens
from proxy.local.backend import Choice, CompletionParams
from proxy.testing.toy_server import ToyCompletionsServer
from tests.conftest import upstream_config

ODD = ["  leading and trailing spaces  ", "line one\r\nline two\n", "tab\there", "naïve café — 東京 🙂",
       'quotes " and \\ backslash', ""]
PRICES = {"prompt": 1.5, "completion": 2.0}


class BillingLoopback(ToyCompletionsServer):
    """Keeps the usage block of every answer, as the API would bill it."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.billed: list[dict[str, int]] = []

    def answer(self, batch: list[CompletionParams], results: list[tuple[list[Choice], int]]) -> web.Response:
        response = super().answer(batch, results)
        assert isinstance(response.body, bytes)
        self.billed.append(json.loads(response.body)["usage"])
        return response


def instructions(n: int) -> list[Instruction]:
    texts = ODD + [f"Instruction number {i}: say something." for i in range(n - len(ODD))]
    return [Instruction(instruction=t, dataset=f"set{i % 4}") for i, t in enumerate(texts[:n])]


def app_config(server: ToyCompletionsServer, scorer: ScorerConfig | None = None, **search: Any) -> AppConfig:
    search = {"max_new_tokens": 10, "seed": 5, **search}
    return AppConfig(upstream=upstream_config(server, prices=PRICES, max_attempts=2),
                     scorer=scorer, search=SearchConfig(**search))


async def run(cfg: AppConfig, selection: Selection, out: Path, concurrency: int = 4) -> RunSummary:
    async with GuidedClient(cfg) as client:
        return await run_alpaca_eval(client, selection, out, concurrency=concurrency, progress=False)


def outputs(directory: Path, name: str = OUTPUTS_NAME) -> list[dict[str, str]]:
    return json.loads((directory / name).read_text(encoding="utf-8"))


async def test_thirty_instructions_guided_by_the_tiny_scorer(tmp_path: Path, tiny_scorer_config: ScorerConfig) -> None:
    items = instructions(30)
    async with BillingLoopback() as server:
        cfg = app_config(server, tiny_scorer_config, w=2, k=2, l=4, max_new_tokens=12)
        selection = select(items, "test")
        async with GuidedClient(cfg) as client:
            summary = await run_alpaca_eval(client, selection, tmp_path, concurrency=4, progress=False)
            records = read_checkpoint(tmp_path).done
            # Each stored score belongs to its stored answer: a fresh session recomputes it.
            rescored = {}
            for i, rec in records.items():
                session = client.scorer.open([{"role": "user", "content": items[i].instruction}])
                rescored[i] = (await session.score([rec.output], [rec.finished]))[0]
                session.close()

    name = "toy-instruct_llama-tuned-vs-llama-untuned_cbs-w2k2l4"
    rows = outputs(tmp_path)
    assert [r["instruction"] for r in rows] == [it.instruction for it in items]
    assert [r["dataset"] for r in rows] == [it.dataset for it in items]
    assert {r["generator"] for r in rows} == {name}
    assert [r["output"] for r in rows] == [records[i].output.lstrip() for i in range(30)]  # as the chat endpoint shows it

    frame = pd.read_json(tmp_path / OUTPUTS_NAME, dtype=False)
    assert list(frame.columns) == ["instruction", "output", "generator", "dataset"]
    assert frame["instruction"].tolist() == [it.instruction for it in items]

    # Every item was started exactly once: one first-step request per instruction.
    template = "Instruction: {}\nOutput:"
    sent = [p for r in server.requests for p in (r["prompt"] if isinstance(r["prompt"], list) else [r["prompt"]])]
    first = [p for p in sent if p in {template.format(it.instruction) for it in items}]
    assert sorted(first) == sorted(template.format(it.instruction) for it in items)
    # What the server billed is what the summary reports.
    prompt_tokens = sum(b["prompt_tokens"] for b in server.billed)
    completion_tokens = sum(b["completion_tokens"] for b in server.billed)
    assert prompt_tokens == sum(count_tokens(p) for p in sent)
    assert (summary.stats.prompt_tokens, summary.stats.completion_tokens) == (prompt_tokens, completion_tokens)
    assert summary.stats.upstream_calls == len(server.requests)
    assert summary.stats.cost_usd == pytest.approx((prompt_tokens * 1.5 + completion_tokens * 2.0) / 1e6, rel=1e-12)
    assert summary.this_run.billed_cost_usd == pytest.approx(summary.stats.cost_usd, rel=1e-12)
    for i, rec in records.items():
        assert rec.score == pytest.approx(rescored[i], abs=1e-4)
    assert summary.stats.mean_score == pytest.approx(math.fsum(rescored.values()) / 30, abs=1e-4)
    assert summary.stats.mean_steps == sum(r.steps for r in records.values()) / 30
    assert all(1 <= r.steps <= 3 and r.tokens <= 12 for r in records.values())
    assert (summary.complete, summary.items, summary.done, summary.failed, summary.resumed) == (True, 30, 30, 0, 0)
    assert summary.generator == name
    assert summary.alpaca_eval_command == (f"alpaca_eval --model_outputs {tmp_path / OUTPUTS_NAME} "
                                           "--annotators_config weighted_alpaca_eval_gpt4_turbo")
    assert RunSummary.model_validate_json((tmp_path / SUMMARY_NAME).read_text()) == summary


async def test_failed_item_is_recorded_retried_next_run_and_never_written_empty(tmp_path: Path) -> None:
    items = instructions(6)
    async with ToyCompletionsServer() as server:
        cfg = app_config(server)
        reference = await run(cfg, select(items, "test"), tmp_path / "ref")
        out = tmp_path / "run"
        first = await run(cfg, select(items, "test", limit=2), out, concurrency=1)
        assert first.complete and len(outputs(out)) == 2

        server.failures.extend([503, 503])  # both attempts of the next request: fails after retries
        n_before = len(server.requests)
        second = await run(cfg, select(items, "test"), out, concurrency=1)
        assert [r["prompt"] for r in server.requests[n_before:n_before + 2]] == \
            [f"Instruction: {items[2].instruction}\nOutput:"] * 2
        assert (second.complete, second.done, second.failed, second.resumed) == (False, 5, 1, 2)
        assert [f.index for f in second.failures] == [2]
        assert second.failures[0].error == "UpstreamError: the upstream answered HTTP 503"  # ours: no upstream text
        assert not (out / OUTPUTS_NAME).exists()  # the stale 2-row file is gone; no empty answer anywhere
        state = read_checkpoint(out)
        assert sorted(state.done) == [0, 1, 3, 4, 5] and list(state.failed) == [2]
        assert second.alpaca_eval_command is None

        third = await run(cfg, select(items, "test"), out, concurrency=1)
    assert (third.complete, third.resumed, third.this_run.attempted) == (True, 5, 1)
    assert outputs(out) == outputs(tmp_path / "ref") and reference.complete
    lines = [json.loads(x) for x in (out / CHECKPOINT_NAME).read_text().splitlines()[1:]]
    assert sorted(x["index"] for x in lines if x["status"] == "ok") == list(range(6))
    assert [x["index"] for x in lines if x["status"] == "failed"] == [2]


async def test_shards_merged_equal_one_unsharded_run(tmp_path: Path) -> None:
    items = instructions(10)
    (tmp_path / "in.jsonl").write_text("".join(it.model_dump_json() + "\n" for it in items), encoding="utf-8")
    async with ToyCompletionsServer() as server:
        cfg = app_config(server, temperature=1.0)
        whole = await run(cfg, select(items, "test"), tmp_path / "whole")
        parts = [await run(cfg, select(items, "test", shard=Shard(i, 3)), tmp_path / f"s{i}", concurrency=2)
                 for i in (1, 2, 3)]
        await run(  # a shard made with other settings, for the mixed-config refusal below
            app_config(server, temperature=1.0, seed=99), select(items, "test", shard=Shard(2, 3)),
            tmp_path / "other")
    assert [(p.selection.start, p.selection.stop) for p in parts] == [(0, 3), (3, 6), (6, 10)]
    shard_dirs = [tmp_path / f"s{i}" for i in (3, 1, 2)]  # any order
    # A shard's part is named for what it is: no shard directory holds a model_outputs.json.
    assert [sorted(p.name for p in d.glob("model_outputs*")) for d in shard_dirs] == [
        [f"model_outputs.shard-{i}-of-3.json"] for i in (3, 1, 2)]
    assert (tmp_path / "whole" / OUTPUTS_NAME).stat().st_mode & 0o777 == 0o666 & ~_umask()

    merged = merge_shards(shard_dirs, tmp_path / "merged", instructions=items)
    assert outputs(tmp_path / "merged") == outputs(tmp_path / "whole")
    assert [r["instruction"] for r in outputs(tmp_path / "merged")] == [it.instruction for it in items]
    assert merged.items == 10 and merged.generator == whole.generator
    assert merged.stats.prompt_tokens == whole.stats.prompt_tokens
    assert merged.stats.completion_tokens == whole.stats.completion_tokens
    assert merged.stats.cost_usd == pytest.approx(whole.stats.cost_usd, rel=1e-12)
    assert merged.stats.mean_steps == pytest.approx(whole.stats.mean_steps)
    assert merged.stats.mean_output_tokens == pytest.approx(whole.stats.mean_output_tokens)

    # the CLI front door: `w2s alpaca-eval merge`
    args = build_parser().parse_args(["alpaca-eval", "merge", "--output", str(tmp_path / "cli"),
                                      "--instructions", str(tmp_path / "in.jsonl"), *map(str, shard_dirs)])
    assert await args.func(args) == 0
    assert outputs(tmp_path / "cli") == outputs(tmp_path / "whole")

    s1, s2, s3 = (tmp_path / f"s{i}" for i in (1, 2, 3))
    with pytest.raises(ConfigError, match=r"items 3\.\.5 are missing"):
        merge_shards([s1, s3], tmp_path / "m1")
    with pytest.raises(ConfigError, match=r"items 6\.\.9 are missing"):
        merge_shards([s1, s2], tmp_path / "m2")
    with pytest.raises(ConfigError, match=r"items 3\.\.5 are doubled"):
        merge_shards([s1, s2, s2, s3], tmp_path / "m3")
    with pytest.raises(ConfigError, match="shards of different runs"):
        merge_shards([s1, tmp_path / "other", s3], tmp_path / "m4")
    with pytest.raises(ConfigError, match="is one of the shard directories"):
        merge_shards([s1, s2, s3], s1)
    with pytest.raises(ConfigError, match="differ from the dataset at item 4"):
        merge_shards([s1, s2, s3], tmp_path / "m5",
                     instructions=items[:4] + [Instruction(instruction="changed")] + items[5:])
    rows = outputs(s2, "model_outputs.shard-2-of-3.json")
    rows[0], rows[1] = rows[1], rows[0]
    (s2 / "model_outputs.shard-2-of-3.json").write_text(json.dumps(rows))
    with pytest.raises(ConfigError, match="not the ones its run answered"):
        merge_shards([s1, s2, s3], tmp_path / "m6")
    (s2 / "model_outputs.shard-2-of-3.json").write_text(json.dumps(rows[:2]))
    with pytest.raises(ConfigError, match="has 2 rows, its run answered 3"):
        merge_shards([s1, s2, s3], tmp_path / "m7")


async def test_resume_refuses_a_changed_dataset_or_config(tmp_path: Path) -> None:
    items = instructions(4)
    async with ToyCompletionsServer() as server:
        cfg = app_config(server)
        await run(cfg, select(items, "test"), tmp_path)
        changed = items[:1] + [Instruction(instruction="something else")] + items[2:]
        with pytest.raises(ConfigError, match="item 1 was answered for another instruction"):
            await run(cfg, select(changed, "test"), tmp_path)
        with pytest.raises(ConfigError, match="holds answers of another configuration"):
            await run(app_config(server, seed=6), select(items, "test"), tmp_path)
        # a longer --limit on the same directory only adds what is missing
        before = len(server.requests)
        more = await run(cfg, select(instructions(6), "test"), tmp_path)
    assert (more.resumed, more.this_run.attempted, len(server.requests) - before) == (4, 2, 2)


def test_instruction_file_round_trip_keeps_strings(tmp_path: Path) -> None:
    items = instructions(8)
    (tmp_path / "in.json").write_text(json.dumps([it.model_dump() for it in items], ensure_ascii=False))
    assert read_instruction_file(tmp_path / "in.json") == items


async def test_cli_exit_status_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    items = instructions(5)
    (tmp_path / "in.json").write_text(json.dumps([it.model_dump() for it in items], ensure_ascii=False))
    async with ToyCompletionsServer(failures=[400]) as server:  # a bad request is not retried
        (tmp_path / "c.yaml").write_text(json.dumps({
            "upstream": {"model": "toy-instruct", "base_url": server.base_url, "prices": PRICES},
            "search": {"max_new_tokens": 8, "seed": 2}}))
        argv = ["alpaca-eval", "--config", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "o"),
                "--instructions", str(tmp_path / "in.json"), "--concurrency", "1", "--no-progress", "--limit", "4"]
        args = build_parser().parse_args(argv)
        assert await args.func(args) == 1
        first = capsys.readouterr()
        failures = json.loads(first.out)["failures"]
        assert [f["index"] for f in failures] == [0]
        assert failures[0]["error"] == "UpstreamError: the upstream answered HTTP 400"  # ours: no upstream text
        assert "1 of 4 items failed; run the same command again" in first.err
        args = build_parser().parse_args(argv)
        assert await args.func(args) == 0
    second = capsys.readouterr()
    summary = json.loads(second.out)
    assert (summary["complete"], summary["resumed"], summary["items"]) == (True, 3, 4)
    assert f"judge with:\n  alpaca_eval --model_outputs {tmp_path / 'o' / OUTPUTS_NAME}" in second.err
    assert [r["instruction"] for r in outputs(tmp_path / "o")] == [it.instruction for it in items[:4]]
