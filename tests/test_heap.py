"""``editor.heap.release_freed``: what a stage freed goes back to the OS, so the next stage's peak
is not stacked on the last one's high-water mark (glibc only)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from editor.heap import release_freed


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_pages_go_back():
    """64 KiB blocks (under glibc's mmap threshold: they live in the heap) with every 16th kept: the
    freed ones sit between live blocks, so the heap cannot shrink from its top — only a trim gives
    their pages back."""
    release_freed()
    blocks = [bytearray(b"\1" * (64 << 10)) for _ in range(4096)]  # 256 MiB, touched
    kept = blocks[::16]
    del blocks
    held = _rss_mib()
    assert release_freed() is True
    after = _rss_mib()
    assert held - after > 128, (held, after)
    assert len(kept) == 256
