"""What every config model shares: strict models, the one config error, and how a pydantic
error reads (one line per problem, naming the dotted field)."""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

class ConfigError(ValueError):
    """A config or argument that cannot be used; the message names the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the dotted field, e.g. `search.w: ...`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{loc or '<config>'}: {msg}")
    return "; ".join(lines)


def cache_dir() -> Path:
    """Where fetched models live: $W2S_CACHE_DIR, else ~/.cache/w2s-proxy."""
    return Path(os.environ.get("W2S_CACHE_DIR") or Path.home() / ".cache" / "w2s-proxy")
