"""The MBPP sandbox against hostile programs (issue 15, item 6): the verdict cannot be forged,
nothing the program starts outlives the call, the scorer cannot be killed, limits hold.

The tests that kill things run the scorer in a subprocess of its own, so that a regression shows
as a failed test, not as a dead test runner.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from functools import lru_cache
from pathlib import Path

import pytest

from editor.eval import sandbox
from editor.eval.scorers import execute_mbpp

ROOT = Path(__file__).resolve().parents[1]
ADD = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
IS_ROOT = os.geteuid() == 0


def run(code, tests=ADD_TESTS, **kw):
    kw.setdefault("timeout", 10)
    return execute_mbpp(code, tests, **kw)


@lru_cache(maxsize=None)
def isolation(namespaces: bool = True) -> str:
    res = run(ADD, namespaces=namespaces)
    assert res.passed, res
    return res.isolation


@pytest.fixture
def shared_dir():
    """A directory every uid may write (the program may run as ``nobody``)."""
    d = tempfile.mkdtemp(prefix="sandbox-test-", dir="/tmp")
    os.chmod(d, 0o777)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the verdict: only what the program's functions return counts
# ---------------------------------------------------------------------------------------------

FORGERIES = {
    # the old driver kept its "passed" line and the report fd in __main__'s globals
    "driver_globals": (
        "import __main__, os\n"
        "for v in list(vars(__main__).values()):\n"
        "    if isinstance(v, bytes) and v.endswith(b'passed\\n'):\n"
        "        os.write(getattr(__main__, '_fd', 3), v)\n"
        "os._exit(0)\n"
    ),
    # a fake marker on every descriptor, then a clean exit before any assert
    "fake_marker_everywhere": (
        "import os\n"
        "for fd in range(1, 20):\n"
        "    try:\n"
        "        os.write(fd, b'passed\\n')\n"
        "    except OSError:\n"
        "        pass\n"
        "os._exit(0)\n" + WRONG
    ),
    "sys_exit_0": "import sys\nsys.exit(0)\n" + WRONG,
    "raise_system_exit": "raise SystemExit(0)\n" + WRONG,
    "os_exit_0": "import os\nos._exit(0)\n" + WRONG,
    "exit_inside_the_call": "import os\ndef add(a, b):\n    os._exit(0)\n",
    # the driver runs the asserts with the program's builtins
    "patched_exec": "import builtins\nbuiltins.exec = lambda *a, **k: None\n" + WRONG,
    "patched_assertion_error": "import builtins\nbuiltins.AssertionError = type('X', (Exception,), {})\n" + WRONG,
    "patched_compile": "import builtins\n_c = builtins.compile\nbuiltins.compile = lambda s, *a, **k: _c('pass', 'x', 'exec')\n" + WRONG,
    # answers that compare equal to anything
    "always_equal": "class E:\n    def __eq__(self, o):\n        return True\n\ndef add(a, b):\n    return E()\n",
    "lying_int": (
        "class I(int):\n    def __eq__(self, o):\n        return True\n    __hash__ = int.__hash__\n\n"
        "def add(a, b):\n    return I(a - b)\n"
    ),
    # copy the expected value out of the assert's own code object
    "frame_peek": (
        "import sys\n"
        "def add(a, b):\n"
        "    consts = [c for c in sys._getframe(1).f_code.co_consts if type(c) is int and c not in (a, b)]\n"
        "    return consts[-1] if consts else None\n"
    ),
    # a builtin the assert uses on its expected side, redefined by the program
    "shadowed_builtin": "def set(*a):\n    return 0\n\ndef f(x):\n    return 0\n",
    # the assert's comparison helper, supplied by the program
    "fake_math_module": (
        "class math:\n    isclose = staticmethod(lambda *a, **k: True)\n\n"
        "def area(r):\n    return 0\n"
    ),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_verdicts_fail(name):
    tests = {
        "shadowed_builtin": ["assert set(f((1, 2))) == set((4, 5))"],
        "fake_math_module": ["assert math.isclose(area(2), 12.566, rel_tol=1e-3)"],
    }.get(name, ADD_TESTS)
    res = run(FORGERIES[name], tests)
    assert not res.passed and res.status in ("failed", "no_result"), res


def test_verdict_needs_the_judges_key():
    key = b"k" * 32
    body = json.dumps({"status": "passed", "detail": "", "isolation": ""}, sort_keys=True).encode()
    import hashlib
    import hmac

    good = body + b" " + hmac.new(key, body, hashlib.sha256).hexdigest().encode() + b"\n"
    assert sandbox._verdict(good, key)["status"] == "passed"
    assert sandbox._verdict(good, b"x" * 32) is None  # another key
    assert sandbox._verdict(b'{"status": "passed"} 00\n', key) is None
    assert sandbox._verdict(good + good, key) is None  # anything injected besides the one line
    assert sandbox._verdict(b"junk\n" + good, key) is None


@pytest.mark.parametrize(
    "code,tests,setup",
    [
        ("def f(a, b):\n    return tuple(set(a) & set(b))", ["assert set(f((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))"], ""),
        ("from collections import Counter\ndef f(w):\n    return Counter(w).most_common(2)", ["assert f('aab') == [('a', 2), ('b', 1)]"], ""),
        ("import math\ndef f(r):\n    return math.pi * r * r", ["assert math.isclose(f(2), 12.566, rel_tol=1e-3)"], ""),
        ("def f():\n    return math.sqrt(16)", ["assert f() == 4.0"], "import math"),
        ("def f(n):\n    return (i * i for i in range(n))", ["assert list(f(3)) == [0, 1, 4]", "assert f(3) != [0, 1, 4]"], ""),
        ("def f(n):\n    return 2 ** n", ["assert f(20000) == 2 ** 20000", "assert f(3) == 8"], ""),
        ("def f(d):\n    return {k: v for k, v in d.items() if v}", ["assert f({1: 0, (2, 3): 'x'}) == {(2, 3): 'x'}"], ""),
        ("def f(x):\n    return None", ["assert f(1) is None"], ""),
        ("def f(s):\n    return s.encode(), bytearray(s.encode())", ["assert f('é') == (b'\\xc3\\xa9', bytearray(b'\\xc3\\xa9'))"], ""),
        ("def f():\n    return float('inf'), float('nan'), 0.1 + 0.2, -0.0, 1j", [
            "a, b, c, d, e = f()\nassert a == float('inf') and b != b and c == 0.30000000000000004 and str(d) == '-0.0' and e == 1j"], ""),
        ("R = 3\ndef f():\n    return R", ["assert f() == R == 3"], ""),
        ("def make(k):\n    return lambda x: x * k", ["assert make(3)(4) == 12"], ""),
        ("def sq(x):\n    return x * x\ndef apply(fn, xs):\n    return [fn(x) for x in xs]", ["assert apply(sq, [1, 2]) == [1, 4]"], ""),
        ("def f(x, *, scale=1):\n    return x * scale", ["assert f(2, scale=3) == 6"], ""),
        (
            "from collections import OrderedDict, defaultdict, deque\n"
            "def f():\n    d = defaultdict(list)\n    d[1].append(2)\n    return d, deque([1, 2], maxlen=3), OrderedDict(a=1)",
            ["d, q, o = f()\nassert d == {1: [2]} and d[5] == [] and q == deque([1, 2]) and q.maxlen == 3 and o == OrderedDict(a=1)"],
            "",
        ),
        ("def f(d):\n    return d.keys(), d.values(), d.items(), range(2, 9, 3)", [
            "k, v, i, r = f({1: 2})\nassert list(k) == [1] and list(v) == [2] and list(i) == [(1, 2)] and r == range(2, 9, 3)"], ""),
        ("from fractions import Fraction\nfrom decimal import Decimal\ndef f():\n    return Fraction(1, 3), Decimal('1.10'), frozenset({1})",
         ["assert f() == (Fraction(1, 3), Decimal('1.10'), frozenset({1}))"], ""),
        ("def f(xs):\n    xs.sort()\n    return xs", ["assert f([3, 1, 2]) == [1, 2, 3]"], ""),
        ("def string(s):\n    return s.upper()", ["assert string('ab') == 'AB'"], ""),  # a task named like a module
        ("def f(n):\n    raise ValueError('nope')", ["try:\n    f(1)\nexcept Exception:\n    pass\nelse:\n    assert False"], ""),
        # objects of the program's classes, built by the asserts (MBPP task 601's Pair)
        (
            "class Pair(object):\n    def __init__(self, a, b):\n        self.a = a\n        self.b = b\n"
            "def chain(arr, n):\n    return sum(1 for i in range(1, n) if arr[i].a > arr[i - 1].b) + 1\n",
            ["assert chain([Pair(5, 24), Pair(15, 25), Pair(27, 40), Pair(50, 60)], 4) == 3",
             "p = Pair(1, 2)\nassert p.a == 1 and p.b == 2 and str(p).startswith('<solution.Pair') and p"],
            "",
        ),
        # objects built by the task's setup code (binary-tree tasks)
        (
            "def height(node):\n    return 0 if node is None else 1 + max(height(node.left), height(node.right))\n",
            ["assert height(root) == 3", "assert height(root.left) == 2"],
            "class Node:\n    def __init__(self, d):\n        self.d, self.left, self.right = d, None, None\n"
            "root = Node(1)\nroot.left = Node(2)\nroot.right = Node(3)\nroot.left.left = Node(4)\n",
        ),
        # a custom container: iteration, len, items and truth are the program's answers
        (
            "class Bag:\n    def __init__(self, xs):\n        self.xs = list(xs)\n    def __iter__(self):\n        return iter(self.xs)\n"
            "    def __len__(self):\n        return len(self.xs)\n    def __getitem__(self, i):\n        return self.xs[i]\n"
            "def bag(*xs):\n    return Bag(xs)\n",
            ["b = bag(3, 1, 2)\nassert sorted(b) == [1, 2, 3] and len(b) == 3 and b[0] == 3 and b and 2 in b"],
            "",
        ),
    ],
)
def test_correct_programs_of_many_shapes_pass(code, tests, setup):
    res = run(code, tests, setup_code=setup)
    assert res.passed, res


def test_wrong_answers_and_objects_that_stay_in_the_program_fail():
    # an instance stays in the program: the assert compares against a handle (identity), and the
    # object's own __eq__ / __bool__ never see the expected value
    res = run("class P:\n    def __eq__(self, o):\n        return True\n    def __bool__(self):\n        return True\n\n"
              "def add(a, b):\n    return P()\n", ADD_TESTS + ["assert not (add(1, 2) != 3)"])
    assert not res.passed and res.status == "failed" and res.detail.startswith("AssertionError"), res
    res = run("def add(a, b):\n    return [a + b] * 10 ** 7\n")  # bigger than a message may be
    assert not res.passed and res.status == "failed" and "too large" in res.detail, res
    res = run("def add(a, b):\n    return 1 / 0\n")
    assert res.status == "failed" and res.detail.startswith("ZeroDivisionError"), res


# ---------------------------------------------------------------------------------------------
# the process tree: nothing the program starts outlives the call
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "no-namespaces"])
def test_setsid_grandchild_does_not_run_after_scoring(shared_dir, namespaces):
    started, late = shared_dir / "started", shared_dir / "late"
    code = (
        "import os, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.setsid()\n"  # leaves the program's session and process group
        "    if os.fork() == 0:\n"  # double fork: orphaned, reparented away from the program
        f"        open({str(started)!r}, 'w').write('x')\n"
        "        time.sleep(1.5)\n"
        f"        open({str(late)!r}, 'w').write('x')\n"
        "        os._exit(0)\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "for _ in range(500):\n"
        f"    if os.path.exists({str(started)!r}):\n"
        "        break\n"
        "    time.sleep(0.01)\n" + ADD
    )
    res = run(code, namespaces=namespaces)
    assert res.passed, res
    assert started.exists(), "the grandchild never ran: the test proves nothing"
    time.sleep(2.0)
    assert not late.exists(), f"a grandchild ran after scoring ({res.isolation})"


def _our_processes(tag: str) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/comm") as f:
                if f.read().strip() == tag:
                    out.append(int(name))
        except (OSError, ValueError):
            pass
    return out


# up to 200 children that sleep (named by the first line, so that the test can look for them)
FORK_200 = (
    "import ctypes, os, time\n"
    "TAG = b''\n"
    "n = 0\n"
    "for _ in range(200):\n"
    "    try:\n"
    "        pid = os.fork()\n"
    "    except OSError:\n"
    "        break\n"
    "    if pid == 0:\n"
    "        if TAG:\n"
    "            ctypes.CDLL(None).prctl(15, TAG, 0, 0, 0)\n"
    "        time.sleep(60)\n"
    "        os._exit(0)\n"
    "    n += 1\n"
    "print(n, flush=True)\n"
)


def test_fork_bomb_is_bounded_and_reaped():
    tag = "sbx" + uuid.uuid4().hex[:10]
    code = FORK_200.replace("TAG = b''", f"TAG = {tag.encode()!r}") + ADD
    t0 = time.monotonic()
    res = run(code, max_processes=8)
    assert res.passed, res
    assert int(res.stdout.split()[0]) <= 8, res.stdout  # RLIMIT_NPROC
    assert time.monotonic() - t0 < 8
    time.sleep(0.2)
    assert _our_processes(tag) == []


def test_exponential_fork_bomb_times_out_and_leaves_nothing():
    if "nproc" not in isolation() or not (IS_ROOT or "userns" in isolation()):
        pytest.skip("no process limit enforceable here")
    tag = "sbx" + uuid.uuid4().hex[:10]
    code = (
        "import ctypes, os\n"
        f"ctypes.CDLL(None).prctl(15, {tag.encode()!r}, 0, 0, 0)\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        pass\n"
    )
    t0 = time.monotonic()
    res = run(code, timeout=2, max_processes=16)
    assert not res.passed and res.status in ("timeout", "no_result"), res
    assert time.monotonic() - t0 < 8
    time.sleep(0.2)
    assert _our_processes(tag) == []


# ---------------------------------------------------------------------------------------------
# the scorer survives whatever the program signals
# ---------------------------------------------------------------------------------------------

_SCORE = (
    "import json, sys\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "from editor.eval.sandbox import run_program\n"
    "r = run_program(sys.argv[2], json.loads(sys.argv[3]), timeout=10, **json.loads(sys.argv[4]))\n"
    "print(json.dumps([r.passed, r.status, r.detail, r.isolation, r.stdout]))\n"
)


def _score_elsewhere(code, namespaces=True, tests=ADD_TESTS, max_processes=16, **kw):
    """(passed, status, detail, isolation, stdout) of scoring ``code`` in a scorer process of its own."""
    options = json.dumps({"namespaces": namespaces, "max_processes": max_processes})
    p = subprocess.run(
        [kw.pop("python", sys.executable), "-c", _SCORE, str(ROOT), code, json.dumps(tests), options],
        capture_output=True, text=True, timeout=60, start_new_session=True, **kw,
    )
    assert p.returncode == 0, f"the scorer died (rc {p.returncode}): {p.stderr[-500:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


KILLERS = {
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "killpg_own_group": "import os, signal\nos.killpg(0, signal.SIGKILL)\n",
    "killpg_parents_group": "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)\n",
    "stop_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\n",
}


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "no-namespaces"])
@pytest.mark.parametrize("name", sorted(KILLERS))
def test_the_program_cannot_kill_the_scorer(name, namespaces):
    if not IS_ROOT and "pidns" not in isolation(namespaces):
        pytest.skip("same uid without a PID namespace: the program can signal the scorer (documented)")
    passed, status, detail, *_ = _score_elsewhere(KILLERS[name] + WRONG, namespaces)
    assert not passed and status in ("failed", "no_result", "timeout"), (status, detail)


def test_the_program_cannot_read_the_scorers_environment(monkeypatch):
    if not IS_ROOT and "procfs" not in isolation():
        pytest.skip("same uid without its own /proc: the scorer's environment is readable (documented)")
    monkeypatch.setenv("SANDBOX_TEST_SECRET", "s3cret-value")
    code = (
        "import os\n"
        f"PID = {os.getpid()}\n"
        "def add(a, b):\n"
        "    try:\n"
        "        with open('/proc/%d/environ' % PID, 'rb') as f:\n"
        "            return f.read()\n"
        "    except OSError:\n"
        "        return a + b\n"
    )
    res = run(code)
    assert res.passed, res  # the read failed, so add answered honestly
    assert "SANDBOX_TEST_SECRET" not in res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------
# limits, environment, descriptors, network
# ---------------------------------------------------------------------------------------------


def test_limits_environment_and_descriptors_inside_the_program(monkeypatch):
    monkeypatch.setenv("SANDBOX_TEST_SECRET", "s3cret-value")
    keep = open(__file__, "rb")  # a descriptor of the scorer's that must not leak in
    try:
        code = (
            "import os, resource, sys\n"
            "def add(a, b):\n"
            "    g = resource.getrlimit\n"
            "    assert g(resource.RLIMIT_NOFILE)[0] <= 64, g(resource.RLIMIT_NOFILE)\n"
            "    assert g(resource.RLIMIT_CORE) == (0, 0)\n"
            "    assert g(resource.RLIMIT_NPROC)[0] != resource.RLIM_INFINITY\n"
            "    assert g(resource.RLIMIT_AS)[0] == 512 * 1024 * 1024\n"
            "    assert g(resource.RLIMIT_FSIZE)[0] == 1024 * 1024\n"
            "    assert g(resource.RLIMIT_CPU)[0] <= 11\n"
            "    assert 'SANDBOX_TEST_SECRET' not in os.environ, os.environ\n"
            "    assert os.environ['HOME'] == os.environ['TMPDIR'] == os.getcwd()\n"
            "    assert sys.stdin.read() == ''\n"
            "    fds = sorted(int(f) for f in os.listdir('/proc/self/fd'))\n"
            "    assert fds[:5] == [0, 1, 2, 3, 4] and len(fds) <= 6, fds\n"
            "    assert os.getsid(0) == os.getpid()\n"
            "    return a + b\n"
        )
        res = run(code, memory_mb=512, max_file_bytes=1024 * 1024)
        assert res.passed, res
    finally:
        keep.close()


def test_file_size_limit():
    code = "def add(a, b):\n    open('big', 'wb').write(b'x' * (2 * 1024 * 1024))\n    return a + b\n"
    res = run(code, max_file_bytes=1024 * 1024)
    assert not res.passed and res.status == "failed" and "File too large" in res.detail, res


def test_memory_bomb_and_endless_loop_inside_a_call():
    res = run("def add(a, b):\n    x = bytearray(64 * 1024 ** 3)\n    return a + b\n", memory_mb=512)
    assert not res.passed and "MemoryError" in res.detail, res
    t0 = time.monotonic()
    res = run("def add(a, b):\n    while True:\n        pass\n", timeout=1.5)
    assert res.status == "timeout" and time.monotonic() - t0 < 5, res


def test_no_network_in_a_network_namespace():
    if "netns" not in isolation():
        pytest.skip("no network namespace here: the network is open (documented)")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    try:
        port = srv.getsockname()[1]
        code = f"import socket\ndef add(a, b):\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n    return a + b\n"
        res = run(code)
        assert not res.passed and res.status == "failed", res
    finally:
        srv.close()


def test_parallel_workers_from_a_cold_start(monkeypatch):
    monkeypatch.setattr(sandbox, "_INTERPRETERS", {})  # as in a fresh process: the first calls race
    from editor.eval.scorers import score_mbpp

    records = [{"task_id": i, "test_list": ADD_TESTS} for i in range(6)]
    res = score_mbpp([ADD, WRONG] * 3, records, workers=3, timeout=10)
    assert [r["status"] for r in res["records"]] == ["passed", "failed"] * 3, res["records"]


def test_isolation_is_reported():
    iso = isolation()
    assert iso.startswith("uid=nobody" if IS_ROOT else "uid=same"), iso
    assert "subreaper" in iso or not sys.platform.startswith("linux")


# ---------------------------------------------------------------------------------------------
# as an unprivileged user (CI runs as root): user namespaces, and the plain fallback
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _unprivileged_python() -> str | None:
    """An interpreter that ``nobody`` can run and that can import this checkout, if any."""
    if not IS_ROOT:
        return None
    system = [shutil.which(n, path="/usr/local/bin:/usr/bin:/bin") for n in ("python3",)]
    for py in dict.fromkeys([sys.executable, getattr(sys, "_base_executable", None), *system]):
        if not py:
            continue
        try:
            p = subprocess.run([py, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import editor.eval.sandbox", str(ROOT)],
                               user=65534, group=65534, extra_groups=[], cwd="/", capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if p.returncode == 0:
            return py
    return None


@pytest.mark.parametrize("namespaces", [True, False], ids=["userns", "plain"])
def test_as_an_unprivileged_user(shared_dir, namespaces):
    py = _unprivileged_python()
    if py is None:
        pytest.skip("not root, or no interpreter that nobody can run with this checkout")
    kw = dict(python=py, user=65534, group=65534, extra_groups=[], cwd="/", env={"PATH": os.defpath})
    passed, status, _, iso, _ = _score_elsewhere(ADD, namespaces, **kw)
    assert passed and iso.startswith("uid=same"), (status, iso)
    for name in ("driver_globals", "patched_exec", "always_equal", "frame_peek"):
        passed, status, detail, *_ = _score_elsewhere(FORGERIES[name], namespaces, **kw)
        assert not passed, (name, status, detail)
    if "pidns" in iso:  # with a PID namespace the scorer is out of reach
        for name in sorted(KILLERS):
            passed, status, detail, *_ = _score_elsewhere(KILLERS[name] + WRONG, namespaces, **kw)
            assert not passed, (name, status, detail)
    else:  # without: killing the judge fails closed (the scorer itself is reachable: documented)
        passed, status, *_ = _score_elsewhere(KILLERS["kill_parent"] + ADD, namespaces, **kw)
        assert not passed and status == "no_result", status
    passed, status, detail, _, out = _score_elsewhere(FORK_200 + ADD, namespaces, max_processes=8, **kw)
    assert passed and int(out.split()[0]) <= 8, (status, detail, out)
    started, late = shared_dir / "started", shared_dir / "late"
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        open({str(started)!r}, 'w').write('x')\n"
        "        time.sleep(1.5)\n"
        f"        open({str(late)!r}, 'w').write('x')\n"
        "    os._exit(0)\n"
        "for _ in range(500):\n"
        f"    if os.path.exists({str(started)!r}):\n"
        "        break\n"
        "    time.sleep(0.01)\n" + ADD
    )
    passed, status, detail, *_ = _score_elsewhere(code, namespaces, **kw)
    assert passed and started.exists(), (status, detail)
    time.sleep(2.0)
    assert not late.exists()
