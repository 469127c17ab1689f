"""The append-only record that makes a run resumable.

One JSON object per line: a header (which configuration the answers belong to), then one
line per item attempt, appended the moment the item finishes. An item's line is written with
a single `write` on an O_APPEND descriptor, so a process killed at any moment leaves either
the whole line or, at worst, a torn last line without its newline; the next open cuts that
tail off and the item is simply done again. Killing the process loses nothing written: the
data is in the kernel's page cache (there is no fsync per item, so a power cut is another
matter).

An index is done when it has an `ok` line; a `failed` line only says the last attempt failed
(`permanent` when running again cannot mend it), and the next run tries that item again. If an index somehow has two `ok` lines, the first
wins, so the output never holds an item twice.

An exclusive `flock` on the file keeps two runs from writing one directory at once; the
kernel drops it when the holder dies, so a killed run never blocks the next.
"""
from __future__ import annotations

import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from proxy.config import ConfigError, format_validation_error

log = logging.getLogger("w2s.alpaca_eval")

CHECKPOINT_NAME = "checkpoint.jsonl"
VERSION = 1


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Header(_Record):
    kind: Literal["header"] = "header"
    version: int = VERSION
    fingerprint: str
    generator: str
    created: float = Field(default_factory=time.time)


class ItemRecord(_Record):
    """One attempt at one item; `output` and the numbers are meaningful only when ok."""

    kind: Literal["item"] = "item"
    index: int = Field(ge=0)
    instruction: str
    dataset: str
    status: Literal["ok", "failed"]
    output: str = ""
    score: float | None = None
    finished: bool = False
    steps: int = 0
    calls: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Of prompt_tokens, those read from the upstream's cache (0 in records written before it was kept)."""
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    wall_s: float = 0.0
    error: str | None = None
    permanent: bool = False
    """A failure running again cannot mend (proxy.alpaca_eval.policy); the next run still tries it."""
    fallback: Literal["unguided", "truncate-left"] | None = None
    """How an instruction too long for the guide was answered (--on-too-long); None: as configured."""
    cut_chars: int = 0
    """truncate-left: characters cut from the instruction's start before it was answered."""
    at: float = Field(default_factory=time.time)


_LINE = TypeAdapter(Annotated[Header | ItemRecord, Field(discriminator="kind")])


@dataclass
class CheckpointState:
    header: Header | None = None
    done: dict[int, ItemRecord] = field(default_factory=dict)
    """index -> its first ok record."""
    failed: dict[int, ItemRecord] = field(default_factory=dict)
    """index -> its last failed record, for indexes not done."""
    lines: int = 0
    duplicates: int = 0
    """ok lines ignored because their index was already done."""

    def add(self, rec: ItemRecord) -> None:
        if rec.status == "ok":
            if rec.index in self.done:
                self.duplicates += 1
                return
            self.done[rec.index] = rec
            self.failed.pop(rec.index, None)
        elif rec.index not in self.done:
            self.failed[rec.index] = rec


def parse_checkpoint(data: bytes, path: Path) -> tuple[CheckpointState, int]:
    """State from the file's bytes, and the length of its whole-line prefix (torn tail cut)."""
    keep = data.rfind(b"\n") + 1
    state = CheckpointState()
    for n, raw in enumerate(data[:keep].splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rec = _LINE.validate_json(raw)
        except ValidationError as e:
            raise ConfigError(f"{path}: line {n} is not a checkpoint record ({format_validation_error(e)}); "
                              "the file is damaged: move it away to start over") from None
        state.lines += 1
        if isinstance(rec, Header):
            if n != 1 or state.header is not None:
                raise ConfigError(f"{path}: line {n}: a header can only be the first line")
            state.header = rec
        else:
            if state.header is None:
                raise ConfigError(f"{path}: the first line must be the header")
            state.add(rec)
    return state, keep


class Checkpoint:
    """An open, locked checkpoint; `state` reflects the file plus every `append` since."""

    def __init__(self, path: Path, fd: int, state: CheckpointState) -> None:
        self.path = path
        self._fd: int | None = fd
        self.state = state

    @classmethod
    def open(cls, directory: Path, *, fingerprint: str, generator: str) -> "Checkpoint":
        """Lock, repair a torn tail, read, and check (or write) the header."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CHECKPOINT_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"{directory}: another `w2s alpaca-eval` run is writing this directory") from None
            data = _read_all(fd)
            state, keep = parse_checkpoint(data, path)
            if keep < len(data):
                log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run",
                            path, len(data) - keep)
                os.ftruncate(fd, keep)
            if state.header is None:
                if state.lines:
                    raise ConfigError(f"{path}: the first line must be the header")
                state.header = Header(fingerprint=fingerprint, generator=generator)
                _write_line(fd, state.header.model_dump_json())
            else:
                check_header(state.header, directory, fingerprint=fingerprint, generator=generator)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, state)

    def append(self, rec: ItemRecord) -> None:
        if self._fd is None:
            raise RuntimeError("checkpoint is closed")
        _write_line(self._fd, rec.model_dump_json())
        self.state.add(rec)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # releases the flock

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_header(header: Header, directory: Path, *, fingerprint: str, generator: str) -> None:
    """Refuse to mix answers of two configurations in one directory."""
    if header.fingerprint != fingerprint:
        raise ConfigError(
            f"{directory} holds answers of another configuration ({header.generator}, "
            f"fingerprint {header.fingerprint}; this run: {generator}, {fingerprint}). "
            "Use another --output directory, or move the old one away.")


def read_checkpoint(directory: Path) -> CheckpointState:
    """Read without locking or repairing (for reports and merges)."""
    path = directory / CHECKPOINT_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return CheckpointState()
    return parse_checkpoint(data, path)[0]


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_line(fd: int, text: str) -> None:
    """One write call for the whole line (a partial write, rare on files, is completed)."""
    data = (text + "\n").encode("utf-8")
    while data:
        n = os.write(fd, data)
        data = data[n:]
