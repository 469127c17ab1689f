"""Where the instructions come from, and which of them one run answers.

alpaca_eval joins model outputs to its reference outputs on the exact instruction string and
keeps the dataset's order, so instructions are never stripped, normalised or reordered here:
an item is its position in the dataset plus the strings exactly as loaded.

Sources: a JSON list or a JSONL file the user names (the dataset's own fields: `instruction`,
`dataset`, and any others, which are ignored), or the Hugging Face dataset
`tatsu-lab/alpaca_eval` (config `alpaca_eval_gpt4_baseline`, split `eval`), fetched with
`huggingface_hub` (the exact JSON file the dataset serves) or, when that fails and the
`datasets` library is installed, with `datasets.load_dataset`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from proxy.config import ConfigError, format_validation_error

log = logging.getLogger("w2s.alpaca_eval")

HUB_REPO = "tatsu-lab/alpaca_eval"
HUB_CONFIG = "alpaca_eval_gpt4_baseline"
HUB_SPLIT = "eval"
HUB_FILE = f"{HUB_CONFIG}.json"
HUB_SOURCE = f"hf:{HUB_REPO}/{HUB_CONFIG}/{HUB_SPLIT}"


class Instruction(BaseModel):
    """One dataset row as the runner needs it; the reference `output`/`generator` are dropped."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    instruction: str
    dataset: str = ""

    @field_validator("instruction")
    @classmethod
    def _writable(cls, v: str) -> str:
        # JSON may carry lone surrogates; they cannot be written back as UTF-8 for alpaca_eval.
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("not valid Unicode text (lone surrogate)") from None
        return v


def parse_rows(rows: Iterable[Any], source: str) -> list[Instruction]:
    """Validate rows; the error names the source and the 0-based item."""
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(Instruction.model_validate(row))
        except ValidationError as e:
            raise ConfigError(f"{source}: item {i}: {format_validation_error(e)}") from None
    if not out:
        raise ConfigError(f"{source}: no instructions")
    return out


def read_instruction_file(path: str | Path) -> list[Instruction]:
    """A JSON list of objects, or JSONL (one object per line; blank lines skipped)."""
    return parse_rows(_read_rows(Path(path)), str(path))


def reference_outputs_file(source: str) -> Path | None:
    """A file alpaca_eval's `--reference_outputs` reads for these instructions: the hub's file
    (alpaca_eval_gpt4_baseline.json, the gpt-4-turbo answers) where huggingface_hub has it cached,
    or the user's instructions file where every row carries the reference `output`; else None
    (alpaca_eval then fetches the same file from the hub itself)."""
    if source == HUB_SOURCE:
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(HUB_REPO, HUB_FILE, repo_type="dataset", local_files_only=True))
        except Exception:  # noqa: BLE001 - not installed, not cached: alpaca_eval's default applies
            return None
    try:
        rows = _read_rows(Path(source))
    except ConfigError:
        return None
    ok = isinstance(rows, list) and bool(rows) and all(isinstance(r, dict) and isinstance(r.get("output"), str) for r in rows)
    return Path(source).resolve() if ok else None


def _read_rows(p: Path) -> list[Any]:
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"instructions file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read: {e}") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{p}: not valid JSON: {e}") from None
        return rows  # type: ignore[no-any-return]  # parse_rows names a non-list's problem
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise ConfigError(f"{p}: line {n}: not valid JSON: {e}") from None
    return rows


def load_from_hub(*, endpoint: str | None = None, cache_dir: str | Path | None = None,
                  try_datasets: bool = True) -> list[Instruction]:
    """The 805 AlpacaEval 2.0 instructions from the Hugging Face hub, or a ConfigError that
    tells the user to pass a local file (machines without hub access are common).

    `endpoint` and `cache_dir` go to huggingface_hub (default: HF_ENDPOINT and its cache);
    `datasets`, when installed, is the fallback because its own cache may hold the dataset
    from an earlier alpaca_eval run even where the hub cannot be reached."""
    problems: list[str] = []
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        problems.append("huggingface_hub is not installed")
    else:
        try:
            path = hf_hub_download(HUB_REPO, HUB_FILE, repo_type="dataset", endpoint=endpoint,
                                   cache_dir=None if cache_dir is None else str(cache_dir))
            return read_instruction_file(path)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any network/hub failure means "not reachable"
            problems.append(f"huggingface_hub: {_describe(e)}")
    if try_datasets:
        try:
            rows = _load_with_datasets()
        except ImportError:
            pass  # the library is optional
        except Exception as e:  # noqa: BLE001
            problems.append(f"datasets: {_describe(e)}")
        else:
            return parse_rows(rows, HUB_SOURCE)
    raise ConfigError(
        f"cannot load {HUB_REPO} ({HUB_CONFIG}, split {HUB_SPLIT}) from the Hugging Face hub "
        f"({'; '.join(problems)}). Pass --instructions FILE with a local copy "
        f"(a JSON list or JSONL of objects with `instruction` and `dataset`).")


def _describe(e: BaseException) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def _load_with_datasets() -> Any:
    import datasets  # type: ignore[import-not-found]

    return datasets.load_dataset(HUB_REPO, HUB_CONFIG, split=HUB_SPLIT)


def load_instructions(path: str | Path | None, *, hub_endpoint: str | None = None) -> tuple[list[Instruction], str]:
    """(instructions, source label): the user's file when given, else the hub."""
    if path is not None:
        return read_instruction_file(path), str(Path(path).resolve())
    return load_from_hub(endpoint=hub_endpoint), HUB_SOURCE


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`, 1-based like `--shard 2/4`."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def bounds(self, total: int) -> tuple[int, int]:
        """Contiguous [start, stop) of `total` items; depends on nothing else, so it is stable
        across runs and machines, and the shards 1..n tile [0, total) exactly."""
        return (self.index - 1) * total // self.count, self.index * total // self.count


def parse_shard(text: str) -> Shard:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise ConfigError(f"--shard: expected i/n (e.g. 2/4), got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if not 1 <= i <= n:
        raise ConfigError(f"--shard: need 1 <= i <= n, got {text!r}")
    return Shard(i, n)


@dataclass(frozen=True)
class Selection:
    """The items one run answers: dataset[start:stop] after --limit and --shard.

    `total` is the dataset size after --limit, the space the shards tile; `digest` fingerprints
    the selected instruction strings so a merge can prove a shard holds exactly its items.
    """

    source: str
    total: int
    start: int
    stop: int
    shard: Shard | None
    items: tuple[Instruction, ...]
    digest: str

    @property
    def indices(self) -> range:
        return range(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start


def instructions_digest(instructions: Sequence[str]) -> str:
    """sha256 over the instruction strings with their lengths (no separator ambiguity)."""
    h = hashlib.sha256()
    for s in instructions:
        b = s.encode("utf-8")
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.hexdigest()


def select(items: Sequence[Instruction], source: str, *, limit: int | None = None,
           shard: Shard | None = None) -> Selection:
    """The first `limit` items, then shard i/n of those."""
    if limit is not None and limit < 1:
        raise ConfigError("--limit: must be at least 1")
    total = len(items) if limit is None else min(limit, len(items))
    start, stop = shard.bounds(total) if shard else (0, total)
    chosen = tuple(items[start:stop])
    return Selection(source, total, start, stop, shard, chosen,
                     instructions_digest([it.instruction for it in chosen]))
