"""The AlpacaEval runner's parts on their own: instruction sources, selection and shards, names,
the checkpoint file, the progress line, and the hub path against a fake hub on 127.0.0.1."""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from proxy.alpaca_eval.checkpoint import CHECKPOINT_NAME, Checkpoint, ItemRecord, read_checkpoint
from proxy.alpaca_eval.dataset import (
    HUB_SOURCE,
    Instruction,
    Shard,
    instructions_digest,
    load_from_hub,
    parse_shard,
    read_instruction_file,
    select,
)
from proxy.alpaca_eval.identity import config_fingerprint, generator_name
from proxy.alpaca_eval.progress import ProgressBar, format_duration
from proxy.config import ConfigError, parse_upstream
from proxy.presets import build_config, load_config, load_preset

# Strings alpaca_eval must get back unchanged: whitespace at both ends, CRLF, tabs, non-ASCII.
ODD = ["  leading and trailing spaces  ", "line one\r\nline two\n", "tab\there", "naïve café — 東京 🙂",
       'quotes " and \\ backslash', ""]


def rows(n: int) -> list[dict[str, str]]:
    return [{"instruction": f"instruction {i}", "dataset": f"set{i % 3}", "output": "ref", "generator": "gpt4"}
            for i in range(n)]


# ---------------------------------------------------------------- instruction files


def test_json_and_jsonl_give_the_same_strings_byte_for_byte(tmp_path: Path) -> None:
    data = [{"instruction": s, "dataset": "odd", "output": "x", "generator": "g"} for s in ODD]
    (tmp_path / "a.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(d) for d in data) + "\n\n", encoding="utf-8")
    for name in ("a.json", "b.jsonl"):
        items = read_instruction_file(tmp_path / name)
        assert [it.instruction for it in items] == ODD
        assert [it.instruction.encode() for it in items] == [s.encode() for s in ODD]
        assert {it.dataset for it in items} == {"odd"}


def test_bad_instruction_files_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "missing.json").write_text(json.dumps([{"instruction": "a"}, {"dataset": "b"}]))
    with pytest.raises(ConfigError, match=r"item 1: instruction: Field required"):
        read_instruction_file(tmp_path / "missing.json")
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a"}\n{oops\n')
    with pytest.raises(ConfigError, match="line 2: not valid JSON"):
        read_instruction_file(tmp_path / "bad.jsonl")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ConfigError, match="no instructions"):
        read_instruction_file(tmp_path / "empty.json")
    (tmp_path / "surrogate.json").write_text('[{"instruction": "bad \\ud800 half"}]')
    with pytest.raises(ConfigError, match="lone surrogate"):
        read_instruction_file(tmp_path / "surrogate.json")
    with pytest.raises(ConfigError, match="not found"):
        read_instruction_file(tmp_path / "nope.json")


# ---------------------------------------------------------------- selection and shards


def test_shards_are_contiguous_stable_and_tile_the_limited_dataset() -> None:
    items = [Instruction(instruction=f"i{k}") for k in range(10)]
    shards = [select(items, "src", limit=8, shard=Shard(i, 3)) for i in (1, 2, 3)]
    assert [(s.start, s.stop) for s in shards] == [(0, 2), (2, 5), (5, 8)]
    assert [it.instruction for s in shards for it in s.items] == [f"i{k}" for k in range(8)]
    assert all(s.total == 8 for s in shards)
    assert shards[1].digest == instructions_digest(["i2", "i3", "i4"])
    assert select(items, "src", shard=Shard(2, 3)).indices == range(3, 6)
    assert len(select(items, "src", limit=50)) == 10
    # more shards than items: some are empty, and together they still tile
    tiny = [select(items[:2], "src", shard=Shard(i, 4)) for i in (1, 2, 3, 4)]
    assert [(s.start, s.stop) for s in tiny] == [(0, 0), (0, 1), (1, 1), (1, 2)]


def test_digest_has_no_separator_ambiguity() -> None:
    assert instructions_digest(["ab", "c"]) != instructions_digest(["a", "bc"])
    assert instructions_digest([]) == hashlib.sha256().hexdigest()


@pytest.mark.parametrize("text", ["0/3", "4/3", "1/0", "x", "1-3", ""])
def test_bad_shards_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="--shard"):
        parse_shard(text)


def test_shard_parsing() -> None:
    assert parse_shard(" 2 / 5 ") == Shard(2, 5)
    assert str(parse_shard("5/5")) == "5/5"
    with pytest.raises(ConfigError, match="--limit"):
        select([Instruction(instruction="a")], "src", limit=0)


# ---------------------------------------------------------------- generator names


def test_paper_presets_give_one_generator_name_each_naming_model_pair_and_wkl() -> None:
    pair = "zephyr-7b-beta-vs-mistral-7b-sft-beta"
    want = {
        "paper-base": "gpt-3.5-turbo-instruct_unguided_base-w1k1linf",
        "paper-bon4": f"gpt-3.5-turbo-instruct_{pair}_bon4-w1k4linf",
        "paper-bon8": f"gpt-3.5-turbo-instruct_{pair}_bon8-w1k8linf",
        "paper-bon16": f"gpt-3.5-turbo-instruct_{pair}_bon16-w1k16linf",
        "paper-cbs-w2k2l30": f"gpt-3.5-turbo-instruct_{pair}_cbs-w2k2l30",
        "paper-cbs-w4k4l30": f"gpt-3.5-turbo-instruct_{pair}_cbs-w4k4l30",
    }
    assert {name: generator_name(load_config(name)) for name in want} == want
    assert len({config_fingerprint(load_config(name)) for name in want}) == len(want)
    # an --on-too-long policy other than fail is named (it changes those items' answers), not fingerprinted
    cbs = load_config("paper-cbs-w2k2l30")
    assert generator_name(cbs, on_too_long="fail") == want["paper-cbs-w2k2l30"]
    assert generator_name(cbs, on_too_long="unguided") == f"{want['paper-cbs-w2k2l30']}_too-long-unguided"
    assert generator_name(cbs, on_too_long="truncate-left").endswith("_cbs-w2k2l30_too-long-truncate-left")


def test_expo_and_unconfigured_guides_are_named() -> None:
    cfg = load_config("paper-bon4")
    assert cfg.scorer is not None
    expo = cfg.model_copy(update={"scorer": cfg.scorer.model_copy(update={"expo_alpha": 0.5})})
    assert generator_name(expo) == "gpt-3.5-turbo-instruct_zephyr-7b-beta-expo0.5-vs-mistral-7b-sft-beta_bon4-w1k4linf"
    assert config_fingerprint(expo) != config_fingerprint(cfg)
    tuned = cfg.scorer.tuned.model_copy(update={"adapter": "runs/tune/smollm2-film-dpo/"})
    adapted = cfg.model_copy(update={"scorer": cfg.scorer.model_copy(update={"tuned": tuned})})
    assert generator_name(adapted) == ("gpt-3.5-turbo-instruct_zephyr-7b-beta+smollm2-film-dpo-vs-mistral-7b-sft-beta"
                                       "_bon4-w1k4linf")
    bare = cfg.model_copy(update={"scorer": None})
    assert generator_name(bare, scorer_label="my-scorer") == "gpt-3.5-turbo-instruct_my-scorer_bon4-w1k4linf"


def test_fingerprint_follows_what_shapes_answers_only() -> None:
    base = load_config("paper-cbs-w2k2l30")
    moved = base.model_copy(update={"upstream": base.upstream.model_copy(
        update={"base_url": "http://127.0.0.1:9/v1", "max_concurrency": 64, "timeout_s": 5.0})})
    assert config_fingerprint(moved) == config_fingerprint(base)
    assert config_fingerprint(load_config("paper-cbs-w2k2l30", seed=1)) != config_fingerprint(base)
    assert config_fingerprint(load_config("paper-cbs-w2k2l30", l=20)) != config_fingerprint(base)
    chat = base.model_copy(update={"upstream": parse_upstream(load_preset("upstream", "vllm-chat"))})
    prefix = chat.model_copy(update={"upstream": chat.upstream.model_copy(update={"continuation": "prefix"})})
    assert len({config_fingerprint(c) for c in (base, chat, prefix)}) == 3
    # Checkpoints made before the start was an option drew K first chunks: they resume as
    # `narrow_start`, and the paper's W*K start (now the default) is another search.
    assert config_fingerprint(load_config("paper-cbs-w2k2l30", narrow_start=True)) == "39f91c44cc2c839d"
    assert config_fingerprint(base) != "39f91c44cc2c839d"
    bon = load_config("paper-cbs-w2k2l30", w=1, k=4, l=None)
    assert config_fingerprint(bon) == config_fingerprint(load_config("paper-cbs-w2k2l30", w=1, k=4, l=None,
                                                                     narrow_start=True))  # same search


def test_a_remote_pair_may_move_engines_but_not_weights() -> None:
    base = load_config("paper-cbs-w2k2l30")
    remote = build_config({"upstream": "gpt-3.5-turbo-instruct", "scorer": "zephyr-7b-beta-vllm",
                           "search": "cbs-w2k2l30"})
    scorer = remote.scorer
    assert scorer is not None and scorer.tuned.engine is not None
    moved_engine = scorer.tuned.engine.model_copy(update={"base_url": ["http://10.0.0.7:8001/v1"], "timeout_s": 5.0})
    moved = remote.model_copy(update={"scorer": scorer.model_copy(update={
        "tuned": scorer.tuned.model_copy(update={"engine": moved_engine})})})
    renamed = remote.model_copy(update={"scorer": scorer.model_copy(update={
        "tuned": scorer.tuned.model_copy(update={"engine": moved_engine.model_copy(update={"model": "zephyr-lora"})})})})
    assert config_fingerprint(moved) == config_fingerprint(remote)
    assert len({config_fingerprint(c) for c in (base, remote, renamed)}) == 3
    assert generator_name(remote) == generator_name(base).replace("gpt-3.5-turbo-instruct", remote.upstream.model)


# ---------------------------------------------------------------- checkpoint


def ok(index: int, output: str = "out") -> ItemRecord:
    return ItemRecord(index=index, instruction=f"instruction {index}", dataset="d", status="ok", output=output)


def failed(index: int) -> ItemRecord:
    return ItemRecord(index=index, instruction=f"instruction {index}", dataset="d", status="failed", error="E: x")


def test_checkpoint_appends_whole_lines_and_resumes(tmp_path: Path) -> None:
    with Checkpoint.open(tmp_path, fingerprint="f1", generator="g") as ck:
        ck.append(ok(3))
        ck.append(failed(1))
    state = read_checkpoint(tmp_path)
    assert state.header is not None and state.header.fingerprint == "f1"
    assert list(state.done) == [3] and list(state.failed) == [1] and state.lines == 3
    with Checkpoint.open(tmp_path, fingerprint="f1", generator="g") as ck:
        ck.append(ok(1, "second try"))
        ck.append(ok(3, "a duplicate"))  # cannot happen in a run; if it did, the first answer wins
        assert ck.state.done[1].output == "second try" and not ck.state.failed
    state = read_checkpoint(tmp_path)
    assert {i: r.output for i, r in state.done.items()} == {3: "out", 1: "second try"}
    assert state.duplicates == 1
    lines = (tmp_path / CHECKPOINT_NAME).read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 6 and all(json.loads(x) for x in lines[:-1])


def test_torn_last_line_is_cut_and_the_item_redone(tmp_path: Path) -> None:
    with Checkpoint.open(tmp_path, fingerprint="f", generator="g") as ck:
        ck.append(ok(0))
    path = tmp_path / CHECKPOINT_NAME
    whole = path.read_bytes()
    path.write_bytes(whole + ok(1).model_dump_json().encode()[:40])  # killed in the middle of a write
    with Checkpoint.open(tmp_path, fingerprint="f", generator="g") as ck:
        assert list(ck.state.done) == [0]
        assert path.read_bytes() == whole
        ck.append(ok(1))
    assert list(read_checkpoint(tmp_path).done) == [0, 1]


def test_checkpoint_refuses_damage_other_configs_and_a_second_writer(tmp_path: Path) -> None:
    with Checkpoint.open(tmp_path, fingerprint="f", generator="gen-a") as ck:
        ck.append(ok(0))
        with pytest.raises(ConfigError, match="another `w2s alpaca-eval` run"):
            Checkpoint.open(tmp_path, fingerprint="f", generator="gen-a")
    with pytest.raises(ConfigError, match=r"another configuration \(gen-a"):
        Checkpoint.open(tmp_path, fingerprint="other", generator="gen-b")
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(path.read_bytes() + b"not json\n" + ok(2).model_dump_json().encode() + b"\n")
    with pytest.raises(ConfigError, match="line 3 is not a checkpoint record"):
        Checkpoint.open(tmp_path, fingerprint="f", generator="gen-a")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / CHECKPOINT_NAME).write_text(ok(0).model_dump_json() + "\n")
    with pytest.raises(ConfigError, match="first line must be the header"):
        Checkpoint.open(tmp_path / "x", fingerprint="f", generator="g")


# ---------------------------------------------------------------- progress


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_progress_line_counts_money_rate_and_eta() -> None:
    clock, out = Clock(), io.StringIO()
    bar = ProgressBar(10, done=2, cost_usd=0.5, stream=out, tty=False, width=10, log_interval_s=5.0, clock=clock)
    bar.draw(force=True)
    clock.t += 5.0
    bar.update(ok=True, spent_usd=0.75)   # 1 item in 5 s; 7 left -> ETA 35 s
    bar.update(ok=False)                  # within the log interval: not printed
    clock.t += 5.0
    bar.update(ok=True, spent_usd=1.0)    # 3 items in 10 s; 5 left -> 16.7 s
    bar.close()                           # always prints the final state
    assert out.getvalue().splitlines() == [
        "alpaca-eval [##--------] 2/10  20% | failed 0 | $0.5000 | 0.00 it/s | elapsed 0s | ETA --",
        "alpaca-eval [###-------] 3/10  30% | failed 0 | $0.7500 | 0.20 it/s | elapsed 5s | ETA 35s",
        "alpaca-eval [####------] 4/10  40% | failed 1 | $1.0000 | 0.30 it/s | elapsed 10s | ETA 17s",
        "alpaca-eval [####------] 4/10  40% | failed 1 | $1.0000 | 0.30 it/s | elapsed 10s | ETA 17s",
    ]
    assert [format_duration(s) for s in (None, 0, 59.6, 61, 3725)] == ["--", "0s", "1m00s", "1m01s", "1h02m05s"]


def test_progress_redraws_in_place_on_a_terminal() -> None:
    clock, out = Clock(), io.StringIO()
    bar = ProgressBar(2, stream=out, tty=True, width=4, clock=clock)
    clock.t += 1.0
    bar.update(ok=True)
    clock.t += 1.0
    bar.update(ok=True)
    bar.close()
    text = out.getvalue()
    assert text.count("\r\x1b[2K") == 3 and text.endswith("2/2 100% | failed 0 | $0.0000 | 1.00 it/s | "
                                                          "elapsed 2s | ETA 0s\n")


# ---------------------------------------------------------------- the hub path


class FakeHub:
    """Just enough of the hub's resolve endpoint for huggingface_hub.hf_hub_download."""

    def __init__(self, body: bytes | None) -> None:
        self.body = body
        self.paths: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.paths.append(f"{request.method} {request.path}")
        if self.body is None:
            return web.json_response({"error": "Entry not found"}, status=404)
        headers = {"ETag": f'"{hashlib.sha1(self.body).hexdigest()}"', "X-Repo-Commit": "c" * 40,
                   "Content-Length": str(len(self.body))}
        return web.Response(status=200, headers=headers, body=None if request.method == "HEAD" else self.body)


async def serve(hub: FakeHub) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hub.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_hub_download_reads_the_datasets_own_file(tmp_path: Path) -> None:
    hub = FakeHub(json.dumps(rows(3)).encode())
    async for url in serve(hub):
        items = await asyncio.to_thread(load_from_hub, endpoint=url, cache_dir=tmp_path, try_datasets=False)
    assert [it.instruction for it in items] == ["instruction 0", "instruction 1", "instruction 2"]
    assert hub.paths[-1] == "GET /datasets/tatsu-lab/alpaca_eval/resolve/main/alpaca_eval_gpt4_baseline.json"
    assert HUB_SOURCE == "hf:tatsu-lab/alpaca_eval/alpaca_eval_gpt4_baseline/eval"


async def test_unreachable_hub_tells_the_user_to_pass_a_file(tmp_path: Path) -> None:
    hub = FakeHub(None)
    async for url in serve(hub):
        with pytest.raises(ConfigError, match=r"Pass --instructions FILE") as err:
            await asyncio.to_thread(load_from_hub, endpoint=url, cache_dir=tmp_path, try_datasets=False)
    assert "tatsu-lab/alpaca_eval (alpaca_eval_gpt4_baseline, split eval)" in str(err.value)
    assert hub.paths  # it did ask
