"""Exports survive being killed (issue #15, item 5): a real ``skill-editor export --overwrite``
process is stopped at named points of the replacement (``editor.io._hook``) and killed with SIGKILL
or SIGTERM. At every point the destination holds a complete, verified checkpoint — the old one
until the new one is complete —; SIGTERM cleans up after itself; what SIGKILL leaves is removed
(and reported) by the next writer; a second writer to the same destination is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from editor.checkpoint import verify
from editor.io import lock_path, recover
from tests.helpers import cli, tiny_project

pytestmark = pytest.mark.slow  # real export processes, killed at several points

# the old and the new checkpoint differ in the refusal text only (same statistics)
BODY = """\
neuron_adjust: {{forget: forget, retain: retain, top_percent: 10, mode: expected, seed: 0}}
key_space: {{forget: forget, layer: -1, scale: 2.0, refusal: "{refusal}"}}
"""

# runs the real CLI; at the named point of editor.io it says where it is and waits to be killed
DRIVER = r'''
import os, sys, time, pathlib
import editor.io as io
point, ready = sys.argv[1], pathlib.Path(sys.argv[2])
if os.environ.get("NO_EXCHANGE"):
    io._exchange = lambda a, b: False  # a file system without renameat2(RENAME_EXCHANGE), e.g. NFS
def hook(p):
    if p == point and not ready.exists():  # the first time only (a SIGTERM's clean-up may pass it again)
        ready.write_text(str(os.getpid()))
        time.sleep(300)
io._hook = hook
from editor.cli import main
main(sys.argv[3:], prog_name="skill-editor")
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    old = tiny_project(root, BODY.format(refusal="Old."))
    new = tiny_project(root, BODY.format(refusal="New."), name="new.yaml")
    cli("profile", old, "--out", root / "stats", "--quiet", "--threads", "1")
    (root / "driver.py").write_text(DRIVER)
    return root, old, new


def _export_args(recipe, root, dest):
    return ["export", str(recipe), "--stats", str(root / "stats"), "--out", str(dest), "--overwrite", "--quiet",
            "--threads", "1"]


def _start(root: Path, point: str, args: list[str], env_extra: dict | None = None):
    ready = root / f"ready-{point}-{time.monotonic_ns()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    proc = subprocess.Popen([sys.executable, str(root / "driver.py"), point, str(ready), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the export ended before {point}: {proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the export never reached {point}")
        time.sleep(0.05)
    return proc


def _kill(proc, sig) -> str:
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return out


def _which(ckpt: Path) -> str:
    return json.loads((ckpt / "config.json").read_text())["skill_editor"]["key_space"]["refusal"]


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


def _fresh(root: Path, name: str, recipe) -> Path:
    dest = root / name
    cli(*_export_args(recipe, root, dest))
    assert verify(dest).ok and _which(dest) == "Old."
    return dest


@pytest.mark.parametrize("point, sig", [
    ("writing", signal.SIGKILL), ("writing", signal.SIGTERM),  # the new checkpoint is complete, not yet in place
    ("swap", signal.SIGKILL), ("swap", signal.SIGTERM),        # just before the swap
    ("swapped", signal.SIGKILL), ("swapped", signal.SIGTERM),  # swapped; the old one not yet deleted
])
def test_killed_overwrite_leaves_a_complete_checkpoint(setup, point, sig):
    root, old, new = setup
    dest = _fresh(root, f"ck-{point}-{sig.name}", old)
    proc = _start(root, point, _export_args(new, root, dest))
    out = _kill(proc, sig)
    rep = verify(dest)
    assert rep.ok, rep.problems
    assert _which(dest) == ("New." if point == "swapped" else "Old.")  # the old checkpoint until the new one is in place
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "error: terminated" in out, out
        assert _leftovers(dest) == []  # its cleanup ran: no partial, no lock file
    else:
        assert proc.returncode == -signal.SIGKILL
        assert any(n.endswith(".partial") for n in _leftovers(dest))
        # the next writer is not blocked by a stale lock; it removes (and reports) what was left
        res = subprocess.run([sys.executable, "-m", "editor", *_export_args(new, root, dest)], capture_output=True,
                             text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
        assert res.returncode == 0, res.stderr
        assert "left by an interrupted write" in res.stderr
        assert _leftovers(dest) == [] and verify(dest).ok and _which(dest) == "New."


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_between_the_two_renames_keeps_the_old_checkpoint(setup, sig):
    """Without an atomic swap (NFS) the old directory is renamed aside first: a kill right then
    leaves it aside, and the next writer (or ``recover``) puts it back; SIGTERM puts it back at once."""
    root, old, new = setup
    dest = _fresh(root, f"ck-between-{sig.name}", old)
    proc = _start(root, "between", _export_args(new, root, dest), {"NO_EXCHANGE": "1"})
    _kill(proc, sig)
    if sig == signal.SIGKILL:
        assert not dest.exists()  # the moment the issue describes
        done = recover(dest)
        assert any("restored" in d for d in done)
    assert verify(dest).ok and _which(dest) == "Old."
    # SIGKILL leaves the lock file (the kernel released the lock itself; the next writer removes the file)
    assert [n for n in _leftovers(dest) if n != lock_path(dest).name] == []


def test_a_second_writer_to_the_same_destination_is_refused(setup):
    root, old, new = setup
    dest = _fresh(root, "ck-concurrent", old)
    first = _start(root, "writing", _export_args(new, root, dest))
    try:
        res = subprocess.run([sys.executable, "-m", "editor", *_export_args(old, root, dest)], capture_output=True,
                             text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
        assert res.returncode == 2, res.stderr
        line = res.stderr.strip()
        assert "\n" not in line and "another process is writing" in line, res.stderr
        assert verify(dest).ok and _which(dest) == "Old."
    finally:
        _kill(first, signal.SIGTERM)
    assert verify(dest).ok and _leftovers(dest) == []


# ---------------------------------------------------------------------------------------------
# `run`: the statistics (<out>.stats/) and the checkpoint of one run are replaced together
# ---------------------------------------------------------------------------------------------

# old and new runs profile different data (max_length 32 vs 12): their statistics differ
RUN_BODY = """\
neuron_adjust: {{forget: forget, retain: retain, top_percent: 10, mode: expected, seed: 0}}
key_space: {{forget: forget, layer: -1, scale: 2.0, refusal: "{refusal}"}}
"""


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash-run")
    old = tiny_project(root, RUN_BODY.format(refusal="Old."))
    new = tiny_project(root, RUN_BODY.format(refusal="New."), name="new.yaml", profile="{batch_size: 4, max_length: 12}")
    (root / "driver.py").write_text(DRIVER)
    return root, old, new


def _run_args(recipe, dest):
    return ["run", str(recipe), "--out", str(dest), "--overwrite", "--quiet", "--threads", "1"]


def _pair(dest: Path) -> str:
    """The checkpoint's refusal, after checking that ``<dest>.stats/`` holds the statistics its manifest records."""
    from editor.profile.stats import content_digest, load_stats

    assert verify(dest).ok
    recorded = json.loads((dest / "skill_editor.json").read_text())["statistics"]["digest"]
    assert content_digest(load_stats(dest.parent / f"{dest.name}.stats")) == recorded, "a mismatched pair"
    return _which(dest)


@pytest.mark.parametrize("point, sig", [
    ("writing", signal.SIGKILL), ("writing", signal.SIGTERM),      # the new statistics complete, nothing in place
    ("committed", signal.SIGKILL), ("committed", signal.SIGTERM),  # both complete, the journals written
    ("swapped", signal.SIGKILL), ("swapped", signal.SIGTERM),      # the checkpoint swapped in, not yet the statistics
])
def test_a_killed_run_never_leaves_a_mismatched_pair(run_setup, point, sig):
    """Before the fix, a run killed after profiling had already rewritten <out>.stats/ beside the
    older checkpoint. Now: the old pair until the commit point; after it, the new pair (completed
    at once on SIGTERM, by the next writer — here ``recover`` — after SIGKILL)."""
    root, old, new = run_setup
    dest = root / f"run-{point}-{sig.name}"
    cli(*_run_args(old, dest))
    assert _pair(dest) == "Old."
    proc = _start(root, point, _run_args(new, dest))
    out = _kill(proc, sig)
    committed = point != "writing"
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "error: terminated" in out, out
        assert _pair(dest) == ("New." if committed else "Old.")
        assert _leftovers(dest) == [] and _leftovers(dest.parent / f"{dest.name}.stats") == []
        return
    assert proc.returncode == -signal.SIGKILL
    if not committed:
        assert _pair(dest) == "Old."  # the new statistics are not in place
        res = subprocess.run([sys.executable, "-m", "editor", *_run_args(old, dest)], capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
        assert res.returncode == 0, res.stderr
        # the next run reports what it cleans up: the stale lock file and the killed run's temporary directories
        assert "the lock file a killed writer" in res.stderr and "left by an interrupted write" in res.stderr, res.stderr
        assert _pair(dest) == "Old."
    else:
        done = recover(dest)  # what the next run or export to dest does first
        assert any("completed the replacement" in d for d in done), done
        assert _pair(dest) == "New."
    assert _leftovers(dest) in ([], [lock_path(dest).name]) and _leftovers(dest.parent / f"{dest.name}.stats") in (
        [], [lock_path(dest.parent / f"{dest.name}.stats").name])
