"""Freed memory handed back to the operating system between the stages of a run, and batches run
in the order that keeps the heap from growing within a stage (``longest_first``).

glibc keeps what a stage freed in its heap (blocks under its mmap threshold — which grows after
every large free — stay in the arena, and the arena only shrinks from the top), so without this a
run's resident size after the base scorecard's generation or the calibration's keys stays at that
stage's high-water mark for the rest of the run, and every later stage peaks on top of it.
``malloc_trim(0)`` releases every free page of the heap; elsewhere (not glibc) this is a no-op."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another OS or C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None)
    except OSError:
        return None


def release_freed() -> bool:
    """Collect unreachable Python objects, then return the heap's free pages to the OS (glibc's
    ``malloc_trim``). True when the C library could be asked."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def longest_first(batches: Sequence[T]) -> list[T]:
    """Batches cut from a list sorted by length (shortest first), in the order to run them: longest
    first. The first batch then allocates the largest activations and every later one fits in the
    blocks it freed; shortest first, each batch needs blocks a little larger than any freed one and
    the heap grows batch after batch — the edited scorecard's 768 attack prompts on SmolLM2 peaked
    1.37 GiB above their start in ascending order, 0.62 GiB in descending. Only for passes whose
    results do not depend on the order (each batch's rows written to their own places)."""
    return list(batches)[::-1]
