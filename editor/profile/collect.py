"""One way to run texts through a model and read its MLP activations, shared by profiling
(streaming statistics, ``editor.profile.stream``) and the key_space calibration (per-text keys).

Texts are tokenized once, sorted by length and cut into batches (length bucketing keeps padding
small); the padding side is honoured and position ids follow the attention mask, so every real
token sees exactly what it would see alone. Texts longer than ``max_length`` tokens keep their
first ``max_length`` tokens. ``run`` streams the batches under ``torch.inference_mode`` with hooks
on every decoder layer (registered through ``editor.hooks``, removed in ``finally``):

* ``pre``: the output of the pre-activation module (the gate half of a fused gate|up);
* ``key``: the input of the down projection.

By default only the decoder stack runs (no LM head: the activations don't need logits);
``generated_keys`` runs ``generate`` instead, for the keys of each greedy continuation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from editor.errors import EditorError
from editor.heap import longest_first
from editor.hooks import hooks
from editor.model.arch import ArchSpec, backbone, d_ff, decoder_layers, input_device
from editor.model.tokens import eos_ids, pad_id
from editor.profile.prefix import max_over_mask, pooled_by_prefix
from editor.progress import bar


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    real_index: torch.Tensor  # flat indices of real tokens in [B*T]
    last_index: torch.Tensor  # flat index of each row's last real token [B]
    tokens: int
    rows: torch.Tensor  # [B] index in the texts of each row


@dataclass
class Texts:
    """Texts tokenized and batched for ``run``."""

    batches: list[Batch]
    tokens: int
    truncated: int
    padding_side: str


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids per text (with the tokenizer's special tokens), cut at ``max_length``."""
    enc = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    truncated = sum(1 for ids in enc if len(ids) > max_length)
    out = [list(ids[:max_length]) for ids in enc]
    for i, ids in enumerate(out):
        if not ids:
            raise EditorError(f"text {i} tokenizes to nothing")
    return out, truncated


def make_batches(ids: list[list[int]], batch_size: int, pad: int, padding_side: str) -> list[Batch]:
    """Length-bucketed, deterministic batches (sorted by length, then original index)."""
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    batches = []
    for start in range(0, len(order), batch_size):
        picked = order[start : start + batch_size]
        rows = [ids[i] for i in picked]
        width = max(len(r) for r in rows)
        inp = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
            inp[b, sl] = torch.tensor(r, dtype=torch.long)
            mask[b, sl] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        flat = mask.reshape(-1).bool()
        real = flat.nonzero()[:, 0]
        lengths = torch.tensor([len(r) for r in rows])
        last_col = torch.full_like(lengths, width - 1) if padding_side == "left" else lengths - 1
        last = torch.arange(len(rows)) * width + last_col
        batches.append(Batch(inp, mask, pos, real, last, int(mask.sum()), torch.tensor(picked, dtype=torch.long)))
    return batches


def batched_texts(tokenizer, texts: list[str], *, batch_size: int = 8, max_length: int = 512,
                  padding_side: str | None = None) -> Texts:
    """``texts`` tokenized and batched; ``padding_side`` None: the tokenizer's own. An empty list
    (a data-parallel rank's empty shard, ``editor.profile.distributed``) gives no batches."""
    side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
    ids, truncated = tokenize(tokenizer, texts, max_length) if texts else ([], 0)
    batches = make_batches(ids, batch_size, pad_id(tokenizer), side)
    return Texts(batches, sum(b.tokens for b in batches), truncated, side)


Tap = Callable[[int, torch.Tensor, Batch], None]  # (layer, activations, batch)


@torch.inference_mode()
def run(model: nn.Module, spec: ArchSpec, batches: list[Batch], *, pre: Tap | None = None, key: Tap | None = None,
        step: Callable[[Batch], None] | None = None, after: Callable[[int, Batch], None] | None = None) -> float:
    """Run every batch (``step``, default: a forward of the decoder stack) with the ``pre`` / ``key``
    taps on every layer; ``after(k, batch)`` follows batch k. Returns the seconds it took."""
    layers = decoder_layers(model, spec)
    width = d_ff(model, spec)
    current: list[Batch] = []
    regs = []
    for i, layer in enumerate(layers):
        if pre is not None:
            regs.append((layer.get_submodule(spec.pre), "forward",
                         lambda m, a, out, i=i: pre(i, out[..., :width] if spec.fused else out, current[0])))
        if key is not None:
            regs.append((layer.get_submodule(spec.down), "forward_pre", lambda m, args, i=i: key(i, args[0], current[0])))
    if step is None:
        runner, device = backbone(model), input_device(model)

        def step(b: Batch) -> None:
            runner(input_ids=b.input_ids.to(device, non_blocking=True),
                   attention_mask=b.attention_mask.to(device, non_blocking=True),
                   position_ids=b.position_ids.to(device, non_blocking=True), use_cache=False)

    t0 = time.perf_counter()
    with hooks(regs):
        for k, b in enumerate(batches):
            current[:] = [b]
            step(b)
            if after is not None:
                after(k, b)
    return time.perf_counter() - t0


class PerTextKeys:
    """One key vector per text and layer, ``reduce(keys [B, T, d_ff], batch)`` → [B, d_ff], filled by
    ``tap`` (a ``run`` key tap) batch by batch: {layer: float32 [n, d_ff]} on the CPU, rows in the
    order of the texts. A tap of its own, so a pass that profiles a set can collect its keys too
    (``editor.profile.stream.profile_texts``'s ``also_key``).

    Memory: the result matrices are allocated once, before the first batch, and each batch's rows are
    written into them in place (no list of per-batch chunks, no concatenation, no reordering copy).
    Growing lists of small chunks interleaved with every batch's larger temporaries kept glibc from
    reusing or returning freed memory — +2.5 GiB of retained heap for 690 pooled texts on SmolLM2
    (30 layers), for 127 MB of keys (docs/SCALE.md, "Calibration")."""

    def __init__(self, model, spec: ArchSpec, n_texts: int, reduce):
        self.width = d_ff(model, spec)
        self.reduce = reduce
        self.keys = {i: torch.empty(n_texts, self.width, dtype=torch.float32)
                     for i in range(len(decoder_layers(model, spec)))}

    def tap(self, i: int, x: torch.Tensor, b: Batch) -> None:
        self.put(i, b.rows, self.reduce(x.reshape(b.input_ids.shape[0], b.input_ids.shape[1], self.width), b))

    def put(self, i: int, rows: torch.Tensor, keys: torch.Tensor) -> None:
        """Layer ``i``'s keys of the texts ``rows`` (a ``editor.profile.prefix.pooled_by_prefix`` sink)."""
        self.keys[i].index_copy_(0, rows, keys.to(device="cpu", dtype=torch.float32))

    def result(self) -> dict[int, torch.Tensor]:
        for i, keys in self.keys.items():
            if not torch.isfinite(keys).all():
                raise EditorError(f"non-finite keys (NaN/Inf) in layer {i} during key_space calibration")
        return self.keys

    def take(self) -> dict[int, torch.Tensor]:
        """``result``, handed over: this object keeps no reference, so the keys are freed as soon as
        their new owner (the calibration) drops them, not when this object goes."""
        keys = self.result()
        self.keys = {}
        return keys


@torch.inference_mode()
def _per_text_keys(model, tokenizer, spec: ArchSpec, texts: list[str], reduce, *, batch_size: int = 8,
                   max_length: int = 512, padding_side: str | None = None, progress: bool = False,
                   desc: str = "keys") -> dict[int, torch.Tensor]:
    """``PerTextKeys`` of ``texts`` in a pass of their own. ``progress``: a bar over the texts (stderr)."""
    prepared = batched_texts(tokenizer, texts, batch_size=batch_size, max_length=max_length, padding_side=padding_side)
    keys = PerTextKeys(model, spec, len(texts), reduce)
    with bar(progress, len(texts), desc) as shown:
        # each batch's rows land in their own places: any order gives the same keys, longest first the lowest peak
        run(model, spec, longest_first(prepared.batches), key=keys.tap, after=lambda k, b: shown.update(b.input_ids.shape[0]))
    return keys.result()


def _last_token(x: torch.Tensor, b: Batch) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).index_select(0, b.last_index.to(x.device))  # flat [B*T] indices


def max_over_real_tokens(x: torch.Tensor, b: Batch) -> torch.Tensor:
    """[B, d_ff]: each row's maximum over its real tokens (``prefix.max_over_mask``)."""
    return max_over_mask(x, b.attention_mask)


def last_token_keys(model, tokenizer, spec: ArchSpec, texts: list[str], **kw) -> dict[int, torch.Tensor]:
    """Per text and layer, the key at the text's last real token (what the box tests):
    {layer: float32 [len(texts), d_ff]} on the CPU, rows in the order of ``texts``."""
    return _per_text_keys(model, tokenizer, spec, texts, _last_token, **kw)


def pooled_keys(model, tokenizer, spec: ArchSpec, texts: list[str], *, batch_size: int = 8, max_length: int = 512,
                padding_side: str | None = None, progress: bool = False, desc: str = "keys") -> dict[int, torch.Tensor]:
    """Per text and layer, the key max-pooled over the text's real tokens (what the runtime's
    linear detector scores over the prompt's call): {layer: float32 [len(texts), d_ff]}. Texts that
    begin alike read their common beginning once (``editor.profile.prefix``)."""
    side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
    ids, _ = tokenize(tokenizer, texts, max_length) if texts else ([], 0)
    keys = PerTextKeys(model, spec, len(texts), max_over_real_tokens)
    with bar(progress, len(texts), desc) as shown:
        pooled_by_prefix(model, spec, ids, keys.put, batch_size=batch_size, pad=pad_id(tokenizer), padding_side=side,
                         on_rows=shown.update)
    return keys.result()


@torch.inference_mode()
def generated_keys(model, tokenizer, spec: ArchSpec, texts: list[str], *, new_tokens: int, batch_size: int = 8,
                   max_length: int = 512, progress: bool = False,
                   desc: str = "continuation keys") -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Keys of each text's greedy continuation, as the runtime tests them: each generated token fed
    back (at most ``new_tokens`` − 1 of them), until the row's EOS. Returns ({layer: [N, d_ff]}
    float32 on the CPU, owner [N]: the index in ``texts`` of each row). ``progress``: a bar over the
    texts (stderr)."""
    layers = decoder_layers(model, spec)
    width = d_ff(model, spec)
    empty = ({i: torch.zeros(0, width) for i in range(len(layers))}, torch.zeros(0, dtype=torch.long))
    if new_tokens < 2 or not texts:
        return empty
    pad, eos = pad_id(tokenizer), eos_ids(tokenizer, model)
    prepared = batched_texts(tokenizer, texts, batch_size=batch_size, max_length=max_length, padding_side="left")
    device = input_device(model)
    calls: dict[int, list[torch.Tensor]] = {}
    out: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    owners: list[torch.Tensor] = []

    def tap(i: int, x: torch.Tensor, b: Batch) -> None:
        if x.shape[1] == 1:  # a generation step (the prompt call has the prompt's length)
            calls.setdefault(i, []).append(x[:, 0, :width].float().cpu())

    def step(b: Batch) -> None:
        calls.clear()
        if b.input_ids.shape[1] == 1:
            raise EditorError("key_space calibration: one-token prompts cannot be told from generation steps")
        seq = model.generate(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device),
                             max_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                             eos_token_id=eos or None)
        gen = seq[:, b.input_ids.shape[1]:].cpu()
        ended = torch.isin(gen, torch.tensor(eos, dtype=gen.dtype)) if eos else torch.zeros_like(gen, dtype=torch.bool)
        for i in range(len(layers)):
            for s, x in enumerate(calls.get(i, []), start=1):  # call s feeds generated token s-1
                alive = ~ended[:, :s].any(dim=1)
                out[i].append(x[alive])
                if i == 0:
                    owners.append(b.rows[alive])

    with bar(progress, len(texts), desc) as shown:
        run(model, spec, prepared.batches, key=tap, step=step, after=lambda k, b: shown.update(b.input_ids.shape[0]))
    if not owners:
        return empty
    return {i: torch.cat(v) for i, v in out.items()}, torch.cat(owners)
