"""What a long command shows and measures: progress bars (stderr, for the user) and named, timed
stages (for whoever listens: ``bench/stages.py``, whose runs are the only source of the times the
README quotes). Without a listener a stage costs two clock reads."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Listener = Callable[[str, float, float], None]  # (stage, wall seconds, process CPU seconds)
_LISTENERS: list[Listener] = []


def bar(on: bool, total: int, desc: str, unit: str = "text"):
    """A tqdm bar on stderr over ``total`` units (a no-op one when ``on`` is false); a context
    manager that closes it on the way out."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not on, leave=False)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block as stage ``name``: wall seconds and the process's CPU seconds (all threads),
    reported to every listener when the block ends (also when it raises)."""
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        for fn in list(_LISTENERS):
            fn(name, time.perf_counter() - wall, time.process_time() - cpu)


@contextmanager
def listen(fn: Listener) -> Iterator[None]:
    """Call ``fn(stage, wall_s, cpu_s)`` at the end of every stage run inside the block."""
    _LISTENERS.append(fn)
    try:
        yield
    finally:
        _LISTENERS.remove(fn)
