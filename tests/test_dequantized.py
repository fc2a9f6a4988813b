"""A GGUF model's dequantized copy in the cache (issue #23 item 3, editor/model/dequantized.py): the
first load reads the file and writes the copy, later loads read the copy — the same weights bit for
bit, the same config, generation config and name as read from the file, the same statistics and
checkpoint bytes — while the provenance still names the GGUF file and its sha256. Built on a tiny
GGUF file written here (tests/tiny.py ``tiny_gguf``)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch

from editor.model import dequantized
from editor.recipe import parse_recipe
from tests.tiny import tiny_gguf

pytest.importorskip("gguf")


@pytest.fixture
def gguf_model(tmp_path, monkeypatch):
    """A tiny GGUF file, the copies on, the cache in tmp_path/cache."""
    monkeypatch.setenv(dequantized.ENV, "1")
    monkeypatch.setenv("SKILL_EDITOR_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m").mkdir()
    return tiny_gguf(tmp_path / "m" / "tiny.gguf")


def _recipe(path: Path, dtype: str = "float32"):
    return parse_recipe({"model": str(path), "dtype": dtype, "device": "cpu", "data": {"x": {"path": "x.jsonl"}}},
                        base_dir=path.parent)


def _reads(monkeypatch) -> list:
    """What each from_pretrained call reads: (the directory, the gguf_file keyword)."""
    from transformers import AutoModelForCausalLM

    seen = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, ref, *a, **kw):
        seen.append((str(ref), kw.get("gguf_file")))
        return real(cls, ref, *a, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    return seen


def _snapshot(model) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict(),
            model.generation_config.to_dict(), model.name_or_path, getattr(model.config, "quantization_config", None))


def _same(a: tuple, b: tuple) -> None:
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        assert a[0][k].dtype == b[0][k].dtype and torch.equal(a[0][k], b[0][k]), k
    assert a[1:] == b[1:]


def test_read_once_from_the_file_then_from_its_copy(gguf_model, monkeypatch):
    from editor.model.loading import load_model, model_file_identity

    r = _recipe(gguf_model)
    seen = _reads(monkeypatch)
    monkeypatch.setenv(dequantized.ENV, "0")
    plain = _snapshot(load_model(r))
    assert not (gguf_model.parent.parent / "cache").exists()  # off: nothing written
    monkeypatch.setenv(dequantized.ENV, "1")
    first = _snapshot(load_model(r))
    entry = dequantized.entry_dir(gguf_model, torch.float32)
    sha = hashlib.sha256(gguf_model.read_bytes()).hexdigest()
    assert entry.name == f"tiny-{sha[:16]}-float32" and entry.parent.parent == gguf_model.parent.parent / "cache"
    assert json.loads((entry / dequantized.SOURCE).read_text())["gguf_sha256"] == sha
    again = _snapshot(load_model(r))
    assert seen == [(str(gguf_model.parent), "tiny.gguf")] * 2 + [(str(entry), None)]
    _same(plain, first)
    _same(plain, again)
    assert plain[4] is None  # no gguf quantization record either way
    # provenance: the GGUF file, not the copy
    assert model_file_identity(r) == {"model": r.recorded_model, "revision": "", "gguf_file": "tiny.gguf",
                                      "gguf_sha256": sha}


def test_copies_are_per_file_and_dtype(gguf_model, tmp_path, monkeypatch):
    from editor.model.loading import load_model

    load_model(_recipe(gguf_model))
    load_model(_recipe(gguf_model, "bfloat16"))
    other = tiny_gguf(tmp_path / "tiny.gguf", seed=1)  # same name, other weights
    load_model(_recipe(other))
    names = sorted(p.name for p in (tmp_path / "cache" / "dequantized").iterdir() if not p.name.startswith("."))
    assert len(names) == 3 and sum(n.endswith("-bfloat16") for n in names) == 1
    seen = _reads(monkeypatch)
    m = load_model(_recipe(gguf_model, "bfloat16"))
    assert seen[-1][1] is None and m.dtype == torch.bfloat16


def test_an_incomplete_or_foreign_copy_is_not_read(gguf_model, monkeypatch):
    from editor.model.loading import load_model

    r = _recipe(gguf_model)
    want = _snapshot(load_model(r))
    entry = dequantized.entry_dir(gguf_model, torch.float32)
    (entry / dequantized.SOURCE).unlink()  # as if the writer died before the end (atomic: cannot be seen)
    assert dequantized.lookup(gguf_model, torch.float32) is None
    seen = _reads(monkeypatch)
    _same(want, _snapshot(load_model(r)))
    assert seen[-1][1] == "tiny.gguf" and dequantized.lookup(gguf_model, torch.float32) == entry  # written again
    source = json.loads((entry / dequantized.SOURCE).read_text())
    (entry / dequantized.SOURCE).write_text(json.dumps({**source, "gguf_sha256": "0" * 64}))
    assert dequantized.lookup(gguf_model, torch.float32) is None


def test_a_copy_that_cannot_be_written_is_a_warning(gguf_model, tmp_path, monkeypatch, caplog):
    from editor.model.loading import load_model

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("SKILL_EDITOR_CACHE", str(blocker))
    with caplog.at_level(logging.WARNING, logger="editor.model.dequantized"):
        model = load_model(_recipe(gguf_model))
    assert model.config.num_hidden_layers == 2
    assert any("not caching the dequantized tiny.gguf" in r.getMessage() for r in caplog.records)
    # no room: skipped before writing anything
    monkeypatch.setenv("SKILL_EDITOR_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setattr(dequantized.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="editor.model.dequantized"):
        load_model(_recipe(gguf_model))
    assert any("GiB free" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "cache2" / "dequantized").exists() or not any(
        p for p in (tmp_path / "cache2" / "dequantized").iterdir() if not p.name.startswith("."))


def test_profile_and_export_are_byte_identical_through_the_copy(gguf_model, tmp_path, monkeypatch):
    """profile → export from the file and from its copy: the same statistics (content) and the same
    checkpoint files, byte for byte (the config names the file's directory, as read from the file)."""
    from editor.pipeline import export_recipe, profile_recipe
    from editor.profile.stats import content_digest, load_stats

    texts = ["hello world", "a b c", "the cat sat", "def f(x): return x", "1 + 2 = 3", "zz top"]
    (tmp_path / "m" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "m" / "b.jsonl").write_text("".join(json.dumps({"text": t[::-1]}) + "\n" for t in texts))
    recipe = tmp_path / "m" / "recipe.yaml"
    recipe.write_text("model: tiny.gguf\ndtype: float32\ndevice: cpu\ndata:\n  a: {path: a.jsonl}\n  b: {path: b.jsonl}\n"
                      "profile: {batch_size: 4, max_length: 32}\n"
                      "neuron_adjust: {forget: a, retain: b, top_percent: 10, mode: expected}\n"
                      "key_space: {forget: a, layer: -1, scale: 2.0}\nexport: {formats: [hf], out: ckpt}\n")
    out = {}
    for name, on in (("file", "0"), ("first", "1"), ("copy", "1")):
        monkeypatch.setenv(dequantized.ENV, on)
        profile_recipe(recipe, tmp_path / f"stats-{name}", progress=False)
        export_recipe(recipe, tmp_path / f"stats-{name}", tmp_path / f"ckpt-{name}")
        ckpt = tmp_path / f"ckpt-{name}"
        out[name] = (content_digest(load_stats(tmp_path / f"stats-{name}")),
                     {p.name: p.read_bytes() for p in sorted(ckpt.iterdir()) if p.is_file()})
    assert dequantized.lookup(gguf_model, torch.float32) is not None
    assert out["file"] == out["first"] == out["copy"]


def test_no_misleading_packed_weights_warning_in_bfloat16(gguf_model, monkeypatch):
    """transformers ≥ 5.25 advises float32 for GGUF weights "kept packed" on any non-float32 load; a
    Llama is dequantized to plain weights (nothing stays packed), so that line is dropped — and only it."""
    import logging

    from editor.model.loading import load_model

    monkeypatch.setenv(dequantized.ENV, "0")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    log = logging.getLogger("transformers.quantizers.quantizer_gguf")
    handler, level = Keep(), log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING)  # whatever verbosity an earlier test left on transformers' logger
    try:
        m = load_model(_recipe(gguf_model, "bfloat16"))
        log.warning("another message")  # the filter drops that one line only
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert all(type(x).__name__ != "GgufLinear" for x in m.modules())
    assert next(m.parameters()).dtype == torch.bfloat16
    assert not any("weights packed" in s for s in seen) and "another message" in seen, seen


def test_config_and_tokenizer_are_parsed_from_the_file_once(gguf_model, monkeypatch):
    """The file's config and tokenizer: parsed from the file the first time, read from their saved
    copies afterwards — the same config and tokenizer as the file gives, under the file's name."""
    from transformers import AutoConfig, AutoTokenizer

    from editor.model.loading import load_config, load_tokenizer

    r = _recipe(gguf_model)
    monkeypatch.setenv(dequantized.ENV, "0")
    plain_cfg, plain_tok = load_config(r), load_tokenizer(r)
    monkeypatch.setenv(dequantized.ENV, "1")
    seen = []
    for cls in (AutoConfig, AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(c, ref, *a, _real=real, **kw):
            seen.append((c.__name__, str(ref), kw.get("gguf_file")))
            return _real(c, ref, *a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    for _ in range(2):
        cfg, tok = load_config(r), load_tokenizer(r)
        assert dequantized.same_config(cfg, plain_cfg) and dequantized.same_tokenizer(tok, plain_tok)
        assert cfg._name_or_path == plain_cfg._name_or_path and tok.name_or_path == plain_tok.name_or_path
    from_file = [s for s in seen if s[2] == "tiny.gguf"]
    assert [s[0] for s in from_file] == ["AutoConfig", "AutoTokenizer"], seen  # each parsed once
    cached = {s[1] for s in seen if s[2] is None and not s[1].endswith(".partial")}  # (.partial: the read-back check)
    assert cached == {str(dequantized.metadata_dir(gguf_model, k)) for k in ("config", "tokenizer")}


def test_metadata_that_reads_back_differently_is_not_kept(gguf_model, monkeypatch, caplog):
    from editor.model.loading import load_config

    r = _recipe(gguf_model)
    monkeypatch.setattr(dequantized, "same_config", lambda a, b: False)
    with caplog.at_level(logging.WARNING, logger="editor.model.dequantized"):
        cfg = load_config(r)
    assert cfg.num_hidden_layers == 2
    assert any("reads back differently" in rec.getMessage() for rec in caplog.records)
    assert not (dequantized.metadata_dir(gguf_model, "config") / dequantized.SOURCE).exists()
