"""How many CPU threads the long commands (run, profile, export, eval) give torch: one helper.

torch's own default is one thread per core of the machine, whatever else runs on it and whatever
CPU quota the process has. On a shared machine that oversubscribes the cores: OpenMP threads
wait for each other at every operation, and the work runs several times slower than on one
thread (``bench/README.md``, "Threads": the testbed's scorecard took 1.1 s on one thread and
3–16 s on two, on a 2-core machine whose load was 3). So by default a command takes the cores it
may use (CPU affinity, cgroup quota) that other processes leave free (the 1-minute load average
against the machine's cores), at least one. ``--threads N`` (or ``OMP_NUM_THREADS``, as torch
itself reads it) sets the count instead.

The thread count can change the last bits of float reductions, hence of the statistics and of a
checkpoint: runs that must be byte-identical pin it (``--threads 1``; the tests do).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity, capped by a cgroup v2 / v1 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, int(quota)))
    return max(1, n)


def _cgroup_quota() -> float | None:
    try:  # cgroup v2: "max 100000" or "200000 100000"
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return float(text[0]) / float(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v1
        q = float(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        p = float(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if q > 0 and p > 0:
            return q / p
    except (OSError, ValueError):
        pass
    return None


def free_cpus() -> float | None:
    """Cores of the machine that its 1-minute load average leaves idle (None where unknown)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    return (os.cpu_count() or 1) - load


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when set, else the usable CPUs that the load leaves free, at least 1."""
    for var in ENV:
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    n = usable_cpus()
    free = free_cpus()
    if free is not None:
        n = min(n, max(1, int(free + 0.5)))
    return max(1, n)


def set_threads(n: int | None = None) -> int:
    """Give torch ``n`` intra-op threads (``default_threads()`` when None) and, when it still can,
    as many inter-op threads; return the count."""
    import torch

    n = default_threads() if n is None else int(n)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only possible before the first inter-op parallel work of the process
        pass
    return n
