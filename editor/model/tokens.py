"""The padding and end-of-sequence ids, found one way for every stage (profiling, calibration,
scorecards, ONNX export): ``transformers`` spreads them over the tokenizer, the model's generation
config and its config, and any of them may be missing, a list, or disagree."""

from __future__ import annotations


def _ids(value) -> list[int]:
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if v is not None]


def eos_ids(tokenizer, model=None) -> list[int]:
    """Every end-of-sequence id (sorted) of the model's generation config, the tokenizer and the
    model's config: generation stops at any of them."""
    sources = (getattr(model, "generation_config", None), tokenizer, getattr(model, "config", None))
    return sorted({i for src in sources if src is not None for i in _ids(getattr(src, "eos_token_id", None))})


def pad_id(tokenizer, model=None) -> int:
    """The padding id: the tokenizer's, else the model's generation config's or config's, else the
    first end-of-sequence id, else 0 (padded positions are masked: any id is correct)."""
    for src in (tokenizer, getattr(model, "generation_config", None), getattr(model, "config", None)):
        ids = _ids(getattr(src, "pad_token_id", None)) if src is not None else []
        if ids:
            return ids[0]
    eos = eos_ids(tokenizer, model)
    return eos[0] if eos else 0
