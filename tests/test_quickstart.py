"""`w2s quickstart`: the demo's offline pair served as an OpenAI endpoint, no key and no hub."""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from proxy.config import AppConfig, OpenAICompletionsConfig, ScorerConfig, ModelSpec
from proxy.config.base import cache_dir
from proxy.demo.offline import BLACK_BOX, OfflinePair
from proxy.demo.quickstart import MODES, banner, quickstart_config
from proxy.film_reviews.guide_model import GGUF_NAME
from proxy.film_reviews.models import GEMMA_GGUF
from proxy.presets import server_modes

START_TIMEOUT_S = 240


def _pair() -> OfflinePair:
    smol = ModelSpec(path="/nowhere", gguf_file=GGUF_NAME)
    return OfflinePair(OpenAICompletionsConfig(model=BLACK_BOX, base_url="http://127.0.0.1:1/v1",
                                               prompt_template="{instruction}"),
                       ScorerConfig(tuned=smol, untuned=smol))


def test_the_config_serves_plain_sampling_and_small_searches_on_this_machine_only() -> None:
    cfg = quickstart_config(_pair(), port=0)
    assert isinstance(cfg, AppConfig)
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 0 and cfg.server.api_keys_env is None
    modes = server_modes(cfg.server)
    assert list(modes) == list(MODES) and "bon4" in modes
    assert all(m.w * m.k <= cfg.server.caps.max_w_times_k for m in modes.values())
    assert cfg.search.max_new_tokens == 32 and all(m.max_new_tokens == 32 for m in modes.values())


def test_the_banner_names_the_url_the_models_and_runnable_examples() -> None:
    url = "http://127.0.0.1:8000/v1"
    text = banner(url, [BLACK_BOX, f"{BLACK_BOX}+bon4"])
    assert f"serving {url}" in text and f"{BLACK_BOX}, {BLACK_BOX}+bon4" in text
    assert f"curl -s {url}/completions" in text
    start = ".venv/bin/python - <<'EOF'\n"
    script = text[text.index(start) + len(start):text.rindex("\nEOF")]
    compile(script, "<banner>", "exec")  # the SDK example pastes as it is printed


def test_your_adapter_is_the_tuned_side(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`--adapter DIR` (what `w2s tune --preferences` writes) replaces the guide's own on its tuned
    side; a directory that is not an adapter is refused before any model is fetched."""
    import proxy.film_reviews.guide_model as guide_model
    from proxy.demo.offline import guide_scorer_config
    from proxy.film_reviews.guides import shipped_adapter

    monkeypatch.setattr(guide_model, "fetch_demo_model", lambda: ModelSpec(path="/nowhere", gguf_file=GGUF_NAME))
    mine = str(tmp_path / "polite-guide")
    cfg = guide_scorer_config("tuned", mine)
    assert cfg.tuned.adapter == mine and cfg.untuned.adapter is None
    assert guide_scorer_config("tuned").tuned.adapter == str(shipped_adapter())
    assert "your adapter /a/b" in banner("http://127.0.0.1:8000/v1", [BLACK_BOX], "tuned", "/a/b")
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "quickstart", "--port", "0", "--adapter", mine],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not a LoRA adapter directory" in done.stderr


def _demo_models_cached() -> bool:
    root = cache_dir()
    return (root / "gemma-3-270m" / GEMMA_GGUF).is_file() and (root / "smollm2-135m-instruct" / GGUF_NAME).is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _demo_models_cached(), reason=f"the demo models are not in {cache_dir()} "
                    "(`make demo` fetches them; this test does not download)")
def test_quickstart_serves_guided_and_plain_requests_offline(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}  # no key of any kind
    env["HF_HUB_OFFLINE"] = "1"  # and no hub
    stderr = (tmp_path / "stderr").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "quickstart", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=stderr, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        base_url = None
        while base_url is None:
            assert proc.poll() is None, (tmp_path / "stderr").read_text()[-2000:]
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no 'serving' line within {START_TIMEOUT_S} s")
            found = re.match(r"w2s quickstart: serving (http://127\.0\.0\.1:\d+/v1) ", line)
            base_url = found.group(1) if found else None
        client = openai.OpenAI(base_url=base_url, api_key="anything", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [BLACK_BOX, *(f"{BLACK_BOX}+{m}" for m in MODES)]
        opening = "The film opens in a small fishing town on the coast of Maine, where the harbour master"
        guided = client.completions.create(model=f"{BLACK_BOX}+bon4", prompt=opening, max_tokens=8, seed=1)
        assert guided.choices[0].text.strip()
        summary = guided.model_extra["w2s"]
        assert summary["mode"] == "bon4" and isinstance(summary["score"], float) and summary["tokens"] <= 8
        plain = client.chat.completions.create(model=BLACK_BOX, messages=[{"role": "user", "content": opening}],
                                               max_tokens=8, seed=1)
        assert plain.choices[0].message.content.strip()
        assert plain.model_extra["w2s"]["mode"] == "base" and plain.model_extra["w2s"]["score"] is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
