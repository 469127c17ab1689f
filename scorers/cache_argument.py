"""The KV cache's name in transformers' model calls, which changed within v5: `past_key_values`
before, `cache` after (the old name still works there, with a FutureWarning on every call and a
removal date). The warning points at our call site, so no filter on the library's module keeps it
out of a server's log; calling with the name the installed version reads does, and keeps the
scorer and `serve-local` working on either side of the rename."""
from __future__ import annotations

import functools
import inspect
from typing import Any

from transformers import PreTrainedModel


def cache_argument(model: PreTrainedModel, cache: Any) -> dict[str, Any]:
    """`{name: cache}` for `model(...)` and `model.generate(...)`, named as this version reads it
    (a PEFT wrapper passes its keywords through: its base model's forward says)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_cache_name(type(base)): cache}


@functools.lru_cache(maxsize=None)
def _cache_name(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_of(output: Any) -> Any:
    """The cache a forward pass returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
