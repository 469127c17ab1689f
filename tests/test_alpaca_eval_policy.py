"""AlpacaEval's permanent-failure policy: an instruction that cannot fit the guide is a permanent
failure (never "retry"), or, by --on-too-long, answered unguided or cut from the left, marked;
the judge command names the reference outputs where a local file holds them."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.alpaca_eval.checkpoint import read_checkpoint
from proxy.alpaca_eval.cli import _report_failures
from proxy.alpaca_eval.dataset import HUB_SOURCE, Instruction, reference_outputs_file, select
from proxy.alpaca_eval.outputs import OUTPUTS_NAME, SUMMARY_NAME, RunSummary
from proxy.alpaca_eval.policy import is_permanent, is_too_long
from proxy.alpaca_eval.runner import run_alpaca_eval
from proxy.budget import BudgetExhausted
from proxy.client import GuidedClient
from proxy.config import AppConfig, ConfigError, SearchConfig
from proxy.prompts import PromptError
from proxy.search.plan import SettingTooSmall
from proxy.testing.toy_server import ToyCompletionsServer
from proxy.upstreams.errors import UpstreamError
from scorers.base import ScorerContextError, ScorerPrompt
from tests.conftest import upstream_config
from tests.doubles import FnScorer

CONTEXT = 80
"""The guide's context, in characters of the instruction (one 'token' each)."""


@dataclass
class RoomScorer(FnScorer):
    """A guide whose context holds CONTEXT characters of instruction and answer."""

    name: str = "room"

    def response_room(self, prompt: ScorerPrompt) -> int | None:
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        return CONTEXT - len(text)


LONG = "The beginning is cut. " * 6 + "Keep this end: say hello."  # 157 characters


def items() -> list[Instruction]:
    texts = ["Say one thing.", LONG, "Say another thing.", "x" * 300, "Say a third thing."]
    return [Instruction(instruction=t, dataset="d") for t in texts]


def config(server: ToyCompletionsServer, **search: Any) -> AppConfig:
    return AppConfig(upstream=upstream_config(server, max_attempts=2),
                     search=SearchConfig(**{"w": 2, "k": 2, "l": 4, "max_new_tokens": 10, "seed": 3, **search}))


async def run(cfg: AppConfig, out: Path, policy: str = "fail", rows: list[Instruction] | None = None) -> RunSummary:
    async with GuidedClient(cfg, scorer=RoomScorer(lambda t, f: float(len(t)))) as client:
        return await run_alpaca_eval(client, select(rows or items(), "test"), out, concurrency=2, progress=False,
                                     on_too_long=policy)  # type: ignore[arg-type]


def prompts_sent(server: ToyCompletionsServer) -> list[str]:
    return [p for r in server.requests for p in (r["prompt"] if isinstance(r["prompt"], list) else [r["prompt"]])]


def test_failures_are_classified_permanent_or_retryable() -> None:
    assert is_permanent(ScorerContextError("prompt", "too long")) and is_too_long(ScorerContextError("max_tokens", ""))
    assert is_permanent(SettingTooSmall("max_cost_usd", "too small")) and is_permanent(ConfigError("bad"))
    assert is_permanent(PromptError("messages", "no user turn"))
    for retry in (UpstreamError("http", status=503), UpstreamError("http", status=400), UpstreamError("timeout"),
                  BudgetExhausted("spent"), TimeoutError("deadline"), RuntimeError("scorer loading")):
        assert not is_permanent(retry) and not is_too_long(retry)


async def test_fail_policy_is_a_permanent_failure_never_retry(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    async with ToyCompletionsServer() as server:
        summary = await run(config(server), tmp_path)
    assert (summary.complete, summary.done, summary.failed, summary.permanent_failures) == (False, 3, 2, 2)
    assert [(f.index, f.permanent) for f in summary.failures] == [(1, True), (3, True)]
    assert all("--on-too-long fail" in (f.error or "") and "ScorerContextError" in (f.error or "")
               for f in summary.failures)
    # refused before anything was paid: neither long instruction reached the upstream
    assert not any(LONG in p or "x" * 300 in p for p in prompts_sent(server))
    # no model_outputs.json (a file that exists is complete); the answered items, named for what they are
    assert not (tmp_path / OUTPUTS_NAME).exists() and summary.alpaca_eval_command is None
    partial = json.loads(Path(summary.partial_outputs or "").read_text())
    assert Path(summary.partial_outputs or "").name == "model_outputs.partial.json"
    assert [r["instruction"] for r in partial] == [items()[i].instruction for i in (0, 2, 4)]
    assert {r["generator"] for r in partial} == {"toy-instruct_room_cbs-w2k2l4"}
    assert RunSummary.model_validate_json((tmp_path / SUMMARY_NAME).read_text()) == summary
    assert all(r.permanent for r in read_checkpoint(tmp_path).failed.values())

    _report_failures(summary)
    err = capsys.readouterr().err
    assert "2 of 5 items failed permanently" in err and "items 1, 3" in err
    assert "--on-too-long fail" in err and "--on-too-long unguided" in err and "truncate-left" in err
    assert "run the same command again" not in err and "model_outputs.partial.json" in err


async def test_unguided_policy_finishes_a_failed_directory_and_marks_the_items(tmp_path: Path) -> None:
    async with ToyCompletionsServer() as server:
        cfg = config(server)
        await run(cfg, tmp_path)
        before = len(prompts_sent(server))
        summary = await run(cfg, tmp_path, "unguided")
        sent = prompts_sent(server)[before:]
        with pytest.raises(ConfigError, match="answered by --on-too-long unguided"):
            await run(cfg, tmp_path, "truncate-left")  # the name would lie about those items
        with pytest.raises(ConfigError, match="answered by --on-too-long unguided"):
            await run(cfg, tmp_path, "fail")
    assert (summary.complete, summary.resumed, summary.this_run.attempted) == (True, 3, 2)
    assert summary.fallbacks == {"unguided": [1, 3]} and summary.on_too_long == "unguided"
    # plain sampling (one candidate a step), on the whole instruction
    starts = [f"Instruction: {t}\nOutput:" for t in (LONG, "x" * 300)]
    assert all(p.startswith(tuple(starts)) for p in sent) and set(starts) <= set(sent)
    rows = json.loads((tmp_path / OUTPUTS_NAME).read_text())
    assert [r["instruction"] for r in rows] == [it.instruction for it in items()]
    assert {r["generator"] for r in rows} == {"toy-instruct_room_cbs-w2k2l4_too-long-unguided"}
    assert not (tmp_path / "model_outputs.partial.json").exists()
    done = read_checkpoint(tmp_path).done
    assert {i: r.fallback for i, r in done.items()} == {0: None, 1: "unguided", 2: None, 3: "unguided", 4: None}
    assert done[1].score is None and done[1].steps >= 1  # not scored: the guide cannot read it


async def test_truncate_left_keeps_the_end_that_fits_the_guide(tmp_path: Path) -> None:
    async with ToyCompletionsServer() as server:
        summary = await run(config(server), tmp_path, "truncate-left")
        sent = prompts_sent(server)
    assert summary.complete and summary.fallbacks == {"truncate-left": [1, 3]}
    done = read_checkpoint(tmp_path).done
    keep = CONTEXT - 10 - 1  # room for max_new_tokens and the end of text
    tail = LONG[-keep:]
    assert done[1].cut_chars == len(LONG) - keep and done[3].cut_chars == 300 - keep
    assert tail.endswith("Keep this end: say hello.")
    assert f"Instruction: {tail}\nOutput:" in sent and not any(LONG in p for p in sent)
    rows = json.loads((tmp_path / OUTPUTS_NAME).read_text())
    assert rows[1]["instruction"] == LONG  # alpaca_eval joins on the original instruction
    assert rows[1]["generator"].endswith("_too-long-truncate-left")
    assert done[1].score is not None  # guided: the guide scored the cut prompt's answers


async def test_truncate_left_that_cannot_fit_is_a_permanent_failure(tmp_path: Path) -> None:
    async with ToyCompletionsServer() as server:
        summary = await run(config(server, max_new_tokens=CONTEXT), tmp_path, "truncate-left")
    assert summary.failed == summary.permanent_failures == 5
    assert all("--on-too-long truncate-left could not answer it" in (f.error or "") for f in summary.failures)
    assert summary.partial_outputs is None  # nothing answered


async def test_judge_command_names_the_reference_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with_refs = tmp_path / "alpaca_eval_gpt4_baseline.json"
    with_refs.write_text(json.dumps([{**it.model_dump(), "output": f"ref {i}", "generator": "gpt4_1106_preview"}
                                     for i, it in enumerate(items()[:1])]))
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps([items()[0].model_dump()]))
    assert reference_outputs_file(str(with_refs)) == with_refs.resolve()
    assert reference_outputs_file(str(bare)) is None and reference_outputs_file(str(tmp_path / "nope")) is None
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert reference_outputs_file(HUB_SOURCE) is None  # not cached: alpaca_eval's own default applies

    async with ToyCompletionsServer() as server:
        async with GuidedClient(config(server, w=1, k=1)) as client:
            rows = items()[:1]
            summary = await run_alpaca_eval(client, select(rows, str(with_refs)), tmp_path / "o", progress=False)
    assert summary.alpaca_eval_command == (
        f"alpaca_eval --model_outputs {tmp_path / 'o' / OUTPUTS_NAME} --annotators_config "
        f"weighted_alpaca_eval_gpt4_turbo --reference_outputs {with_refs.resolve()}")
