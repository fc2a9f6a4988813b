"""Score untrusted Python against a task's asserts so that the program cannot forge the verdict.

Used by the MBPP scorer (``scorers.execute_mbpp``). Standard library only; this file is also the
judge's program (``python -I -S sandbox.py``), so it imports nothing from the package.

Design: three processes; the program's process never holds the tests
=====================================================================

::

    scorer (caller)  ──job on stdin──▶  judge  ──fork+exec──▶  program
         ▲   (HMAC key, tests, code)   (trusted,               (untrusted: the model's code
         └── verdict + HMAC on stdout   never runs              + a small call server; new
             (only the judge holds it)  program code)           session, namespaces, limits)

* The **program** process is a fresh interpreter that receives the candidate code (and the task's
  setup code) and nothing else: not the tests, not a nonce, not a key. It runs the code, tells the
  judge which names it defined, then answers questions: "call your function ``h`` with these
  arguments" → "it returned this value" (or "it raised that"); likewise an attribute, an item,
  ``len``, truth, the items of an iteration, ``str``.
* The **judge** runs the task's asserts in its own interpreter. Every name the asserts take from
  the program is bound to a proxy; calling the proxy is a round trip to the program. Values cross
  as JSON of plain built-in data (numbers, strings, lists, tuples, dicts, sets, a few stdlib
  containers, iterators materialised), decoded by the judge into fresh objects of the real types,
  so the comparisons (``==``, ``set(...)``, ``math.isclose``) are the judge's own code on the
  judge's own objects. An object with a lying ``__eq__``, a patched ``AssertionError`` or
  ``builtins``, a fake "passed" line, an early ``os._exit(0)``, reading the caller's frame to copy
  the expected value: none of these reach the judge, which never runs program text.
  A program name that shadows a builtin (``def set(...)``) is not visible to the asserts, so
  the expected side of an assert (``set((4, 5))``) is never the program's to compute.
* The **verdict** is the judge's: "passed" only if every assert ran to the end in the judge. It
  goes to the scorer on the judge's stdout, authenticated with an HMAC under a per-run key that
  exists only in the scorer and in the judge (which reads it from stdin before the program
  exists), so bytes injected into that pipe (say through the scorer's ``/proc/<pid>/fd`` by a
  program of the same uid) are rejected. The judge is non-dumpable: a same-uid program cannot
  trace it, read its memory or open its file descriptors through ``/proc``.

So the only thing a program controls is what its functions return, which is what is being
graded.

Process tree, limits, what is isolated
=====================================

The judge starts in a new session, is a child sub-reaper (orphans of the program reparent to it,
not to init), is non-dumpable, and dies with the scorer (``PR_SET_PDEATHSIG``). The program runs
in its own session (``setsid``: ``killpg(0, …)`` and ``kill(getppid(), …)`` never reach the
scorer) with ``RLIMIT_AS``/``RLIMIT_DATA`` (memory), ``RLIMIT_CPU``, ``RLIMIT_FSIZE``,
``RLIMIT_NOFILE``, ``RLIMIT_CORE`` = 0 and ``RLIMIT_NPROC`` (its uid's processes now +
``max_processes``), ``PR_SET_NO_NEW_PRIVS``, stdin from ``/dev/null``, a scrubbed environment
(``HOME``/``TMPDIR`` = its own temporary directory, removed afterwards), no inherited file
descriptor but stdout/stderr (captured, capped) and its two call pipes, and non-dumpable itself.

What else holds depends on the machine; ``SandboxResult.isolation`` says what was in force:

* **As root** (CI, containers): the program runs as ``nobody`` (``isolation`` has
  ``uid=nobody``), so it cannot signal, trace or read the memory of the scorer or the judge, and
  ``RLIMIT_NPROC`` bounds its forks. Its interpreter is the first that ``nobody`` can run: the
  scorer's, the scorer's base interpreter (outside a virtual environment under ``/root``), or the
  system's ``python3``; if there is none, scoring fails closed (status ``error``; pass
  ``python=``) rather than run the program as root.
* **Namespaces** (root, or an unprivileged user where the kernel allows user namespaces): the
  program is PID 1 of a new PID namespace (``pidns``) with a fresh network namespace (``netns``:
  no network, not even the host's loopback) and its own ``/proc`` (``procfs``: it sees no other
  process). When it ends, the kernel kills every process left in the namespace, ``setsid`` and
  double-forked grandchildren included: nothing it started outlives the call.
* **Neither** (an unprivileged user where user namespaces are disabled, or ``namespaces=False``
  when not root): ``uid=same``. The judge kills every descendant it can find (sub-reaper + a
  ``/proc`` sweep), which catches ``setsid``/double-fork grandchildren. But the program runs as
  *your* user: it can kill the judge (the run then fails, closed) or the scorer itself, read the
  scorer's environment and, where Yama's ``ptrace_scope`` is 0, the scorer's memory (and so, in
  principle, its key and verdicts); a program that kills the judge first can leave processes
  behind. The network is open.

Never isolated, in any mode: **file-system reads** (anything the uid can read: as your user,
your home, tokens and keys included; as ``nobody``, world-readable files), **file-system
writes** wherever the uid may write (as your user, all your files; as ``nobody``,
world-writable places such as ``/tmp``), CPU time up to the limits, and other programs scored
concurrently by the same uid (they share its files and its process limit and, without
namespaces, can signal each other, which makes runs fail). Memory limits are per process: a
program may use up to (``max_processes`` + 1) × ``memory_mb``. Linux only for the namespaces,
the sub-reaper and the ``/proc`` sweep. This is hardening for benchmark scoring, not a security
boundary: run untrusted generations inside a container or VM, as the evalplus and human-eval
authors advise.

Semantics (vs running code + asserts in one namespace)
=====================================================

An assert passes here exactly when it would with the program's functions returning the same
values, with these deliberate differences. Objects of other types (instances of the program's or
the setup code's classes, numpy arrays, …) stay in the program: the asserts hold a handle whose
calls, attributes, items, ``len``, truth, iteration and ``str`` are answered by the program, but
whose ``==`` is identity (and ordering raises), so such a value never equals a literal; they can be
passed back as arguments. Mutations a function makes to its arguments are not seen by the
asserts; program names that shadow builtins are ignored; modules and standard-library functions
the program imported are the judge's own import of the same module (other modules are
unavailable to the asserts), and a name the asserts use as ``name.attr`` that is a standard-library
module is always the judge's module (``math.isclose`` in an assert is the real one, even if the
program bound ``math`` to something else). The task's setup code runs in the program, before its code, as in
one namespace. As root, the program's interpreter may be the system's Python (see above).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

# (the scorer's side imports secrets, selectors, shutil, subprocess and tempfile where it uses
# them: the judge runs this file too, and starts faster without them)

__all__ = ["SandboxResult", "run_program"]

STATUSES = ("passed", "failed", "timeout", "no_result", "error")


@dataclass
class SandboxResult:
    passed: bool
    status: str  # passed | failed | timeout | no_result | error
    detail: str = ""
    elapsed: float = 0.0
    stdout: str = ""
    stderr: str = ""
    output_bytes: int = 0
    truncated: bool = False
    isolation: str = ""  # what was in force, e.g. "uid=nobody,pidns,netns,procfs,subreaper,nproc"


# ---------------------------------------------------------------------------------------------
# The value codec and framing, shared by judge and program (the program gets it as source text).
# Values are JSON: null / bool / int / float / str / list as themselves, every other type as a
# {"T": tag, "v": ...} object. Decoding builds fresh objects of the real types and nothing else.
# ---------------------------------------------------------------------------------------------

_CODEC = r'''
import collections as _co
import collections.abc as _abc
import decimal as _dec
import fractions as _frac
import json as _json
import operator as _op
import os as _os

_MAX_ITEMS = 1000000
_MAX_FRAME = 8 * 1024 * 1024
_FACTORIES = {t.__name__: t for t in (int, float, complex, str, bytes, bool, list, tuple, dict, set, frozenset)}
_KEYS, _VALUES, _ITEMS = type({}.keys()), type({}.values()), type({}.items())


class _Budget:
    __slots__ = ("left",)

    def __init__(self, n):
        self.left = n

    def take(self):
        self.left -= 1
        if self.left < 0:
            raise ValueError("value too large to pass between the program and the tests")


def encode(x, ref=None, budget=None):
    """x as JSON-able data. Another object becomes ``ref(x)`` (a handle) if ``ref`` is given, else
    a TypeError."""
    b = budget if budget is not None else _Budget(_MAX_ITEMS)

    def tag(t, v):
        return {"T": t, "v": v}

    def seq(xs):
        return [enc(v) for v in xs]

    def pairs(d):
        return [[enc(k), enc(v)] for k, v in d.items()]

    def enc(x):
        b.take()
        t = type(x)
        if x is None or t is bool or t is str or t is float:
            return x
        if t is int:
            return x if x.bit_length() < 4000 else tag("I", format(x, "x"))
        if t is list:
            return seq(x)
        if t is tuple:
            return tag("t", seq(x))
        if t is dict:
            return tag("d", pairs(x))
        if t is set:
            return tag("s", seq(x))
        if t is frozenset:
            return tag("fs", seq(x))
        if isinstance(x, int):
            return enc(int.__index__(x))
        if isinstance(x, float):
            return float.__float__(x)
        if isinstance(x, str):
            return str.__str__(x)
        if isinstance(x, complex):
            return tag("c", [complex.__complex__(x).real, complex.__complex__(x).imag])
        if isinstance(x, bytearray):
            return tag("ba", bytes(x).hex())
        if isinstance(x, bytes):
            return tag("b", bytes(x).hex())
        if isinstance(x, _co.OrderedDict):
            return tag("od", pairs(x))
        if isinstance(x, _co.Counter):
            return tag("ctr", pairs(x))
        if isinstance(x, _co.defaultdict):
            f = x.default_factory
            name = f.__name__ if f is not None and _FACTORIES.get(getattr(f, "__name__", None)) is f else None
            return tag("dd", [name, pairs(x)])
        if isinstance(x, dict):
            return tag("d", pairs(x))
        if isinstance(x, tuple):
            return tag("t", seq(x))
        if isinstance(x, list):
            return seq(x)
        if isinstance(x, frozenset):
            return tag("fs", seq(x))
        if isinstance(x, set):
            return tag("s", seq(x))
        if isinstance(x, _co.deque):
            return tag("dq", [x.maxlen, seq(x)])
        if isinstance(x, range):
            return tag("r", [enc(x.start), enc(x.stop), enc(x.step)])
        if isinstance(x, _dec.Decimal):
            return tag("dec", str(x))
        if isinstance(x, _frac.Fraction):
            return tag("fr", [enc(x.numerator), enc(x.denominator)])
        if t is _KEYS:
            return tag("dk", seq(x))
        if t is _VALUES:
            return tag("dv", seq(x))
        if t is _ITEMS:
            return tag("di", seq(x))
        if isinstance(x, _abc.Iterator):
            return tag("it", seq(x))
        if hasattr(t, "__index__") and not callable(x):
            return enc(_op.index(x))
        if ref is not None:
            return ref(x)
        raise TypeError("a value of type %s cannot pass between the program and the tests" % t.__name__)

    return enc(x)


def decode(x, deref=None, budget=None):
    """The value ``encode`` described, as fresh built-in objects; ValueError on anything else."""
    b = budget if budget is not None else _Budget(_MAX_ITEMS)

    def bad():
        return ValueError("malformed value")

    def lst(v):
        if type(v) is not list:
            raise bad()
        return [dec(i) for i in v]

    def pairs(v):
        if type(v) is not list:
            raise bad()
        out = []
        for p in v:
            if type(p) is not list or len(p) != 2:
                raise bad()
            out.append((dec(p[0]), dec(p[1])))
        return out

    def ints(v, n):
        out = lst(v)
        if len(out) != n or any(type(i) is not int for i in out):
            raise bad()
        return out

    def text(v):
        if type(v) is not str:
            raise bad()
        return v

    def dec(x):
        b.take()
        t = type(x)
        if x is None or t is bool or t is int or t is float or t is str:
            return x
        if t is list:
            return lst(x)
        if t is not dict or len(x) != 2 or "T" not in x or "v" not in x:
            raise bad()
        g, v = x["T"], x["v"]
        if g == "t":
            return tuple(lst(v))
        if g == "d":
            return dict(pairs(v))
        if g == "s":
            return set(lst(v))
        if g == "fs":
            return frozenset(lst(v))
        if g == "I":
            return int(text(v), 16)
        if g == "c":
            re_im = lst(v)
            if len(re_im) != 2 or any(type(i) is not float for i in re_im):
                raise bad()
            return complex(*re_im)
        if g == "b":
            return bytes.fromhex(text(v))
        if g == "ba":
            return bytearray.fromhex(text(v))
        if g == "od":
            return _co.OrderedDict(pairs(v))
        if g == "ctr":
            return _co.Counter(dict(pairs(v)))
        if g == "dd":
            if type(v) is not list or len(v) != 2 or not (v[0] is None or v[0] in _FACTORIES):
                raise bad()
            return _co.defaultdict(_FACTORIES.get(v[0]), pairs(v[1]))
        if g == "dq":
            if type(v) is not list or len(v) != 2 or not (v[0] is None or (type(v[0]) is int and v[0] >= 0)):
                raise bad()
            return _co.deque(lst(v[1]), v[0])
        if g == "r":
            return range(*ints(v, 3))
        if g == "dec":
            return _dec.Decimal(text(v))
        if g == "fr":
            return _frac.Fraction(*ints(v, 2))
        if g == "dk":
            return dict.fromkeys(lst(v)).keys()
        if g == "dv":
            return dict(enumerate(lst(v))).values()
        if g == "di":
            items = lst(v)
            if any(type(i) is not tuple or len(i) != 2 for i in items):
                raise bad()
            return dict(items).items()
        if g == "it":
            return iter(lst(v))
        if g == "ref" and deref is not None:
            return deref(v)
        raise bad()

    return dec(x)


def _send(fd, obj):
    data = _json.dumps(obj, separators=(",", ":")).encode()
    if len(data) > _MAX_FRAME:
        raise ValueError("value too large to pass between the program and the tests")
    view = memoryview(len(data).to_bytes(4, "big") + data)
    while view:
        view = view[_os.write(fd, view):]


def _read_exact(fd, n):
    chunks = []
    while n:
        c = _os.read(fd, min(n, 1 << 20))
        if not c:
            raise EOFError("the other side closed the pipe")
        chunks.append(c)
        n -= len(c)
    return b"".join(chunks)


def _recv(fd):
    n = int.from_bytes(_read_exact(fd, 4), "big")
    if n > _MAX_FRAME:
        raise ValueError("oversized message")
    return _json.loads(_read_exact(fd, n))
'''

# The program's side: run the code, describe its names, answer calls. It holds no secret: the
# candidate may read or replace any of it, which only changes the values its functions return.
_SERVER = _CODEC + r'''
import builtins as _builtins
import sys as _sys
import types as _types

_STDLIB = getattr(_sys, "stdlib_module_names", frozenset())


def _fmt(e):
    try:
        msg = "%s: %s" % (type(e).__name__, e)
    except BaseException:
        msg = "exception"
    return msg[:300]


def _flush():
    for s in (_sys.stdout, _sys.stderr):
        try:
            s.flush()
        except BaseException:
            pass


def _describe(v, ref):
    if isinstance(v, _types.ModuleType):
        return {"k": "mod", "m": str(v.__name__)}
    if callable(v):
        mod, qual = getattr(v, "__module__", None), getattr(v, "__qualname__", None)
        if type(mod) is str and type(qual) is str and mod.partition(".")[0] in _STDLIB:
            obj = _sys.modules.get(mod)
            for part in qual.split("."):
                obj = getattr(obj, part, None)
            if obj is v:
                return {"k": "std", "m": mod, "q": qual}
        return {"k": "val", "v": ref(v)}
    try:
        return {"k": "val", "v": encode(v, ref, _Budget(100000))}
    except BaseException:
        return {"k": "val", "v": ref(v)}


def _answer(req, deref, ref):
    """What the judge asked about one of our objects, as data (or a handle)."""
    op, obj = req["op"], deref(req["h"])
    if op == "call":
        return obj(*decode(req["a"], deref), **decode(req["k"], deref))
    if op == "attr":
        name = req["n"]
        if type(name) is not str or name.startswith("__"):
            raise AttributeError(name)
        return getattr(obj, name)
    if op == "item":
        return obj[decode(req["a"], deref)]
    if op == "len":
        return len(obj)
    if op == "bool":
        return bool(obj)
    if op == "iter":
        return list(obj)
    if op == "str":
        return str.__str__(str(obj))
    if op == "repr":
        return str.__str__(repr(obj))
    raise ValueError("unknown request")


def _serve():
    try:
        import ctypes
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: other programs of this uid can't trace us
    except BaseException:
        pass
    job = _recv(3)
    handles, index = [], {}

    def ref(obj):  # an object that stays here; the judge gets a handle
        if id(obj) not in index:
            index[id(obj)] = len(handles)
            handles.append(obj)
        return {"T": "ref", "v": index[id(obj)]}

    def deref(h):
        if type(h) is not int or not 0 <= h < len(handles):
            raise ValueError("unknown object handle")
        return handles[h]

    ns = {"__name__": "solution", "__builtins__": _builtins}
    try:
        exec(compile(job["code"], "solution.py", "exec"), ns)
    except BaseException as e:
        _flush()
        _send(4, {"raise": _fmt(e)})
        _os._exit(1)
    names = {}
    for name, v in list(ns.items()):
        if type(name) is str and not name.startswith("__"):
            try:
                names[name] = _describe(v, ref)
            except BaseException:
                pass
    _flush()
    _send(4, {"names": names})
    while True:
        try:
            req = _recv(3)
        except EOFError:
            _flush()
            _os._exit(0)
        try:
            out = {"ok": encode(_answer(req, deref, ref), ref)}
        except BaseException as e:
            out = {"raise": _fmt(e)}
        _flush()
        try:
            _send(4, out)
        except ValueError as e:
            _send(4, {"raise": _fmt(e)})


_serve()
'''

_codec: dict = {}
exec(compile(_CODEC, "<sandbox codec>", "exec"), _codec)
encode, decode, _send, _recv = _codec["encode"], _codec["decode"], _codec["_send"], _codec["_recv"]


# ---------------------------------------------------------------------------------------------
# The judge (runs as ``python -I -S sandbox.py``; trusted; never executes program text)
# ---------------------------------------------------------------------------------------------

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 2, 4, 8, 1 << 14, 1 << 18
# stdlib modules the judge will not import on a program's say-so (side effects at import)
_NO_IMPORT = {"antigravity", "this", "turtle", "turtledemo", "tkinter", "idlelib", "webbrowser", "pydoc", "ensurepip",
              "venv", "idle", "__main__", "__phello__", "test", "lib2to3", "pdb", "code", "site", "sitecustomize"}


class _Deadline(BaseException):
    pass


class _Broken(BaseException):
    """The program stopped answering (exited, closed its pipes, or sent garbage)."""


class ProgramError(Exception):
    """A function of the program raised, or its answer could not be read."""


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return None


def _call(libc, fn: str, *args) -> bool:
    """``libc.fn(*args) == 0``; ints go as unsigned longs, bytes / None as pointers."""
    import ctypes

    if libc is None:
        return False
    conv = [a if a is None or isinstance(a, bytes) else ctypes.c_ulong(a) for a in args]
    return getattr(libc, fn)(*conv) == 0


def _prctl(libc, option: int, arg: int) -> bool:
    return _call(libc, "prctl", option, arg, 0, 0, 0)


def _write(path: str, data: str) -> None:
    with open(path, "w") as f:
        f.write(data)


def _enter_userns(libc, uid: int, gid: int) -> bool:
    if not _call(libc, "unshare", _CLONE_NEWUSER):
        return False
    try:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    except OSError:
        return False
    return True


def _kernel() -> tuple[int, int]:
    try:
        major, minor = os.uname().release.split(".")[:2]
        return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
    except ValueError:
        return (0, 0)


def _probe(fn) -> bool:
    """Run ``fn`` in a throw-away child (namespaces can half-succeed; try them there first)."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if fn() else 1)
        except BaseException:
            os._exit(1)
    _, st = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(st) == 0


def _descendants(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
            ppid = int(data[data.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        for c in kids.get(todo.pop(), ()):
            out.append(c)
            todo.append(c)
    return out


def _reap_nohang() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _kill_everything(first: int | None, seconds: float = 5.0) -> bool:
    """SIGKILL ``first`` and every descendant of this process (orphans reparent to us: we are
    a sub-reaper), until none is left. True when the tree is empty."""
    if first:
        try:
            os.kill(first, signal.SIGKILL)
        except OSError:
            pass
    end = time.monotonic() + seconds
    while True:
        desc = _descendants(os.getpid())
        for p in desc:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        _reap_nohang()
        if not desc:
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.002)


def _count_tasks(uid: int) -> int:
    """Tasks (threads included, as RLIMIT_NPROC counts them) of ``uid`` on this machine."""
    n = 0
    try:
        names = os.listdir("/proc")
    except OSError:
        return 0
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                n += int(fields.get("Threads", "1"))
        except (OSError, ValueError, KeyError):
            continue
    return n


class _Unavailable:
    """A module of the program's that the judge will not import: any use raises."""

    def __init__(self, name: str, what: str):
        self.__dict__["_why"] = f"{name} ({what}) exists only inside the program and cannot be used by the tests"

    def __getattr__(self, attr):
        raise TypeError(self._why)

    def __call__(self, *a, **k):
        raise TypeError(self._why)

    def __iter__(self):
        raise TypeError(self._why)


class _Link:
    """The judge's end of the two pipes to the program: one request, one answer."""

    def __init__(self, wfd: int, rfd: int):
        self.wfd, self.rfd = wfd, rfd

    def send(self, obj) -> None:
        try:
            _send(self.wfd, obj)
        except OSError as e:
            raise _Broken(f"the program stopped reading ({e.strerror})") from None

    def recv(self) -> dict:
        try:
            msg = _recv(self.rfd)
        except EOFError:
            raise _Broken("the program exited") from None
        except (ValueError, RecursionError, OSError) as e:
            raise _Broken(f"unreadable message from the program ({type(e).__name__})") from None
        if type(msg) is not dict or len(msg) != 1:
            raise _Broken("malformed message from the program")
        return msg

    def deref(self, h):
        if type(h) is not int or h < 0:
            raise ValueError("bad object handle")
        return _Remote(self, h, "an object of the program")

    def ask(self, op: str, h: int, **fields):
        """One question about the program's object ``h``; the answer as judge-side data."""

        def ref(obj):
            if isinstance(obj, _Remote) and obj._link is self:
                return {"T": "ref", "v": obj._h}
            raise TypeError(f"a {type(obj).__name__} of the tests cannot be passed to the program")

        self.send({"op": op, "h": h, **{k: encode(v, ref) for k, v in fields.items()}})
        msg = self.recv()
        if "ok" in msg:
            try:
                return decode(msg["ok"], self.deref)
            except (ValueError, TypeError, RecursionError, OverflowError) as e:
                raise ProgramError(f"the program's answer could not be read: {type(e).__name__}: {e}"[:300]) from None
        if type(msg.get("raise")) is str:
            raise ProgramError(msg["raise"][:300])
        raise _Broken("malformed reply from the program")


class _Remote:
    """An object that lives in the program (a function, a class, an instance), seen from the tests.

    Calling it, its attributes, items, ``len``, ``bool``, iteration and ``str`` are questions to
    the program, answered with data: they reveal nothing of the test to the program beyond the
    arguments the test passes. Comparisons are *not* forwarded (``==`` is identity, ordering
    raises): otherwise an object could see the expected value and agree with it.
    """

    __slots__ = ("_link", "_h", "_name")

    def __init__(self, link: _Link, h: int, name: str):
        self._link, self._h, self._name = link, h, name

    def _typed(self, op: str, want: type):
        value = self._link.ask(op, self._h)
        if type(value) is not want:
            raise TypeError(f"the program answered {op}() with a {type(value).__name__}")
        return value

    def __call__(self, *args, **kwargs):
        return self._link.ask("call", self._h, a=list(args), k=dict(kwargs))

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._link.ask("attr", self._h, n=name)

    def __getitem__(self, key):
        return self._link.ask("item", self._h, a=key)

    def __len__(self):
        return self._typed("len", int)

    def __bool__(self):
        return self._typed("bool", bool)

    def __iter__(self):
        return iter(self._typed("iter", list))

    def __str__(self):
        return self._typed("str", str)

    def __repr__(self):
        return f"<{self._name}>"


def _import(name: str):
    import importlib

    if name.partition(".")[0] not in sys.stdlib_module_names or name.partition(".")[0] in _NO_IMPORT:
        raise ImportError(name)
    return importlib.import_module(name)


def _bind(link: _Link, names: dict) -> dict:
    """The asserts' view of the program's names: data as data, objects as ``_Remote`` handles,
    modules and stdlib functions as the judge's own; never a name that shadows a builtin."""
    import builtins

    out = {}
    if type(names) is not dict:
        raise _Broken("malformed names from the program")
    for name, d in list(names.items())[:100000]:
        if type(name) is not str or not name.isidentifier() or name.startswith("__") or hasattr(builtins, name):
            continue
        kind = d.get("k") if type(d) is dict else None
        try:
            if kind == "val":
                out[name] = decode(d["v"], link.deref)
                if isinstance(out[name], _Remote):
                    out[name]._name = name
            elif kind == "mod":
                out[name] = _import(d["m"])
            elif kind == "std":
                obj = _import(d["m"])
                for part in str(d["q"]).split("."):
                    obj = getattr(obj, part)
                out[name] = obj
        except Exception:
            out[name] = _Unavailable(name, "a module or value the judge cannot rebuild")
    return out


def _module_names(tests: list[str], ns: dict) -> dict:
    """Names the asserts use as ``name.attr`` that are standard-library modules (``math`` in
    ``math.isclose(...)``): the judge's own module, whatever the program bound to that name, so
    that a program cannot supply the asserts' comparison helper. Names only called stay the
    program's (a task's function may be called ``string``)."""
    import ast

    out = {}
    for t in tests:
        try:
            tree = ast.parse(t)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ns:
                try:
                    out[node.value.id] = _import(node.value.id)
                except ImportError:
                    pass
    return out


def _fmt(e: BaseException) -> str:
    if isinstance(e, ProgramError):
        return str(e)[:300]
    try:
        return f"{type(e).__name__}: {e}"[:300]
    except Exception:
        return type(e).__name__


def _start_program(job: dict, libc, uid: int | None, gid: int | None, pidns: bool, nproc: int | None,
                   req_r: int, resp_w: int):
    """fork + exec the program's interpreter; returns (pid, procfs mounted)."""
    import fcntl
    import resource

    status_r, status_w = os.pipe()  # O_CLOEXEC: EOF when exec succeeds
    devnull = os.open(os.devnull, os.O_RDWR)
    pid = os.fork()
    if pid == 0:  # the child: everything here runs before any program code
        report = status_w
        try:
            os.setsid()  # its own session and group: killpg(0) and kill(-pgid) stay inside
            mounted = False
            if pidns and _call(libc, "unshare", _CLONE_NEWNS):  # a /proc that shows only its namespace
                if _call(libc, "mount", b"none", b"/", None, _MS_REC | _MS_PRIVATE, None):
                    mounted = _call(libc, "mount", b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)
            os.chdir(job["work"])
            src = [devnull, job["out_fd"], job["err_fd"], req_r, resp_w]
            moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in src]
            report = fcntl.fcntl(status_w, fcntl.F_DUPFD_CLOEXEC, 10)
            for i, fd in enumerate(moved):  # 0 /dev/null, 1 stdout, 2 stderr, 3 calls in, 4 answers out
                os.dup2(fd, i)
            os.closerange(5, report)
            os.closerange(report + 1, 1 << 16)

            def limit(res, value):
                try:
                    resource.setrlimit(res, (value, value))
                except (ValueError, OSError):
                    pass

            if job["memory"]:
                limit(resource.RLIMIT_AS, job["memory"])
                limit(resource.RLIMIT_DATA, job["memory"])
            limit(resource.RLIMIT_CPU, job["cpu"])
            limit(resource.RLIMIT_FSIZE, job["fsize"])
            limit(resource.RLIMIT_CORE, 0)
            limit(resource.RLIMIT_NOFILE, 64)
            if nproc is not None:
                limit(resource.RLIMIT_NPROC, nproc)
            if uid is not None:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1)
            _prctl(libc, _PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
            os.write(report, b"P" if mounted else b"-")
            os.execve(job["python"], [job["python"], "-I", "-c", _SERVER], job["env"])
        except BaseException as e:
            try:
                os.write(report, b"E" + _fmt(e).encode("utf-8", "replace"))
            finally:
                os._exit(127)
    os.close(status_w)
    os.close(devnull)
    chunks = []
    while True:
        c = os.read(status_r, 4096)
        if not c:
            break
        chunks.append(c)
    os.close(status_r)
    msg = b"".join(chunks)
    if msg not in (b"P", b"-"):
        why = msg[msg.find(b"E") + 1:].decode("utf-8", "replace") if b"E" in msg else "no message"
        raise RuntimeError(f"could not start the program: {why}")
    return pid, msg == b"P"


def _exit_detail(state: dict) -> str:
    """How the program process ended (reaps it: ``state["pid"]`` becomes None)."""
    pid = state["pid"]
    for _ in range(100):
        try:
            got, st = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            state["pid"] = None
            return ""
        if got:
            state["pid"] = None
            code = os.waitstatus_to_exitcode(st)
            if code < 0:
                try:
                    return f"killed by {signal.Signals(-code).name}"
                except ValueError:
                    return f"killed by signal {-code}"
            return f"exit code {code}"
        time.sleep(0.003)
    return "still running"


def _judge(job: dict) -> dict:
    libc = _libc()
    iso: list[str] = []
    if libc is not None:
        _prctl(libc, _PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != job["parent"]:
            return {"status": "error", "detail": "the scorer went away", "isolation": ""}
        if _prctl(libc, _PR_SET_CHILD_SUBREAPER, 1):
            iso.append("subreaper")
    uid = gid = None
    if os.geteuid() == 0:
        uid, gid = job["nobody"]
        os.chown(job["work"], uid, gid)
        iso.insert(0, "uid=nobody")
    else:
        iso.insert(0, "uid=same")
    # RLIMIT_NPROC counts the uid's tasks: those running now (in the host's view, so before any
    # user namespace, where every other user's process would look like the overflow uid) + the
    # program's allowance. Since Linux 5.14 a new user namespace counts its own tasks from 0.
    nproc = None
    if job["max_processes"] is not None:
        nproc = _count_tasks(uid if uid is not None else os.getuid()) + int(job["max_processes"])
    pidns = False
    if job["namespaces"] and libc is not None:
        flags = _CLONE_NEWPID | _CLONE_NEWNET
        if uid is None:
            me, my_gid = os.getuid(), os.getgid()
            if _probe(lambda: _enter_userns(libc, me, my_gid) and _call(libc, "unshare", flags)):
                if _enter_userns(libc, me, my_gid):
                    iso.append("userns")
                    pidns = _call(libc, "unshare", flags)
                    if nproc is not None and _kernel() >= (5, 14):
                        nproc = 2 + int(job["max_processes"])  # this judge and the program, then its allowance
        else:
            pidns = _call(libc, "unshare", flags)
        if pidns:
            iso += ["pidns", "netns"]
    if libc is not None:
        _prctl(libc, _PR_SET_DUMPABLE, 0)  # after the uid maps (a non-dumpable process cannot write them)
    if job["max_processes"] is not None:
        iso.append("nproc")

    def alarm(signum, frame):
        raise _Deadline()

    signal.signal(signal.SIGALRM, alarm)
    state: dict = {"pid": None}
    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    verdict: dict
    try:
        signal.setitimer(signal.ITIMER_REAL, max(0.01, job["timeout"]))
        try:
            state["pid"], procfs = _start_program(job, libc, uid, gid, pidns, nproc, req_r, resp_w)
        except RuntimeError as e:
            return {"status": "error", "detail": str(e)[:500], "isolation": ",".join(iso)}
        if procfs:
            iso.insert(iso.index("netns") + 1, "procfs")
        for fd in (req_r, resp_w, job["out_fd"], job["err_fd"]):
            os.close(fd)
        link = _Link(req_w, resp_r)
        verdict = _run_tests(link, job, state)
    except _Deadline:
        verdict = {"status": "timeout", "detail": f"killed after {job['timeout']:g} s"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for fd in (req_w, resp_r):
            try:
                os.close(fd)
            except OSError:
                pass
        if not _kill_everything(state["pid"]):
            iso.append("LEFTOVERS")
    verdict["isolation"] = ",".join(iso)
    return verdict


def _run_tests(link: _Link, job: dict, state: dict) -> dict:
    import builtins

    try:
        link.send({"code": job["setup"] + "\n" + job["code"]})
        first = link.recv()
        if "raise" in first:
            return {"status": "failed", "detail": str(first["raise"])[:300]}
        if "names" not in first:
            raise _Broken("malformed first message from the program")
        # every name the asserts take from the task's setup code or the program is the program's
        # (the setup ran there, before the code, as in one namespace); the rest is the judge's
        ns: dict = {"__name__": "__tests__", "__builtins__": builtins}
        ns.update(_bind(link, first["names"]))
        ns.update(_module_names(job["tests"], ns))
        for i, t in enumerate(job["tests"]):
            try:
                exec(compile(t, f"test_{i}", "exec"), ns)
            except (_Broken, _Deadline):
                raise
            except BaseException as e:
                return {"status": "failed", "detail": _fmt(e)}
        return {"status": "passed", "detail": ""}
    except _Broken as e:
        why = _exit_detail(state)
        return {"status": "no_result", "detail": f"the program ended without a verdict ({e}{'; ' + why if why else ''})"}


def _judge_main() -> int:
    job = json.loads(sys.stdin.buffer.read())
    key = bytes.fromhex(job.pop("key"))
    try:
        verdict = _judge(job)
    except _Deadline:  # (only in the instant before the timer is disarmed)
        verdict = {"status": "timeout", "detail": f"killed after {job['timeout']:g} s", "isolation": ""}
    except Exception as e:  # a bug or an unusable machine: say so, never "passed"
        verdict = {"status": "error", "detail": f"judge: {_fmt(e)}", "isolation": ""}
    body = json.dumps(verdict, sort_keys=True)
    mac = hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
    os.write(1, f"{body} {mac}\n".encode())
    return 0


# ---------------------------------------------------------------------------------------------
# The scorer's side
# ---------------------------------------------------------------------------------------------

_INTERPRETERS: dict[tuple, str | None] = {}
_INTERPRETERS_LOCK = threading.Lock()


def _nobody() -> tuple[int, int]:
    try:
        import pwd

        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except (ImportError, KeyError):
        return 65534, 65534


def _interpreter(python: str | None, nobody: tuple[int, int] | None) -> str | None:
    """The interpreter for the program: ``python`` or this one; as root, the first of these (then
    the base interpreter, then the system's ``python3``) that ``nobody`` can run; None if none."""
    import shutil
    import subprocess

    options = [python] if python else [sys.executable, getattr(sys, "_base_executable", None)]
    if nobody is None:
        return options[0]
    if not python:
        options += [shutil.which(n, path="/usr/local/bin:/usr/bin:/bin") for n in (f"python{sys.version_info[0]}.{sys.version_info[1]}", "python3")]
    key = (tuple(options), nobody)
    with _INTERPRETERS_LOCK:  # score_mbpp's worker threads: probe once, the others wait for it
        if key not in _INTERPRETERS:
            found = None
            for py in dict.fromkeys(o for o in options if o):
                try:
                    ok = subprocess.run([py, "-I", "-S", "-c", "import json, collections, decimal, fractions"],
                                        user=nobody[0], group=nobody[1], extra_groups=[], cwd="/",
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env={"PATH": os.defpath}, timeout=30).returncode == 0
                except (OSError, subprocess.SubprocessError):
                    ok = False
                if ok:
                    found = py
                    break
            _INTERPRETERS[key] = found
        return _INTERPRETERS[key]


def _rmtree(path: str) -> None:
    import shutil

    def onerror(func, p, exc):  # a program may have chmod-ed its files
        try:
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    for root, dirs, _ in os.walk(path):
        for d in dirs:
            try:
                os.chmod(os.path.join(root, d), 0o700)
            except OSError:
                pass
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=onerror)
    else:  # pragma: no cover
        shutil.rmtree(path, onerror=onerror)


def _verdict(raw: bytes, key: bytes) -> dict | None:
    """The judge's verdict if ``raw`` is exactly one line carrying a valid HMAC, else None."""
    if raw.count(b"\n") != 1 or not raw.endswith(b"\n"):
        return None
    body, _, mac = raw[:-1].rpartition(b" ")
    want = hmac.new(key, body, hashlib.sha256).hexdigest().encode()
    if not hmac.compare_digest(mac, want):
        return None
    try:
        v = json.loads(body)
    except ValueError:
        return None
    if type(v) is not dict or v.get("status") not in STATUSES:
        return None
    return v


def run_program(
    code: str,
    tests: list[str],
    setup_code: str = "",
    *,
    timeout: float = 10.0,
    memory_mb: int | None = 2048,
    max_output_bytes: int = 64 * 1024,
    max_file_bytes: int = 16 * 1024 * 1024,
    max_processes: int | None = 16,
    python: str | None = None,
    namespaces: bool = True,
) -> SandboxResult:
    """Run ``setup_code + code`` in a sandboxed process and the asserts ``tests`` in a judge that
    calls into it (see the module docstring for the design, the guarantees and their limits).

    ``timeout``: wall clock for the whole run (start, code, all asserts); ``memory_mb``: address
    space per process; ``max_processes``: forks/threads the program may add (None: no limit);
    ``namespaces=False`` skips the PID/network/user namespaces (the rest still applies).
    """
    import secrets
    import selectors
    import subprocess
    import tempfile

    start = time.monotonic()
    key = secrets.token_bytes(32)
    root = os.geteuid() == 0
    nobody = _nobody() if root else None
    py = _interpreter(python, nobody)
    if py is None:
        return SandboxResult(False, "error", "sandbox: running as root and no Python interpreter is executable by the "
                             "unprivileged user 'nobody' (pass python=... or score as a non-root user)")
    work = tempfile.mkdtemp(prefix="skill-editor-mbpp-")
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    proc = None
    try:
        job = {
            "key": key.hex(),
            "code": code,
            "setup": setup_code or "",
            "tests": [str(t) for t in tests],
            "timeout": float(timeout),
            "memory": int(memory_mb) * 1024 * 1024 if memory_mb else 0,
            "cpu": max(1, int(-(-timeout // 1)) + 1),
            "fsize": int(max_file_bytes),
            "max_processes": None if max_processes is None else int(max_processes),
            "work": work,
            "out_fd": out_w,
            "err_fd": err_w,
            "python": py,
            "nobody": list(nobody) if nobody else None,
            "namespaces": bool(namespaces),
            "parent": os.getpid(),
            "env": {
                "HOME": work, "TMPDIR": work, "TEMP": work, "TMP": work, "PATH": os.defpath,
                "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1",
            },
        }
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__)],
            cwd="/",
            env={"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(out_w, err_w),
            close_fds=True,
            start_new_session=True,
        )
        os.close(out_w)
        os.close(err_w)
        out_w = err_w = -1
        try:
            proc.stdin.write(json.dumps(job).encode())
            proc.stdin.close()
        except OSError:
            pass
        j_out, j_err = proc.stdout.fileno(), proc.stderr.fileno()
        caps = {out_r: max_output_bytes, err_r: max_output_bytes, j_out: 1 << 20, j_err: 64 * 1024}
        bufs = {fd: bytearray() for fd in caps}
        total = dict.fromkeys(caps, 0)
        sel = selectors.DefaultSelector()
        for fd in caps:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        backstop = start + timeout + 15.0  # the judge enforces ``timeout``; this only guards the judge
        grace_until = None
        killed = False
        while sel.get_map():
            now = time.monotonic()
            if not killed and now >= backstop:
                killed = True
                _killpg(proc)
                grace_until = now + 1.0
            if grace_until is None and proc.poll() is not None:
                grace_until = now + 1.0  # the judge has swept the program's tree; pipes close now
            if grace_until is not None and now >= grace_until:
                break
            limit = (grace_until if grace_until is not None else backstop) - now
            for k, _ in sel.select(timeout=max(0.0, min(0.05, limit))):
                try:
                    chunk = os.read(k.fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(k.fd)
                    continue
                total[k.fd] += len(chunk)
                room = caps[k.fd] - len(bufs[k.fd])
                if room > 0:
                    bufs[k.fd] += chunk[:room]
        sel.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _killpg(proc)
            proc.wait()
        common = dict(
            elapsed=time.monotonic() - start,
            stdout=bytes(bufs[out_r]).decode("utf-8", "replace"),
            stderr=bytes(bufs[err_r]).decode("utf-8", "replace"),
            output_bytes=total[out_r] + total[err_r],
            truncated=total[out_r] > len(bufs[out_r]) or total[err_r] > len(bufs[err_r]),
        )
        v = _verdict(bytes(bufs[j_out]), key) if proc.returncode == 0 and not killed else None
        if v is None:
            rc = proc.returncode
            if killed:
                return SandboxResult(False, "timeout", f"the sandbox did not finish within {timeout:g} s", **common)
            if rc is not None and rc < 0:
                return SandboxResult(False, "no_result", f"the sandbox's judge was killed (signal {-rc})", **common)
            tail = bytes(bufs[j_err]).decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            return SandboxResult(False, "error", f"sandbox error: judge exit code {rc}: {tail[0][:300]}", **common)
        return SandboxResult(v["status"] == "passed", v["status"], str(v.get("detail", ""))[:500],
                             isolation=str(v.get("isolation", "")), **common)
    except OSError as e:
        return SandboxResult(False, "error", f"sandbox error: {e}", elapsed=time.monotonic() - start)
    finally:
        if proc is not None:
            if proc.poll() is None:
                _killpg(proc)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            for s in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    s.close()
                except OSError:
                    pass
        for fd in (out_r, err_r, out_w, err_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        _rmtree(work)


def _killpg(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.kill()
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(_judge_main())
