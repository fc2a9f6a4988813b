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


def test_run_trims_inside_the_stages_that_free(tmp_path, monkeypatch):
    """``run`` hands freed heap back at the end of each stage that frees most — the base scorecard's
    generation, the calibration's keys, the fit, the edited scorecard — inside the stage, before a
    listener hears that it ended: ``bench/stages.py`` resets its peak mark there, so the next stage's
    peak starts from the trimmed heap, not from this stage's high-water mark."""
    import editor.pipeline as pipeline
    from editor.progress import listen

    events: list[str] = []
    monkeypatch.setattr(pipeline, "release_freed", lambda: events.append("trim") or True)
    root = Path(__file__).resolve().parents[1]
    with listen(lambda name, wall, cpu: events.append(name)):
        pipeline.run_recipe(root / "recipes" / "forget-french-linear.yaml", tmp_path / "ck", progress=False,
                            echo=lambda s: None)
    for name in ("base scorecard", "calibration keys", "calibration fit", "edited scorecard"):
        assert name in events, events
        assert events[events.index(name) - 1] == "trim", (name, events)


def test_batches_run_longest_first_with_the_same_results(monkeypatch):
    """The passes whose rows land in their own places — pooled keys, generation, the guard's
    forwards — run their length-sorted batches longest first (``longest_first``: the heap then
    reuses the first batch's blocks instead of growing), with exactly the results of the ascending
    order."""
    import torch

    import editor.eval.scorecard as scorecard
    import editor.heap as heap
    import editor.profile.collect as collect
    import editor.profile.prefix as prefix
    from editor.heap import longest_first
    from editor.model.arch import spec_for
    from tests.tiny import char_tokenizer, tiny_model

    model, tok = tiny_model("llama").eval(), char_tokenizer()
    texts = [("ab " * n).strip() for n in (9, 1, 5, 12, 3, 7, 2, 11, 4)]
    # shared prefixes: units by their widest call (cached + own positions), each unit's tails likewise
    units = prefix.plan_calls([tok(t)["input_ids"] for t in texts], batch_size=2, pad=0, call_tokens=0)
    assert any("heads" in u for u in units)
    assert [u["width"] for u in units] == sorted((u["width"] for u in units), reverse=True)
    for u in units:
        tails = [b["input_ids"].shape[1] for b in u.get("tails", [])]
        assert tails == sorted(tails, reverse=True), tails
    monkeypatch.setattr(prefix, "PREFIX_CALL_TOKENS", 10**9)  # below, every prompt is read whole
    widths: list[int] = []
    def width(module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        widths.append(ids.shape[1])

    handle = model.model.register_forward_pre_hook(width, with_kwargs=True)  # the decoder: every pass calls it
    try:
        keys = collect.pooled_keys(model, tok, spec_for(model.config), texts, batch_size=2, max_length=64)
        assert widths == sorted(widths, reverse=True) and len(set(widths)) > 1, widths
        widths.clear()
        got, _ = scorecard.generate_texts(model, tok, texts, batch_size=2, max_new_tokens=3)
        prompt_widths = [w for w in widths if w > 1]  # each batch's prompt call (the new tokens come one by one)
        assert len(prompt_widths) == 5 and prompt_widths == sorted(prompt_widths, reverse=True), widths
        widths.clear()
        scorecard.guard_flags(model, tok, texts, batch_size=2)
        assert len(widths) == 5 and widths == sorted(widths, reverse=True), widths
        for module in (collect, heap, prefix):
            monkeypatch.setattr(module, "longest_first", list)  # ascending, as cut
        widths.clear()
        ascending = collect.pooled_keys(model, tok, spec_for(model.config), texts, batch_size=2, max_length=64)
        assert widths == sorted(widths)
        want, _ = scorecard.generate_texts(model, tok, texts, batch_size=2, max_new_tokens=3)
    finally:
        handle.remove()
    assert all(torch.equal(keys[i], ascending[i]) for i in keys)
    assert got == want
    assert longest_first(range(0, 7, 3)) == [6, 3, 0]


def test_length_batches_cap_the_token_positions_and_keep_the_plain_cuts_elsewhere():
    """``length_batches``: the ``batch_size`` cuts of the length-sorted order, longest first; a cut whose
    rows × longest row exceeds the cap split into as many rows as fit (one at least)."""
    from editor.heap import length_batches

    lengths = [5, 3, 9, 1, 7, 2]
    assert length_batches(lengths, 2, 10**6) == [[4, 2], [1, 0], [3, 5]]  # uncapped: the plain cuts
    got = length_batches(lengths, 4, 12)  # cut [3,5,1,0] (width 5: 2 rows fit), cut [4,2] (width 9: 1 row)
    assert got == [[2], [4], [1, 0], [3, 5]], got
    assert length_batches([50, 40], 8, 10) == [[0], [1]]  # a row over the cap is a batch of its own
    for batch in length_batches([7, 30, 12, 30, 9, 1, 22, 18], 3, 40):
        assert len(batch) * max([7, 30, 12, 30, 9, 1, 22, 18][i] for i in batch) <= 40 or len(batch) == 1


def test_scorecard_batches_hold_at_most_the_cap_with_the_same_results(monkeypatch):
    """Generation and the guard's forwards cut their batches at ``BATCH_TOKENS`` positions (the new
    tokens counted for generation), with the answers and decisions of uncut batches."""
    import editor.eval.scorecard as scorecard
    import editor.heap as heap
    from tests.helpers import patched_model
    from tests.tiny import char_tokenizer, tiny_model

    edited, tok = patched_model("llama", model=tiny_model("llama"), tokenizer=char_tokenizer())
    texts = [("ab " * n).strip() for n in (9, 1, 5, 12, 3, 7, 2, 11, 4, 10, 6, 8)]
    shapes: list[tuple[int, int]] = []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        if ids.shape[1] > 1:  # a prompt call
            shapes.append(tuple(ids.shape))

    want_t, want_a = scorecard.generate_texts(edited, tok, texts, batch_size=6, max_new_tokens=4)
    want_f = scorecard.guard_flags(edited, tok, texts, batch_size=6)
    monkeypatch.setattr(heap, "BATCH_TOKENS", 40)
    handle = edited.get_decoder().register_forward_pre_hook(record, with_kwargs=True)  # every call's prompt
    try:
        got_t, got_a = scorecard.generate_texts(edited, tok, texts, batch_size=6, max_new_tokens=4)
        gen_shapes = list(shapes)
        shapes.clear()
        got_f = scorecard.guard_flags(edited, tok, texts, batch_size=6)
    finally:
        handle.remove()
    assert (got_t, got_a, got_f) == (want_t, want_a, want_f)
    assert len(gen_shapes) > 2 and all(rows == 1 or rows * (width + 4) <= 40 for rows, width in gen_shapes), gen_shapes
    assert len(shapes) > 2 and all(rows == 1 or rows * width <= 40 for rows, width in shapes), shapes
