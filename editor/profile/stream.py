"""The streaming FFL profiler (DESIGN §3, §4): per layer and on that layer's device,

* ``pre``: the neuron pre-activation over every real (non-padding) token;
* ``key``: the down-projection input at the last real token of each text (the key is then the
  last kept token of a text cut at ``max_length``).

The forwards, batching and hooks are ``editor.profile.collect``'s; this module accumulates what
the hooks see into ``Moments`` (no activation is stored) and checks them for NaN/Inf.
"""

from __future__ import annotations

import time

import torch

from editor.errors import EditorError
from editor.model.arch import ArchSpec, d_ff, decoder_layers, module_device
from editor.profile import collect
from editor.profile.stats import Moments, Scratch, SetStats
from editor.progress import bar


class _Accumulator:
    """Per-layer Moments for one set; the current batch's indices cached per device."""

    def __init__(self, width: int):
        self.width = width
        self.pre: dict[int, Moments] = {}
        self.key: dict[int, Moments] = {}
        self._batch: collect.Batch | None = None
        self._dev_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scratch: dict[str, Scratch] = {}  # Moments.of's temporaries, per device

    def _indices(self, batch: collect.Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if batch is not self._batch:
            self._batch, self._dev_cache = batch, {}
        got = self._dev_cache.get(str(device))
        if got is None:
            got = (batch.real_index.to(device, non_blocking=True), batch.last_index.to(device, non_blocking=True))
            self._dev_cache[str(device)] = got
        return got

    def _merge(self, store: dict[int, Moments], layer: int, x: torch.Tensor, rows: torch.Tensor) -> None:
        m = Moments.of(x.reshape(-1, self.width), rows, self._scratch.setdefault(str(x.device), Scratch()))
        if layer in store:
            store[layer].merge_(m)
        else:
            store[layer] = m

    def add_pre(self, layer: int, x: torch.Tensor, batch: collect.Batch) -> None:
        real, _ = self._indices(batch, x.device)
        self._merge(self.pre, layer, x, real)

    def add_key(self, layer: int, x: torch.Tensor, batch: collect.Batch) -> None:
        _, last = self._indices(batch, x.device)
        self._merge(self.key, layer, x, last)

    def check_finite(self, layer_names: dict[int, str]) -> None:
        for kind, store in (("pre-activation", self.pre), ("key", self.key)):
            for layer, m in store.items():
                if not m.finite():
                    raise EditorError(f"non-finite {kind} activations (NaN/Inf) in layer {layer} ({layer_names[layer]})")


@torch.inference_mode()
def profile_texts(
    model,
    tokenizer,
    spec: ArchSpec,
    texts: list[str],
    *,
    batch_size: int = 8,
    max_length: int = 512,
    padding_side: str | None = None,
    want_pre: bool = True,
    want_key: bool = True,
    desc: str = "profile",
    progress: bool = True,
    check_every: int = 16,
    also_key: collect.Tap | None = None,
) -> tuple[dict[int, dict[str, Moments]], dict]:
    """Stream ``texts`` through ``model``; return per-layer Moments and a summary (tokens, time).
    ``also_key``: a second key tap fed in the same pass (``collect.PerTextKeys.tap``: the
    calibration's keys of a profiled set, without running the set through the model again)."""
    from tqdm.auto import tqdm

    prepared = collect.batched_texts(tokenizer, texts, batch_size=batch_size, max_length=max_length, padding_side=padding_side)
    layers = decoder_layers(model, spec)
    width = d_ff(model, spec)
    acc = _Accumulator(width)
    names = {i: f"{spec.layers}.{i}" for i in range(len(layers))}
    shown = bar(progress, len(texts), desc)
    done = {"tokens": 0, "t0": time.perf_counter()}

    def after(k: int, b: collect.Batch) -> None:
        done["tokens"] += b.tokens
        shown.update(b.input_ids.shape[0])
        if progress:
            shown.set_postfix_str(f"{done['tokens'] / max(time.perf_counter() - done['t0'], 1e-9):,.0f} tok/s")
        if check_every and (k + 1) % check_every == 0:
            acc.check_finite(names)

    try:
        key = acc.add_key if want_key else None
        if also_key is not None:
            def key(i: int, x: torch.Tensor, b: collect.Batch, own=key) -> None:
                if own is not None:
                    own(i, x, b)
                also_key(i, x, b)
        seconds = collect.run(model, spec, prepared.batches, pre=acc.add_pre if want_pre else None, key=key, after=after)
        acc.check_finite(names)
    finally:
        shown.close()
    out: dict[int, dict[str, Moments]] = {}
    for i in range(len(layers)):
        out[i] = {}
        if want_pre:
            out[i]["pre"] = acc.pre[i] if i in acc.pre else Moments.empty(width, module_device(layers[i]))
        if want_key:
            out[i]["key"] = acc.key[i] if i in acc.key else Moments.empty(width, module_device(layers[i]))
    summary = {"texts": len(texts), "tokens": prepared.tokens, "truncated": prepared.truncated, "max_length": max_length,
               "padding_side": prepared.padding_side, "batch_size": batch_size, "seconds": round(seconds, 3)}
    return out, summary


def profile_set(model, tokenizer, spec: ArchSpec, text_set, recipe_profile, *, desc=None, progress=True,
                also_key: collect.Tap | None = None) -> SetStats:
    layers, summary = profile_texts(
        model, tokenizer, spec, text_set.texts,
        batch_size=recipe_profile.batch_size, max_length=recipe_profile.max_length,
        padding_side=recipe_profile.padding_side, desc=desc or text_set.name, progress=progress, also_key=also_key,
    )
    info = dict(text_set.info)
    info.update({"tokens": summary["tokens"], "truncated": summary["truncated"], "max_length": summary["max_length"],
                 "padding_side": summary["padding_side"]})
    return SetStats(layers, info)
