"""Shared-prefix forwards: prompts that begin alike read their common beginning once.

Chat-form prompts share the template's system turn, few-shot prompts their examples, attacked
prompts their wrapper's opening: on the shipped SmolLM2 recipe the calibration's keys and the edited
scorecard compute 47 % fewer token positions this way (docs/SCALE.md, "Shared prefixes").
``prefix_groups`` sorts the prompts' token ids (prompts with a common beginning become neighbours)
and picks groups of neighbours with the prefix each shares — the longest common one, less a token
where a member would have none of its own — wherever reading it once saves more token positions
than the extra call costs (``PREFIX_CALL_TOKENS``). ``pooled_by_prefix`` runs each group's prefix
once (one row, its key/value cache kept), then its members' remaining tokens in batches over a copy
of that cache's rows (one row per member); prompts in no group run whole, in length-sorted batches.

Exact by causality: a token attends to the same earlier tokens at the same positions whether they
were computed in this call or cached from the prefix's, so every key is the one a forward over the
whole prompt computes — up to the rounding of the products, which differs with any change of batch
composition as well (tested against one-prompt forwards, every supported architecture). What is
pooled is the maximum of the keys over every real token: the prefix's maximum, taken once, is
combined with each member's by ``torch.maximum`` — what the runtime's linear detector scores
(``KeyScore``) and what its calibration reads (``editor.profile.collect.pooled_keys``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch

from editor.heap import BATCH_TOKENS, longest_first
from editor.hooks import hooks
from editor.model.arch import ArchSpec, backbone, d_ff, decoder_layers, input_device
from editor.runtime.modeling_skill_editor import CACHE_KEY

# What forming a group costs, in prompt-token positions: its prefix is one more row of a batched
# call, and its members' batches are cut apart from the prompts read whole — on average about half a
# batch row more per group. A group is formed only where it saves more than this.
PREFIX_CALL_TOKENS = 16

Sink = Callable[[int, torch.Tensor, torch.Tensor], None]  # (layer, rows [B], pooled keys [B, d_ff])


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the common beginning of two token-id lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_groups(ids: Sequence[Sequence[int]], call_tokens: int | None = None) -> list[tuple[int, list[int]]]:
    """Groups of prompts (indices into ``ids``) and the prefix length each group reads once:
    [(prefix length, indices)], every index in exactly one group; length 0: prompts read whole.

    Sorted by token ids, prompts that share a beginning are contiguous. A run of neighbours read as
    one group shares the common beginning of its members, capped one token short of its shortest
    (every member keeps a token of its own), and saves (members − 1) × prefix − ``call_tokens``
    positions (default ``PREFIX_CALL_TOKENS``); the partition of the sorted order into runs with the
    largest saving is found by dynamic programming (O(n²) vectorized steps: ~0.1 s for 3 000
    prompts). Deterministic (ties by index)."""
    call_tokens = PREFIX_CALL_TOKENS if call_tokens is None else call_tokens
    n = len(ids)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: (list(ids[i]), i))
    lcp = np.array([0] + [common_length(ids[order[k - 1]], ids[order[k]]) for k in range(1, n)], dtype=np.int64)
    size = np.array([len(ids[i]) for i in order], dtype=np.int64)
    best = np.zeros(n + 1, dtype=np.int64)  # best[j]: the largest saving over the first j prompts
    start = np.full(n + 1, -1, dtype=np.int64)  # where the group ending before j starts (-1: j-1 read whole)
    for j in range(2, n + 1):
        best[j] = best[j - 1]
        # runs [i, j) for i = j-2 … 0: the least lcp inside the run and its shortest member
        shared = np.minimum.accumulate(lcp[j - 1:0:-1])  # i = j-2 … 0 ↔ lcp[i+1 … j-1]
        shortest = np.minimum.accumulate(size[j - 1::-1])[1:]  # i = j-2 … 0 ↔ min size[i … j-1]
        prefix = np.minimum(shared, shortest - 1)
        i = np.arange(j - 2, -1, -1)
        gain = np.where(prefix > 0, best[i] + (j - i - 1) * prefix - call_tokens, np.iinfo(np.int64).min)
        k = int(np.argmax(gain))  # the first maximum: the shortest run
        if gain[k] > best[j]:
            best[j], start[j] = gain[k], i[k]
    out, rest, j = [], [], n
    while j > 0:
        if start[j] < 0:
            rest.append(order[j - 1])
            j -= 1
            continue
        lo = int(start[j])
        members = [order[k] for k in range(lo, j)]
        p = min(int(lcp[lo + 1:j].min()), int(size[lo:j].min()) - 1)
        out.append((p, sorted(members)))
        j = lo
    out.reverse()
    return ([(0, sorted(rest))] if rest else []) + out


def _batches(ids: list[list[int]], rows: list[int], batch_size: int, pad: int, past: int = 0,
             side: str = "right") -> list[dict]:
    """Length-sorted batches of the token lists ``ids`` (text indices ``rows``), at most ``batch_size``
    rows and ``BATCH_TOKENS`` positions (``past`` cached ones counted), padded on ``side``, position
    ids counting real tokens."""
    order = sorted(range(len(ids)), key=lambda k: (len(ids[k]), rows[k]))
    out = []
    start = 0
    while start < len(order):
        longest = len(ids[order[min(start + batch_size, len(order)) - 1]])
        take = max(1, min(batch_size, BATCH_TOKENS // max(1, longest + past)))
        picked = order[start:start + take]
        start += len(picked)
        width = max(len(ids[k]) for k in picked)
        inp = torch.full((len(picked), width), pad, dtype=torch.long)
        mask = torch.zeros((len(picked), width), dtype=torch.long)
        for b, k in enumerate(picked):
            sl = slice(width - len(ids[k]), width) if side == "left" else slice(0, len(ids[k]))
            inp[b, sl] = torch.tensor(ids[k], dtype=torch.long)
            mask[b, sl] = 1
        out.append({"input_ids": inp, "mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
                    "rows": torch.tensor([rows[k] for k in picked], dtype=torch.long), "picked": picked})
    return out


def max_over_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, d_ff]: each row's maximum over its real tokens — a contiguous run (left or right padding),
    reduced through a view of the row: no masked copy of the whole [B, T, d_ff] batch."""
    first, count = mask.argmax(dim=1).tolist(), mask.sum(dim=1).tolist()
    return torch.stack([x[r, s:s + c].amax(dim=0) for r, (s, c) in enumerate(zip(first, count))])


def _rows_of(cache, rows: torch.Tensor):
    """A key/value cache of ``rows`` of ``cache`` (new tensors, ``cache`` untouched, its layers' kinds
    kept): the layers copied shallowly, then batch-selected — one copy of the selected rows, not a copy
    of the whole cache first."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in out.layers:  # each layer on its own device (a model spread with device_map)
        keys = getattr(layer, "keys", None)
        layer.batch_select_indices(rows.to(keys.device) if isinstance(keys, torch.Tensor) else rows)
    return out


def plan_calls(ids: list[list[int]], *, batch_size: int, pad: int, padding_side: str = "right",
               call_tokens: int | None = None) -> list[dict]:
    """The forward calls of ``pooled_by_prefix``, longest first (``longest_first``): units of either one batch of
    prompts read whole (``{"whole": batch}``) or a batch of up to ``batch_size`` groups' prefixes,
    left-padded (``{"heads": batch, "tails": [batch]}``), then their members' remaining tokens in
    batches that mix the groups: each row right-padded after its own prefix's cache row (``group``:
    the row of ``heads`` it continues), so every row's real tokens stay contiguous — a sliding
    attention window sees what it sees in a forward over the prompt."""
    units = []
    groups = prefix_groups(ids, call_tokens)
    for p, members in groups:
        if p == 0:
            units += [{"whole": b, "width": b["input_ids"].shape[1]}
                      for b in _batches([ids[i] for i in members], members, batch_size, pad, side=padding_side)]
    shared = sorted((g for g in groups if g[0] > 0), key=lambda g: (g[0], g[1][0]))
    for heads in _batches([list(ids[m[0]][:p]) for p, m in shared], list(range(len(shared))), batch_size, pad, side="left"):
        chunk = [shared[k] for k in heads["picked"]]
        tails, rows, owner = [], [], []
        for g, (p, members) in enumerate(chunk):
            for i in members:
                tails.append(list(ids[i][p:]))
                rows.append(i)
                owner.append(g)
        past = heads["input_ids"].shape[1]
        batches = _batches(tails, rows, batch_size, pad, past=past)
        for b in batches:
            k = b["picked"]
            b["group"] = torch.tensor([owner[j] for j in k], dtype=torch.long)
            start = torch.tensor([chunk[owner[j]][0] for j in k], dtype=torch.long)
            b["position_ids"] = start[:, None] + b["position_ids"]
        width = past + max(b["input_ids"].shape[1] for b in batches)
        units.append({"heads": heads, "tails": longest_first(batches), "width": width})
    # longest first (units by their widest call: cached positions + the tail's; a unit's tails likewise):
    # the heap reuses the first call's blocks instead of growing
    return longest_first(sorted(units, key=lambda u: u["width"]))


@torch.inference_mode()
def pooled_by_prefix(model, spec: ArchSpec, ids: list[list[int]], sink: Sink, *, batch_size: int, pad: int,
                     padding_side: str = "right", call_tokens: int | None = None,
                     on_rows: Callable[[int], None] | None = None) -> None:
    """Each prompt's key of every layer max-pooled over its tokens, handed to ``sink(layer, rows,
    pooled)`` batch by batch (``pooled`` in the key's dtype, on the layer's device; rows: indices into
    ``ids``). Only the decoder stack runs (no LM head). Prompts read whole are padded on
    ``padding_side`` (the keys of real tokens do not depend on it). ``on_rows(k)``: k more prompts done."""
    layers = decoder_layers(model, spec)
    width = d_ff(model, spec)
    runner, device = backbone(model), input_device(model)
    call: dict = {}
    head_pool: dict[int, torch.Tensor] = {}  # layer -> [groups, d_ff]: each prefix's keys pooled

    def key(i: int, x: torch.Tensor) -> None:
        b = call["batch"]
        x = x.reshape(b["input_ids"].shape[0], b["input_ids"].shape[1], width)
        pooled = max_over_mask(x, b["mask"])
        if call["heads"]:
            head_pool[i] = pooled
            return
        if "group" in b:
            pooled = torch.maximum(pooled, head_pool[i].index_select(0, b["group"].to(pooled.device)))
        sink(i, b["rows"], pooled)

    def forward(b: dict, mask: torch.Tensor, **kw):
        return runner(input_ids=b["input_ids"].to(device), attention_mask=mask.to(device),
                      position_ids=b["position_ids"].to(device), **kw)

    regs = [(layer.get_submodule(spec.down), "forward_pre", lambda m, args, i=i: key(i, args[0]))
            for i, layer in enumerate(layers)]
    with hooks(regs):
        for unit in plan_calls(ids, batch_size=batch_size, pad=pad, padding_side=padding_side, call_tokens=call_tokens):
            if "whole" in unit:
                b = unit["whole"]
                call.update(heads=False, batch=b)
                forward(b, b["mask"], use_cache=False)
                if on_rows is not None:
                    on_rows(len(b["picked"]))
                continue
            heads = unit["heads"]
            call.update(heads=True, batch=heads)
            cache = forward(heads, heads["mask"], use_cache=True)[CACHE_KEY]
            for b in unit["tails"]:
                past = _rows_of(cache, b["group"].to(device))
                mask = torch.cat([heads["mask"].index_select(0, b["group"]), b["mask"]], dim=1)
                call.update(heads=False, batch=b)
                forward(b, mask, **{CACHE_KEY: past, "use_cache": True})
                if on_rows is not None:
                    on_rows(len(b["picked"]))
            head_pool.clear()
