"""Freed memory handed back to the operating system between the stages of a run.

glibc keeps what a stage freed in its heap (blocks under its mmap threshold — which grows after
every large free — stay in the arena, and the arena only shrinks from the top), so without this a
run's resident size after the base scorecard's generation or the calibration's keys stays at that
stage's high-water mark for the rest of the run, and every later stage peaks on top of it.
``malloc_trim(0)`` releases every free page of the heap; elsewhere (not glibc) this is a no-op."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

_TRIM = None


def _malloc_trim():
    global _TRIM
    if _TRIM is None:
        _TRIM = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _TRIM = libc.malloc_trim if hasattr(libc, "malloc_trim") else False
            except OSError:
                _TRIM = False
    return _TRIM


def release_freed() -> bool:
    """Collect unreachable Python objects, then return the heap's free pages to the OS (glibc's
    ``malloc_trim``). True when the C library could be asked."""
    gc.collect()
    trim = _malloc_trim()
    if not trim:
        return False
    trim(0)
    return True
