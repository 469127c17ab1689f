"""A GGUF model converted once into transformers' own format, so later loads take seconds.

transformers loads a GGUF file by de-quantizing every tensor and rebuilding the tokenizer from
the file's vocabulary; for Gemma 3 270M (262k tokens) that is about two minutes on 2 CPU cores,
paid by every `w2s demo`, every `serve-local` start and every test that serves it. The result
is the same each time, so the first load saves it (float32 safetensors and tokenizer.json) under
the cache directory and later loads read that. float32 holds the de-quantized values exactly,
so a later load in any dtype casts the same numbers a GGUF load would.

The copy is keyed by the GGUF file's resolved path, size and modification time, by the
transformers version (a new version may convert differently) and by this module's COPY_FORMAT; anything else reuses a stale copy
only if the file was replaced in place with the same size and time stamp. The conversion is
written to a temporary directory and renamed into place, so concurrent or interrupted loads never
see half a copy. When the cache directory cannot be written the model is still
loaded from the GGUF file, as before.

A conversion also clears what can never be used again (`sweep`): copies whose GGUF file has
changed or is gone, and scratch directories a killed conversion left. Copies made under another
transformers version of an unchanged file are kept: another environment sharing the cache may
still read them, and deleting them would make two such environments convert in turn forever.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from proxy.config import ModelSpec, cache_dir

CONVERTED_DIR = "gguf-converted"
COPY_FORMAT = 2
"""Part of the key: copies written by an earlier version of this module (1: no `architectures`
in config.json) are not reused."""
SOURCE_FILE = "w2s-source.json"
"""In each copy: the GGUF file it was made from (resolved path, size, mtime_ns), for `sweep`."""
STALE_SCRATCH_S = 24 * 3600
"""A scratch directory this old belongs to a conversion that was killed (one takes minutes)."""
SCRATCH_NAME = re.compile(r".+-[0-9a-f]{16}\..+")
"""`scratch_dir`'s names: a copy's name, a dot and mkdtemp's random suffix."""


def _gguf_path(spec: ModelSpec) -> Path | None:
    if not spec.gguf_file or spec.revision:
        return None
    gguf = Path(spec.path) / spec.gguf_file
    return gguf if gguf.is_file() else None


def _source(gguf: Path) -> dict[str, object]:
    st = gguf.stat()
    return {"gguf": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def converted_dir(spec: ModelSpec) -> Path | None:
    """Where the converted copy of `spec`'s GGUF file lives; None when `spec` has no local GGUF file
    (a hub id is left to transformers)."""
    gguf = _gguf_path(spec)
    if gguf is None:
        return None
    src = _source(gguf)
    key = f"{src['gguf']}|{src['size']}|{src['mtime_ns']}|transformers {transformers.__version__}|{COPY_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / CONVERTED_DIR / f"{gguf.stem}-{digest}"


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file()


PROBES = ("A film review: the plot is slow, but the ending", "  two  spaces\tand a tab\n\nnew lines",
          "Ünïcödé, emoji 🎬 and 数字 123,456.78", "<bos>special <eos> tokens as text", "")
"""Texts the converted tokenizer must encode exactly as the GGUF one does."""


def _plain_config(model: PreTrainedModel) -> dict[str, object]:
    """The config as save_pretrained would write it for a plain model: without the GGUF marker
    (the weights are plain by now) and naming the model class, which engines such as vLLM read."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    return config


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Weights, config and tokenizer in transformers' own format. transformers refuses to
    save_pretrained a model loaded from GGUF (it marks it quantized, though every tensor is
    de-quantized by then), so the weights go through safetensors directly: each storage once (the
    tied output embedding is the input one), and the config without the GGUF marker."""
    seen: set[int] = set()
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        weights[name] = tensor.contiguous()
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    type(model.config).from_dict(_plain_config(model)).save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _verify(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, saved: Path) -> None:
    """Refuse a copy that does not read back as what was loaded: every tensor bit-equal, the same
    vocabulary and the same ids for the probe texts."""
    again = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    mine, theirs = model.state_dict(), again.state_dict()
    if mine.keys() != theirs.keys():
        raise ValueError(f"the converted copy has other tensors: {sorted(mine.keys() ^ theirs.keys())[:5]}")
    for name, tensor in mine.items():
        if not torch.equal(tensor, theirs[name]):
            raise ValueError(f"converted tensor {name} differs from the GGUF load")
    mine_cfg, their_cfg = _plain_config(model), _plain_config(again)
    differ = sorted(k for k in mine_cfg.keys() | their_cfg.keys()
                    if k != "_name_or_path" and mine_cfg.get(k) != their_cfg.get(k))
    if differ:
        raise ValueError(f"the converted config differs from the GGUF load in {differ}")
    del again, theirs
    tok = AutoTokenizer.from_pretrained(saved)
    if tok.get_vocab() != tokenizer.get_vocab() or any(
            tok(t)["input_ids"] != tokenizer(t)["input_ids"] for t in PROBES):
        raise ValueError("the converted tokenizer differs from the GGUF one")


def scratch_dir(target: Path) -> Path:
    """An empty directory beside `target` to write the copy into (OSError when the cache is not
    writable: checked before the slow load)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))


def convert(spec: ModelSpec, target: Path, tmp: Path) -> None:
    """Load `spec`'s GGUF file in float32, save model and tokenizer to `tmp`, verify them and rename
    `tmp` to `target`. `tmp` is gone afterwards, whatever happened."""
    try:
        print(f"converting {spec.path}/{spec.gguf_file} once into {target} (later loads read that)",
              file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(spec.path, gguf_file=spec.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(spec.path, gguf_file=spec.gguf_file, dtype=torch.float32)
        _save(model, tokenizer, tmp)
        _verify(model, tokenizer, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(_source(Path(spec.path) / str(spec.gguf_file))))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache ($W2S_CACHE_DIR) from other users
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its copy is the same
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def local_spec(spec: ModelSpec) -> ModelSpec:
    """`spec` pointing at the converted copy of its GGUF file (converting it on first use), or
    `spec` itself when there is nothing to convert or the copy cannot be written."""
    target = converted_dir(spec)
    if target is None:
        return spec
    if not _is_complete(target):
        try:
            tmp = scratch_dir(target)
        except OSError as e:
            print(f"cannot keep a converted copy of {spec.gguf_file} under {target.parent} ({e}); "
                  "loading the GGUF file itself", file=sys.stderr)
            return spec
        convert(spec, target, tmp)
        sweep(target.parent, keep=target)
    return spec.model_copy(update={"path": str(target), "gguf_file": None})


def _unusable(copy: Path) -> bool:
    """A copy whose GGUF file is gone or no longer the bytes it was made from (no key can reach it
    again). A copy without a source record (made before there was one) is left alone."""
    try:
        record = json.loads((copy / SOURCE_FILE).read_text())
        gguf = Path(record["gguf"])
        return not gguf.is_file() or _source(gguf) != record
    except (OSError, ValueError, KeyError, TypeError):
        return False


def sweep(folder: Path, keep: Path) -> None:
    """Remove the copies under `folder` that nothing can load again and the scratch directories of
    killed conversions; `keep` (the copy just made) and anything in doubt stay."""
    for child in folder.iterdir():
        if child == keep or not child.is_dir():
            continue
        try:
            scratch = SCRATCH_NAME.fullmatch(child.name) and not _is_complete(child)
            if scratch and time.time() - child.stat().st_mtime > STALE_SCRATCH_S:
                why = "left by a conversion that did not finish"
            elif not scratch and _is_complete(child) and _unusable(child):
                why = "its GGUF file changed or is gone"
            else:
                continue
        except OSError:
            continue
        shutil.rmtree(child, ignore_errors=True)
        print(f"removed {child} ({why})", file=sys.stderr)
