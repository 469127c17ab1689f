"""Loading a scorer model: where it runs, in what precision, from a hub id or a local path.

Kept apart from the scoring arithmetic so that tests can hand already-built models to a scorer,
and so that the one place that touches the hub or the disk gives one clear error.
"""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from proxy.config import ModelSpec
from proxy.config.scorer import check_local_model
from scorers.gguf_cache import local_spec

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def pick_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """Resolve "auto": CUDA when present, and bfloat16 there but float32 on CPU.

    CPU kernels for half precision are slow and lossy, so "auto" never picks them; an explicit
    dtype is honoured anywhere.
    """
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dtype == "auto":
        return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (known: auto, {', '.join(_DTYPES)})")
    return dev, _DTYPES[dtype]


def _where(spec: ModelSpec) -> str:
    return f"{spec.path} (gguf_file={spec.gguf_file})" if spec.gguf_file else spec.path


def apply_adapter(model: PreTrainedModel, adapter: str) -> PreTrainedModel:
    """`model` with the PEFT adapter in directory `adapter` merged into its weights.

    Merged, not wrapped: the scorer, its KV caches and ExPO then see a plain transformers model
    (the parent plus the learned delta), and a forward pass costs what the parent's does. peft is
    imported here only, so a scorer without an adapter never needs it.
    """
    try:
        from peft import PeftModel

        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except Exception as e:  # chained; the message names which adapter it was
        raise ValueError(f"cannot apply adapter {adapter} to the model: {e}") from e
    return merged  # type: ignore[return-value]


def load_causal_lm(
    spec: ModelSpec,
    device: torch.device,
    dtype: torch.dtype,
    *,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (in eval mode, on `device`, in `dtype`) and tokenizer for `spec`.

    `attn_implementation` None keeps transformers' default (SDPA where available: fast, but its
    kernels depend on sequence length, so fp32 results drift by ~1e-6 per token between a padded
    batch and a lone prefix); "eager" gives results that are bit-identical across batching,
    which exactness tests want.

    A local GGUF file is read through its converted copy (scorers.gguf_cache), made on first use.

    Any failure (missing directory, no hub access, unreadable GGUF, missing weights, an adapter
    that does not fit) becomes a ValueError that names the path, since the underlying errors
    rarely say which model it was. A path that can only be local and is missing says so
    (ModelPathMissing, a ValueError) rather than what the hub says of a malformed repo id.
    """
    check_local_model(spec.path)
    if spec.adapter:
        check_local_model(spec.adapter, "adapter")
    try:
        spec = local_spec(spec)  # a GGUF file is converted once; later loads read the copy
        kwargs: dict[str, object] = {k: v for k, v in (("gguf_file", spec.gguf_file), ("revision", spec.revision))
                                     if v}
        model_kwargs = kwargs | ({} if attn_implementation is None else {"attn_implementation": attn_implementation})
        tokenizer = AutoTokenizer.from_pretrained(spec.path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype, **model_kwargs)
    except Exception as e:  # chained, so nothing is lost; only the path is added
        raise ValueError(f"cannot load scorer model {_where(spec)}: {e}") from e
    if spec.adapter:
        model = apply_adapter(model, spec.adapter)
    model.to(device)
    model.eval()
    return model, tokenizer
