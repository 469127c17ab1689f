"""benchmarks/quality.py: statistics, openings, the plot, and its core run end to end on toys."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.quality import (  # noqa: E402
    Results,
    Runner,
    Settings,
    check_guides,
    check_settings,
    format_report,
    summarize,
)
from benchmarks.billing import PRICE_LISTS, bill, tree_requests  # noqa: E402
from benchmarks.quality_plot import plot_dollars, plot_report  # noqa: E402
from proxy.cost import get_encoding  # noqa: E402
from proxy.config import ModelSpec, ScorerConfig, SearchConfig  # noqa: E402
from proxy.film_reviews.guides import (  # noqa: E402
    GuideUnavailable,
    Method,
    contrast_guide,
    guide_config,
    headline_methods,
    tuned_guide,
)
from proxy.film_reviews.openings import TEST_OPENINGS  # noqa: E402
from proxy.film_reviews.stats import estimate, mean, paired, standard_error  # noqa: E402
from proxy.testing.toy_server import ToyCompletionsServer  # noqa: E402
from proxy.search import search  # noqa: E402
from proxy.types import Conversation  # noqa: E402
from proxy.upstreams.openai_completions import OpenAICompletionsUpstream  # noqa: E402
from scorers.registry import load_scorer  # noqa: E402

# ---------------------------------------------------------------- statistics


def test_mean_and_standard_error_by_hand() -> None:
    xs = [1.0, 2.0, 4.0, 5.0]
    assert mean(xs) == 3.0
    # deviations -2, -1, 1, 2: sum of squares 10, sample variance 10/3, se = sqrt(10/3 / 4)
    assert standard_error(xs) == pytest.approx(math.sqrt(10 / 12))
    assert math.isnan(standard_error([1.0]))


def test_estimate_clusters_seeds_of_an_opening() -> None:
    values = {(0, 0): 1.0, (0, 1): 3.0, (1, 0): 5.0, (1, 1): 5.0, (2, 0): 0.0}
    e = estimate(values)
    # cluster means 2, 5, 0 -> mean 7/3; deviations -1/3, 8/3, -7/3: squares sum 114/9
    assert e.mean == pytest.approx(7 / 3)
    assert e.se == pytest.approx(math.sqrt(114 / 9 / 2 / 3))
    assert (e.clusters, e.n) == (3, 5)


def test_paired_difference_uses_common_keys() -> None:
    a = {(0, 0): 0.5, (1, 0): 0.2, (2, 0): 0.9, (3, 0): 1.0}
    b = {(0, 0): 0.1, (1, 0): 0.4, (2, 0): 0.3}
    d = paired(a, b)  # differences 0.4, -0.2, 0.6 on openings 0..2
    assert d.mean == pytest.approx(0.8 / 3)
    m = 0.8 / 3
    assert d.se == pytest.approx(math.sqrt(((0.4 - m) ** 2 + (-0.2 - m) ** 2 + (0.6 - m) ** 2) / 2 / 3))
    assert d.n == 3 and d.z == pytest.approx(d.mean / d.se)


# ---------------------------------------------------------------- openings, guides, methods


def test_openings_are_many_distinct_neutral_and_unfinished() -> None:
    from proxy.film_reviews.judges import positivity

    assert len(TEST_OPENINGS) >= 120
    assert len(set(TEST_OPENINGS)) == len(TEST_OPENINGS)
    for o in TEST_OPENINGS:
        assert 8 <= len(o.split()) <= 25, o
        assert o == o.strip() and o[-1] not in ".!?", o
        assert abs(positivity(o)) < 0.3, o  # neutral: the continuation carries the opinion
    assert abs(mean([positivity(o) for o in TEST_OPENINGS])) < 0.05


def test_openings_are_held_out_from_training() -> None:
    try:
        from proxy.film_reviews.train_openings import TRAIN_OPENINGS
    except ImportError:
        pytest.skip("no training openings in this checkout")
    assert not set(TEST_OPENINGS) & set(TRAIN_OPENINGS)


def test_guides_render_raw_prefixes_and_refuse_a_missing_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    smol = ModelSpec(path="/models/smol", gguf_file="smol.gguf", chat_template=None)
    c = contrast_guide(smol)
    assert c.tuned.chat_template == c.untuned.chat_template == "raw"
    assert c.tuned.system_prompt != c.untuned.system_prompt and c.tuned.path == c.untuned.path
    t = tuned_guide(smol, "/adapters/dpo")
    assert t.tuned.adapter == "/adapters/dpo" and t.untuned.adapter is None
    assert t.tuned.system_prompt is None and t.untuned.system_prompt is None

    import scorers.tuning as tuning

    def missing() -> Path:
        raise FileNotFoundError("no shipped adapter")

    monkeypatch.setattr(tuning, "shipped_adapter_path", missing)
    with pytest.raises(GuideUnavailable, match="adapter"):
        guide_config("tuned", smol)


def test_method_names_and_search_configs() -> None:
    names = [m.name for m in headline_methods((8, 16))]
    assert names == ["base", "bon4", "bon16", "cbs-w2k2l8", "cbs-w4k4l8", "cbs-w2k2l16", "cbs-w4k4l16"]
    cfg = Method(4, 4, 8).search_config(max_new_tokens=32, temperature=1.0, seed=2)
    assert (cfg.w, cfg.k, cfg.l, cfg.seed, cfg.prefer_finished, cfg.narrow_start) == (4, 4, 8, 2, False, False)
    assert Method(1, 16).breadth == 16 and not Method(1, 16).searched
    for name in ("base", "bon32", "cbs-w4k4l8", "cbs-w4k4l8-h16", "cbs-w4k4l8-s16.4.2", "cbs-w2k2l4-h8-s8.2"):
        assert Method.parse(name).name == name
    v = Method.parse("cbs-w4k4l8-h16-s16.4.2")
    cfg = v.search_config(max_new_tokens=48, temperature=1.0, seed=0)
    assert (cfg.horizon, cfg.sample_schedule, v.variant) == (16, [16, 4, 2], True)
    assert not Method.parse("cbs-w4k4l8").variant
    with pytest.raises(ValueError, match="not a method name"):
        Method.parse("cbs-w4k4")


# ---------------------------------------------------------------- the plot


def _synthetic_report() -> dict:
    def est(m: float, se: float = 0.05) -> dict:
        return {"mean": m, "se": se, "clusters": 10, "n": 30}

    methods = {}
    for n, tok in ((1, 40), (2, 70), (4, 130), (8, 250), (16, 500)):
        name = "base" if n == 1 else f"bon{n}"
        methods[name] = {"w": 1, "k": n, "l": None, "breadth": n, "upstream_tokens": tok, "completion_tokens": tok - 20,
                         "guide_score": est(n / 4), "vader": est(0.1 + 0.02 * n), "textblob": est(0.05 + 0.01 * n),
                         "vader_vs_base": est(0.02 * n), "textblob_vs_base": est(0.01 * n)}
    for l in (8, 16):
        for w, k, tok in ((2, 2, 160), (4, 4, 600)):
            methods[f"cbs-w{w}k{k}l{l}"] = {"w": w, "k": k, "l": l, "breadth": w * k, "upstream_tokens": tok + l,
                                            "completion_tokens": tok,
                                            "guide_score": est(w), "vader": est(0.2 + 0.01 * w), "textblob": est(0.1),
                                            "vader_vs_base": est(0.1), "textblob_vs_base": est(0.05)}
    guide = {"pairs": 30, "openings": 10, "seeds": 3, "methods": methods, "cbs_vs_bon": {}}
    return {"settings": {"max_new_tokens": 32}, "judges": ["vader", "textblob"],
            "guides": {"contrast": guide, "tuned": guide}}


def test_plot_is_written(tmp_path: Path) -> None:
    path = plot_report(_synthetic_report(), tmp_path / "quality.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# ---------------------------------------------------------------- the run, end to end on toys


def test_settings_file_refuses_another_run(tmp_path: Path) -> None:
    check_settings(tmp_path / "out", {"max_new_tokens": 8})
    check_settings(tmp_path / "out", {"max_new_tokens": 8})
    with pytest.raises(SystemExit, match="other settings"):
        check_settings(tmp_path / "out", {"max_new_tokens": 9})
    # a directory from before the start was recorded holds narrow-start searches: refused
    old = tmp_path / "old"
    check_settings(old, {"max_new_tokens": 16, "temperature": 1.0})
    with pytest.raises(SystemExit, match="cbs_start"):
        check_settings(old, Settings().identity())


def test_guides_file_refuses_a_changed_guide_but_not_a_newer_config_schema(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = ScorerConfig.model_validate({"tuned": {"path": "/m", "system_prompt": "Good:"},
                                       "untuned": {"path": "/m", "system_prompt": "Bad:"}})
    check_guides(out, {"contrast": cfg})
    # As recorded before ModelSpec had `engine`: the field is absent, not null. Still the same guide.
    recorded = json.loads((out / "guides.json").read_text())
    for side in ("tuned", "untuned"):
        del recorded["contrast"][side]["engine"]
    (out / "guides.json").write_text(json.dumps(recorded))
    check_guides(out, {"contrast": cfg})
    changed = cfg.model_copy(update={"tuned": cfg.tuned.model_copy(update={"system_prompt": "Great:"})})
    with pytest.raises(SystemExit, match="guide 'contrast' changed"):
        check_guides(out, {"contrast": changed})


async def test_core_run_resumes_and_reports(tmp_path: Path, tiny_scorer_config: ScorerConfig) -> None:
    """The loopback toy upstream and a tiny random pair stand in for Gemma and SmolLM2."""
    from tests.conftest import upstream_config

    settings = Settings(max_new_tokens=8, temperature=1.0, chunk_lengths=(4,), openings=3, seeds=2)
    openings = ["The film opens in a small town", "The cast includes", "The plot follows a cat"]
    scorer = load_scorer(tiny_scorer_config)
    guides = {"contrast": scorer, "tuned": scorer}
    async with ToyCompletionsServer(eos_prob=0.05) as server:
        cfg = upstream_config(server, prompt_template="{instruction}")
        async with OpenAICompletionsUpstream(cfg) as upstream:
            results = Results(tmp_path / "results.jsonl")
            runner = Runner(results, settings, upstream, guides, openings, concurrency=8, log=lambda s: None)
            await runner.run()
            lines = (tmp_path / "results.jsonl").read_text().splitlines()
            # per (opening, seed): samples, 2 guides' scores, 2 guides x 2 CBS shapes
            assert len(lines) == 3 * 2 * (1 + 2 + 4)

            # Resumable: a fresh runner over the same file has nothing left to do.
            again = Runner(Results(tmp_path / "results.jsonl"), settings, upstream, guides, openings)
            assert all(not again.jobs(seed) for seed in range(settings.seeds))

            # Best-of-N read off the 16 samples is what a real best-of-N search returns.
            rec = results.samples[(1, 0)]
            for n in (1, 4):
                r = await search(Conversation.instruction(openings[1]), upstream, scorer,
                                 SearchConfig(w=1, k=n, max_new_tokens=8, seed=0, temperature=1.0))
                scores = results.scores[("contrast", 1, 0)][:n]
                best = max(range(n), key=lambda j: (scores[j], -j))
                assert r.text == rec["samples"][best]["text"]
                assert r.score == pytest.approx(scores[best], abs=1e-4)

            # A larger --bon-max extends the samples (the first 16 come back identical, checked by
            # the runner) and a variant runs beside the grid.
            more = Settings(**{**settings.__dict__, "bon_max": 32, "extra_methods": ("cbs-w2k2l4-h4",)})
            bigger = Results(tmp_path / "results.jsonl")
            await Runner(bigger, more, upstream, guides, openings, concurrency=8, log=lambda s: None).run()
            assert all(len(r["samples"]) == 32 and len(bigger.scores[("tuned", *k)]) == 32
                       for k, r in bigger.samples.items())
            assert bigger.samples[(1, 0)]["samples"][:16] == rec["samples"]
            assert sum(1 for key in bigger.searches if key[1] == "cbs-w2k2l4-h4") == 3 * 2 * 2
    await scorer.aclose()

    report = summarize(Results(tmp_path / "results.jsonl"), settings, ["contrast", "tuned"])
    g = report["guides"]["contrast"]
    assert (g["pairs"], g["openings"], g["seeds"]) == (6, 3, 2)
    ms = g["methods"]
    assert set(ms) == {"base", "bon2", "bon4", "bon8", "bon16", "cbs-w2k2l4", "cbs-w4k4l4"}
    wide = summarize(Results(tmp_path / "results.jsonl"), Settings(**{**settings.__dict__, "bon_max": 32,
                                                                      "extra_methods": ("cbs-w2k2l4-h4",)}), ["tuned"])
    assert {"bon32", "cbs-w2k2l4-h4"} <= set(wide["guides"]["tuned"]["methods"])
    assert ms["base"]["vader_vs_base"]["mean"] == 0.0
    assert ms["bon16"]["guide_score"]["mean"] >= ms["bon4"]["guide_score"]["mean"] >= ms["base"]["guide_score"]["mean"]
    assert ms["bon16"]["upstream_tokens"] > ms["bon4"]["upstream_tokens"] > ms["base"]["upstream_tokens"]
    assert set(g["cbs_vs_bon"]) == {"cbs-w2k2l4 - bon4", "cbs-w4k4l4 - bon16"}
    text = format_report(report, settings.chunk_lengths)
    assert "| cbs-w4k4l4 |" in text and "VADER - base" in text
    json.dumps(report)  # plain data
    assert plot_report(report, tmp_path / "q.png").stat().st_size > 10_000

    # In dollars: each method's requests replayed from the record. With the toy's own tokenizer, a
    # price list that bills every prompt once a request (n taken) bills what the upstream counted.
    enc = get_encoding("cl100k_base")
    priced = summarize(Results(tmp_path / "results.jsonl"), settings, ["contrast"], instructions=openings,
                       tokenize=enc.encode_ordinary, system_tokens=(0, 40))
    results = Results(tmp_path / "results.jsonl")
    flat = PRICE_LISTS["together (flat)"]
    for (guide, name, i, seed), rec in results.searches.items():
        b = bill(openings[i], tree_requests(rec["tree"]), flat, enc.encode_ordinary)
        assert (b.prompt, b.completion) == (rec["prompt_tokens"], rec["completion_tokens"])
    d = priced["guides"]["contrast"]["dollars"]
    assert list(d) == ["0", "40"] and d["0"]["system_tokens"] == 0 and 35 <= d["40"]["system_tokens"] <= 40
    for block in d.values():
        for pl in block["price_lists"].values():
            ms = pl["methods"]
            assert ms["bon16"]["dollars"] > ms["bon4"]["dollars"] > ms["base"]["dollars"] > 0
            assert pl["frontier"]["vader"][0] == "base"
            assert set(pl["cbs_vs_bon"]) == {"cbs-w2k2l4", "cbs-w4k4l4"}
    # Behind a shared system prompt DeepSeek's units make CBS's re-sent prefixes hits.
    deepseek = d["40"]["price_lists"]["deepseek"]["methods"]
    assert deepseek["cbs-w4k4l4"]["cached_share"] > 0.5 and deepseek["bon16"]["cached_share"] == 0.0
    text = format_report(priced, settings.chunk_lengths)
    assert "best at each budget by vader" in text and "price list: deepseek" in text
    json.dumps(priced)
    assert plot_dollars(priced, tmp_path / "d.png").stat().st_size > 10_000


# ---------------------------------------------------------------- serve-local's batched sampling


async def test_local_lm_batches_requests_and_seeds_each_row(tiny_model_dirs) -> None:  # type: ignore[no-untyped-def]
    """Requests in flight together share one padded generate, and each seeded sample is what the
    request gets alone: sample j of an n=16 request is sample j of the same request with n=4."""
    import asyncio

    from proxy.protocol.model_requests import CompletionParams
    from proxy.local.causal_lm import LocalCausalLM

    lm = LocalCausalLM.load(ModelSpec(path=str(tiny_model_dirs.llama_tuned)), "cpu", "float32")
    try:
        reqs = [CompletionParams(model="t", prompt="Once upon a time the", n=16, max_tokens=8, temperature=1.0, seed=3),
                CompletionParams(model="t", prompt="Hello", n=2, max_tokens=5, temperature=0.0),
                CompletionParams(model="t", prompt="The plot follows a cat and", n=3, max_tokens=6, temperature=0.8,
                                 top_p=0.9, seed=1)]
        together = await asyncio.gather(*(lm.complete(r) for r in reqs))
        assert lm.batches == 1
        alone = [await lm.complete(r) for r in reqs]
        assert together == alone
        fewer = await lm.complete(CompletionParams(**{**reqs[0].__dict__, "n": 4}))
        assert fewer[0] == together[0][0][:4]
        assert together[1][0][0] == together[1][0][1]  # greedy rows agree
        assert all(c.tokens <= 5 for c in together[1][0]) and all(c.tokens <= 6 for c in together[2][0])
    finally:
        lm.close()
