"""Freed memory handed back to the operating system between the stages of a run, batches of a
bounded size (``length_batches``), run in the order that keeps the heap from growing within a stage
(``longest_first``).

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


# A batch's activations grow with its rows × its longest row: the scorecard's passes (generation, the
# guard's forwards) hold at most this many token positions per batch, whatever the prompts' lengths —
# 32 attack prompts of 287 tokens were 9 184 positions, SmolLM2's guard pass then peaked 0.8 GiB above
# the model (docs/SCALE.md, "Scorecards"); 8 192 keeps the shipped recipes' batches of short prompts whole.
BATCH_TOKENS = 8192


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices into ``lengths`` in batches of similar length: sorted by length (then index), cut every
    ``batch_size`` rows, and a cut whose rows × longest row exceeds ``max_tokens`` (default
    ``BATCH_TOKENS``) token positions split into as many rows as fit (at least one) — the batches are
    the plain ``batch_size`` cuts wherever the cap does not bind. In the order to run them:
    ``longest_first``."""
    cap = BATCH_TOKENS if max_tokens is None else max_tokens
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    for start in range(0, len(order), batch_size):
        cut = order[start:start + batch_size]
        rows = max(1, cap // max(1, lengths[cut[-1]]))
        batches += [cut[k:k + rows] for k in range(0, len(cut), rows)]
    return longest_first(batches)
