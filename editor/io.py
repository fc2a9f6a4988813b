"""Atomic file and directory writes, hashing. No pickle anywhere."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from editor.errors import EditorError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _atomic_file(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (rename + fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    with _atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(obj) -> bytes:
    """The one JSON layout of every file the tool writes: sorted keys, 2-space indent, UTF-8."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def atomic_save_safetensors(tensors, path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file  # here: the rest of this module (and its users) need no torch

    with _atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def check_destination(out, overwrite: bool) -> Path:
    """Refuse a non-empty destination unless ``overwrite``; nothing is touched here."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EditorError(f"destination {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise EditorError(f"destination {out} is not empty (use --overwrite to replace it)")
    return out


@contextmanager
def atomic_directory(out, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it replaces ``out`` by rename.

    On any exception the temporary directory is removed and ``out`` is left as it was.
    """
    out = check_destination(out, overwrite).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a checkpoint is an ordinary readable directory
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
