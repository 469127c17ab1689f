"""The table of search settings is the one place a setting is declared: a row added there, and
nowhere else, appears in the config, the server request's `w2s` field and its overrides, the CLI
flags and the identity of an AlpacaEval run. The row is added to a copy of the code, run in a
fresh interpreter, so nothing is patched behind the derivations' backs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from proxy.alpaca_eval.identity import config_fingerprint
from proxy.config import SETTINGS, AppConfig, SearchConfig
from proxy.protocol.requests import W2SOptions
from proxy.search_flags import add_search_flags

ROOT = Path(__file__).resolve().parents[1]
ROW = '''    Setting("beam_bonus", float, 0.0, "a bonus added to every beam's score", {"ge": 0.0}),
'''
PROBE = r'''
import argparse, json
from proxy.alpaca_eval.identity import config_fingerprint
from proxy.config import AppConfig, SearchConfig, ServerCaps
from proxy.protocol.requests import CompletionRequest
from proxy.search_flags import add_search_flags, search_overrides
from proxy.serving.guidance import GuidanceModes

parser = argparse.ArgumentParser()
add_search_flags(parser)
request = CompletionRequest.model_validate_json('{"model": "m", "prompt": "x", "w2s": {"beam_bonus": 0.25}}')
sent = request.w2s.model_dump(include=request.w2s.model_fields_set)
modes = GuidanceModes("m", SearchConfig(), {}, ServerCaps(), guided=True)
def app(**search):
    return AppConfig.model_validate({"upstream": {"model": "m"}, "search": search})
try:
    SearchConfig(beam_bonus=-1)
    refused = False
except ValueError:
    refused = True
print(json.dumps({
    "default": SearchConfig().beam_bonus,
    "refused_negative": refused,
    "request": sent,
    "served": modes.resolve("m", w2s=sent).search.beam_bonus,
    "cli": search_overrides(parser.parse_args(["--beam-bonus", "0.5"])),
    "fingerprint": config_fingerprint(app()),
    "fingerprints_differ": config_fingerprint(app(beam_bonus=0.5)) != config_fingerprint(app()),
}))
'''


def test_a_row_added_to_the_table_reaches_every_derivation(tmp_path: Path) -> None:
    for package in ("proxy", "scorers"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "adapters"))
    table = tmp_path / "proxy" / "config" / "search.py"
    source = table.read_text()
    anchor = "SETTINGS: tuple[Setting, ...] = (\n"
    assert anchor in source
    table.write_text(source.replace(anchor, anchor + ROW, 1))
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout)
    # at its default the new setting leaves the identity of runs made before it as it was
    before = config_fingerprint(AppConfig.model_validate({"upstream": {"model": "m"}}))
    assert seen == {"default": 0.0, "refused_negative": True, "request": {"beam_bonus": 0.25}, "served": 0.25,
                    "cli": {"beam_bonus": 0.5}, "fingerprint": before, "fingerprints_differ": True}


def test_every_row_is_in_each_derivation_here() -> None:
    """The shipped table: every setting is a config field; each per-request one the OpenAI fields
    do not carry is a `w2s` field; each flagged one a CLI flag."""
    import argparse

    parser = argparse.ArgumentParser()
    add_search_flags(parser)
    flags = {a.dest for a in parser._actions}
    for s in SETTINGS:
        assert s.name in SearchConfig.model_fields
        assert (s.name in W2SOptions.model_fields) == (s.per_request and s.openai_field is None)
        assert (s.name in flags) == s.cli
