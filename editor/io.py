"""Atomic file and directory writes, hashing, the one JSONL reader. No pickle anywhere."""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from editor.errors import EditorError

log = logging.getLogger(__name__)


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


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_parent(path, what: str = "output") -> Path:
    """The directory that will hold ``path`` exists and is writable, or can be created: its nearest
    existing ancestor is a directory this process can write — tried with an anonymous temporary
    file (``O_TMPFILE`` where the file system has it: no name appears), since permissions do not
    tell (root on /proc, a read-only mount). Nothing is left behind."""
    path = Path(path).absolute()
    anc = _nearest_existing(path.parent)
    if not anc.is_dir():
        raise EditorError(f"cannot write {what} {path}: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise EditorError(f"cannot write {what} {path}: {anc} is not writable")
    try:
        with tempfile.TemporaryFile(dir=anc):
            pass
    except OSError as e:
        raise EditorError(f"cannot write {what} {path}: {anc} does not take new files ({e.strerror or e})") from None
    return path


def check_destination(out, overwrite: bool) -> Path:
    """Refuse a destination directory that cannot be written: a file, a place whose parent is a file
    or not writable, or a non-empty directory without ``overwrite``. Nothing is touched here."""
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise EditorError(f"destination {out} exists and is not a directory")
    check_parent(out, "destination")
    if out.is_dir():
        if not os.access(out, os.R_OK | os.W_OK | os.X_OK):
            raise EditorError(f"destination {out} is not writable")
        if any(out.iterdir()) and not overwrite:
            raise EditorError(f"destination {out} is not empty (use --overwrite to replace it)")
    return out


def check_file_destination(path, overwrite: bool = True) -> Path:
    """Refuse an output file that cannot be written (a directory there, a parent that is a file or
    not writable; an existing file without ``overwrite``). Nothing is touched here."""
    path = Path(path)
    if path.is_dir():
        raise EditorError(f"output {path} is a directory")
    if os.path.lexists(path) and not overwrite:
        raise EditorError(f"{path} exists (use --overwrite to replace it)")
    check_parent(path, "file")
    return path


# ---------------------------------------------------------------------------------------------
# one writer per destination, crash-safe replacement
# ---------------------------------------------------------------------------------------------

_HELD: dict[Path, list] = {}  # destination -> [lock file descriptor, depth] held by this process


def lock_path(out) -> Path:
    """The lock file of a destination: ``.<name>.lock`` beside it."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.lock"


def _hook(point: str) -> None:
    """Named points of a replacement (``writing``, ``swap``, ``swapped``, ``between``), where the
    crash tests stop a real export process; nothing happens here otherwise."""


@contextmanager
def hold_destination(out, *, clean: bool = True, wait: bool = False) -> Iterator[Path]:
    """Hold the one-writer lock of ``out`` (re-entrant within the process) while the body runs, and
    first clean up what a killed writer left beside it (``recover``).

    The lock is ``flock`` on ``.<name>.lock`` beside the destination, taken without waiting:
    another process holding it means another export to the same place is running, and this one is
    refused — or, with ``wait``, waits for it (a cache that every process fills the same way). The
    kernel releases the lock when its holder dies, however it dies, so a crash leaves no stale lock.
    On NFS, Linux maps ``flock`` to the server's byte-range locks (NFSv4, or NFSv3 with the lock
    manager): writers on different hosts exclude each other there, but not on a mount with
    ``nolock`` / ``local_lock``, where the lock is only seen by one host. The parent directories
    created for the lock are removed again if the body fails and leaves them empty. A lock file that
    is there before this process creates it was left by a killed writer: taking it over is reported
    (a warning). ``clean=False``: no ``recover`` (the caller's own)."""
    import fcntl

    out = Path(out).absolute()
    if out in _HELD:
        _HELD[out][1] += 1
        try:
            yield out
        finally:
            _HELD[out][1] -= 1
        return
    created = []
    p = out.parent
    while not p.exists():
        created.append(p)
        p = p.parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EditorError(f"cannot create {out.parent}: {e.strerror}") from None
    path = lock_path(out)
    while True:
        stale = os.path.lexists(path)  # a holder unlinks its lock file: one that is there was left by a killed writer
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise EditorError(f"cannot write {out}: cannot create its lock file {path} there ({e.strerror})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise
                log.warning("waiting for another process writing %s (it holds %s)", out, path)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BlockingIOError:
            os.close(fd)
            raise EditorError(f"another process is writing {out} (it holds {path}); wait for it to finish") from None
        except OSError as e:
            os.close(fd)
            raise EditorError(f"cannot lock {path}: {e.strerror}") from None
        try:  # the file may have been unlinked by the previous holder between our open and flock
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    _HELD[out] = [fd, 1]
    ok = False
    try:
        if stale:
            log.warning(f"took over {path}, the lock file a killed writer of {out} left")
        if clean:
            recover(out)
        yield out
        ok = True
    finally:
        del _HELD[out]
        try:
            os.unlink(path)  # while still holding it: a newcomer then creates (and locks) a new file
        except OSError:
            pass
        os.close(fd)
        if not ok:
            for d in created:  # deepest first
                try:
                    d.rmdir()
                except OSError:
                    break


def _leftovers(out: Path, suffix: str) -> list[Path]:
    """``out``'s own temporary directories (``mkdtemp``'s 8 random characters exactly: not those of
    another destination whose name starts with this one's, e.g. ``ck.v2`` beside ``ck``)."""
    own = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}{re.escape(suffix)}")
    return sorted(p for p in out.parent.glob(f".{glob.escape(out.name)}.*{suffix}")
                  if own.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def recover(out) -> list[str]:
    """What a killed writer of ``out`` left beside it, put right (call with the lock held): with no
    ``out``, the previous checkpoint moved aside for a replacement (``.<name>.*.old/``) is moved
    back; the temporary directories of unfinished writes (``.<name>.*.partial/``) and old
    checkpoints already replaced are removed. Each action is logged (a warning) and returned."""
    out = Path(out).absolute()
    done = _finish_together(out)
    olds = _leftovers(out, ".old")
    if not os.path.lexists(out):
        for trash in reversed(olds):
            if (trash / "old").is_dir():
                os.replace(trash / "old", out)
                done.append(f"restored {out} from {trash} (an interrupted --overwrite had moved it aside)")
                break
    for p in _leftovers(out, ".partial") + _leftovers(out, ".old"):
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p}, left by an interrupted write of {out}")
    if done:
        _fsync_dir(out.parent)
    for line in done:
        log.warning(line)
    return done


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system or
    the file system (NFS, for one) cannot, so the caller falls back to two renames."""
    global _renameat2
    if _renameat2 is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (OSError, AttributeError):
            _renameat2 = False
    if _renameat2 is False:
        return False
    import ctypes

    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if _renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


_renameat2 = None


def _swap_in(tmp: Path, out: Path) -> Path | None:
    """Put the complete directory ``tmp`` at ``out``: renamed into place, or swapped with the
    existing ``out`` in one step (``renameat2(RENAME_EXCHANGE)``). Where the file system cannot
    swap (NFS), the old directory is first renamed aside to ``.<name>.*.old/``: a kill between the
    two renames leaves it there, and the next writer (or ``recover``) moves it back; an exception
    between them puts it back at once. Returns what now holds the old directory (to delete), if any."""
    _hook("swap")
    if not out.exists():
        os.replace(tmp, out)
        return None
    if _exchange(tmp, out):  # tmp now holds the old directory
        _fsync_dir(out.parent)
        _hook("swapped")
        return tmp
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, trash / "old")
    try:
        _hook("between")
        os.replace(tmp, out)
    except BaseException:  # e.g. SIGTERM here: put the old directory back
        if not os.path.lexists(out):
            os.replace(trash / "old", out)
        shutil.rmtree(trash, ignore_errors=True)
        raise
    return trash


_TOGETHER: dict[Path, dict[Path, Path]] = {}  # destination -> the {destination: complete temporary directory} of its group


@contextmanager
def atomic_directory(out, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it replaces ``out``.

    The destination's lock is held throughout (``hold_destination``: a concurrent writer is
    refused; what a killed writer left is cleaned first). At no moment is there no complete
    directory at ``out`` (``_swap_in``): a new one is renamed into place; an existing one
    (``overwrite``) is swapped with the new one in one step and deleted afterwards. On any
    exception the temporary directory is removed and ``out`` is left as it was; a SIGKILL leaves
    the temporary directory, which the next writer removes. Inside ``replaced_together`` naming
    ``out``, the complete directory waits for the group's end instead.
    """
    out = check_destination(out, overwrite).absolute()
    with hold_destination(out):
        out = check_destination(out, overwrite).absolute()  # the state recover() left
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a checkpoint is an ordinary readable directory
        old = None
        try:
            yield tmp
            _hook("writing")
            if out in _TOGETHER:
                _TOGETHER[out][out], tmp = tmp, None  # the group swaps it in (or removes it)
                return
            old = _swap_in(tmp, out)
            _fsync_dir(out.parent)
        finally:
            if tmp is not None:
                shutil.rmtree(old or tmp, ignore_errors=True)


def _journal(out: Path) -> Path:
    """The record of a group replacement under way (``replaced_together``): ``.<name>.together`` beside it."""
    return out.parent / f".{out.name}.together"


@contextmanager
def replaced_together(outs, overwrite: bool = False) -> Iterator[list[Path]]:
    """The directories ``outs`` that the block writes (each through ``atomic_directory``) replace
    their destinations together when the block ends, or none does.

    Every destination's lock is held throughout. Once every new directory is complete, a journal
    naming each (destination, new directory, its inode) is written beside every destination — the
    commit point —, then each is swapped in (``_swap_in``) and the journals removed. A kill before
    the journals leaves every old directory in place (the next writer removes the temporary ones);
    a kill after them is completed by the next writer of any of the destinations (``recover``:
    whichever new directory is not in place yet is swapped in), so a reader never meets a
    statistics directory and a checkpoint of two different runs once a writer has passed. An
    exception (SIGTERM, Ctrl-C) before the commit removes the new directories; after it, the swaps
    are completed first."""
    outs = list(dict.fromkeys(check_destination(o, overwrite).absolute() for o in outs))
    with ExitStack() as held:
        for o in outs:
            held.enter_context(hold_destination(o))
        group: dict[Path, Path] = {}
        for o in outs:
            _TOGETHER[o] = group
        try:
            try:
                yield outs
            finally:
                for o in outs:
                    del _TOGETHER[o]
        except BaseException:
            for tmp in group.values():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        entries = [[str(o), str(group[o]), os.stat(group[o]).st_ino] for o in outs if o in group]
        committed = False
        try:
            for o, _, _ in entries:  # the first destination's first: every writer of the group takes its lock first
                atomic_write_bytes(_journal(Path(o)), json_bytes({"together": entries}))
                committed = True
            _hook("committed")
        except BaseException:
            if not committed:
                for tmp in group.values():
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
            _complete(entries)
            raise
        try:
            _complete(entries)
        except BaseException:  # e.g. SIGTERM between two swaps: the group is committed, finish it first
            _complete(entries)
            raise


def _complete(entries: list) -> list[str]:
    """Swap in every new directory of a committed group that is not in place yet, then remove the
    group's journals and the old directories. Returns what was done (after a kill)."""
    done, olds = [], []
    for o, t, ino in entries:
        o, t = Path(o), Path(t)
        if o.is_dir() and os.stat(o).st_ino == ino:
            continue  # already in place
        if t.is_dir() and os.stat(t).st_ino == ino:
            olds.append(_swap_in(t, o))
            done.append(f"completed the replacement of {o} (an interrupted run had replaced the rest of its group)")
        else:
            done.append(f"cannot complete the replacement of {o}: {t} is gone")
    for o, _, _ in entries:
        j = _journal(Path(o))
        if j.exists():
            j.unlink()
        _fsync_dir(Path(o).parent)
    for _, t, ino in entries:  # after an exchange the new directory's name holds the old one
        if os.path.isdir(t) and os.stat(t).st_ino != ino:
            shutil.rmtree(t, ignore_errors=True)
    for old in olds:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return done


def _finish_together(out: Path) -> list[str]:
    """``recover``'s first step: a group replacement of ``out`` that was committed but not
    finished (its journal is there) is completed, the group's other destinations locked too."""
    j = _journal(out)
    if not j.exists():
        return []
    try:
        entries = json.loads(j.read_text(encoding="utf-8"))["together"]
    except (OSError, ValueError, KeyError, TypeError):
        j.unlink()
        return [f"removed {j}, an unreadable journal"]
    with ExitStack() as held:
        others = [Path(o) for o, _, _ in entries if Path(o) != out]
        for o in others:  # their own clean-up would remove the new directories: after the group is complete
            held.enter_context(hold_destination(o, clean=False))
        done = _complete(entries)
        for o in others:
            done += recover(o)
        return done


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_jsonl(path, what: str) -> tuple[list[dict], list[int]]:
    """The one JSONL reader: every non-blank line of ``path`` one JSON object. Returns the records
    and each one's file line number (1-based, blank lines counted) — the one numbering of every
    message about a record of a file. A bad line is one ``EditorError``: ``{what}: NAME line N ...``."""
    path = Path(path)
    records, lines = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise EditorError(f"{what}: {path.name} line {i} is not valid JSON") from None
                if not isinstance(rec, dict):
                    raise EditorError(f"{what}: {path.name} line {i} is not a JSON object")
                records.append(rec)
                lines.append(i)
    except UnicodeDecodeError:
        raise EditorError(f"{what}: {path.name} is not UTF-8 text") from None
    except OSError as e:
        raise EditorError(f"{what}: cannot read {path}: {e.strerror or e}") from None
    return records, lines
