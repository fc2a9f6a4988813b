"""A GGUF model's dequantized weights, kept in the cache (issue #23).

transformers reads a GGUF file by dequantizing every tensor into one float state dict and only then
building the model from it, so loading peaks at the weights ~1.4 times over plus the mapped file
(Qwen2.5-Coder-0.5B: 3.8 GiB for 2.4 GiB of float32 weights, against 2.9 GiB for the same profile
read from safetensors). The first load of a file therefore writes the model it gave — in the dtype
it was loaded in, without transformers' ``gguf`` quantization record — as memory-mapped
safetensors into the cache (``cache_dir()/dequantized/<file>-<sha256[:16]>-<dtype>``); every
later load reads that copy. The copy holds the same weights bit for bit, and the provenance still
names the GGUF file and its sha256 (``editor.model.loading.model_file_identity``): the cache is
only a faster way to read the file. ``SKILL_EDITOR_DEQUANTIZED=0`` turns it off (nothing read or
written). A copy that cannot be written (no space, a read-only cache) is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from editor.errors import EditorError
from editor.io import atomic_directory, atomic_write_json, check_parent, hold_destination
from editor.model.packaged import cache_dir, file_sha256

log = logging.getLogger(__name__)

ENV = "SKILL_EDITOR_DEQUANTIZED"  # "0": neither read nor write dequantized copies
SOURCE = "gguf_source.json"  # what the copy was made from; written last, so its presence means complete


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def entry_dir(gguf: Path, dtype: torch.dtype) -> Path:
    """The copy's directory: the file's name, its sha256 (so another file of the same name never
    takes its place) and the dtype."""
    return cache_dir() / "dequantized" / f"{Path(gguf).stem}-{file_sha256(gguf)[:16]}-{str(dtype).removeprefix('torch.')}"


def _source(gguf: Path, dtype: torch.dtype) -> dict:
    return {"gguf_file": Path(gguf).name, "gguf_sha256": file_sha256(gguf), "dtype": str(dtype).removeprefix("torch.")}


def lookup(gguf: Path, dtype: torch.dtype) -> Path | None:
    """The complete copy of ``gguf`` in ``dtype``, or None."""
    if not enabled():
        return None
    d = entry_dir(gguf, dtype)
    try:
        recorded = json.loads((d / SOURCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if {k: recorded.get(k) for k in ("gguf_file", "gguf_sha256", "dtype")} == _source(gguf, dtype) else None


def as_read_from_file(model, copy: Path, ref: str) -> None:
    """Make a model read from ``copy`` what reading its GGUF file (in directory ``ref``) gives: the
    name transformers records (``name_or_path``: configs written from the model carry it) and the
    config's ``architectures`` as the file's load left them."""
    model.config.name_or_path = ref
    model.name_or_path = model.config.name_or_path
    model.config.architectures = json.loads((copy / SOURCE).read_text(encoding="utf-8")).get("architectures")


def store(model, gguf: Path, dtype: torch.dtype) -> Path | None:
    """Write ``model`` (just read from ``gguf``, its quantization record dropped) as the copy, once:
    concurrent loaders wait on the entry's lock and find it done. Returns the directory, or None
    when it was not written (turned off, no space, not writable: a warning, never an error)."""
    if not enabled():
        return None
    d = entry_dir(gguf, dtype)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    try:
        check_parent(d, "dequantized model cache")
        anc = next(p for p in d.parents if p.exists())
        free = shutil.disk_usage(anc).free
        if free < 2 * size:
            log.warning("not caching the dequantized %s: %.1f GiB free in %s, %.1f GiB needed",
                        Path(gguf).name, free / 2**30, anc, 2 * size / 2**30)
            return None
        with hold_destination(d, wait=True):
            if lookup(gguf, dtype) is None:  # not written by another process while this one waited
                architectures = model.config.architectures  # save_pretrained sets them on the model
                try:
                    with atomic_directory(d, overwrite=True) as tmp:
                        model.save_pretrained(str(tmp))
                        atomic_write_json(tmp / SOURCE, {**_source(gguf, dtype), "architectures": architectures})
                finally:
                    model.config.architectures = architectures
    except (EditorError, OSError) as e:
        log.warning("not caching the dequantized %s: %s", Path(gguf).name, e)
        return None
    return d


# ---------------------------------------------------------------------------------------------
# the file's config and tokenizer
# ---------------------------------------------------------------------------------------------

# transformers reads a GGUF file's config and its tokenizer by parsing every metadata field of the
# file (the vocabulary and merges too), in Python, once for each: ~5 s of a SmolLM2 run's validation.
# Both are kept beside the dequantized copies, saved with save_pretrained, and kept only when reading
# the saved copy back gives the same config / tokenizer (``same_config`` / ``same_tokenizer``).
PROBE = "Hello, world! 12 + 7 = 19.\n def f(x):\treturn x ** 2  # héllo 日本"


def metadata_dir(gguf: Path, kind: str) -> Path:
    return cache_dir() / "gguf-metadata" / f"{Path(gguf).stem}-{file_sha256(gguf)[:16]}-{kind}"


def same_config(a, b) -> bool:
    skip = ("_name_or_path", "transformers_version")
    return ({k: v for k, v in a.to_dict().items() if k not in skip} == {k: v for k, v in b.to_dict().items() if k not in skip}
            and type(a) is type(b))


def same_tokenizer(a, b) -> bool:
    def key(t):
        messages = [{"role": "user", "content": PROBE}]
        chat = t.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) if t.chat_template else None
        return (type(t).__name__, t.get_vocab(), t.all_special_tokens, t.bos_token, t.eos_token, t.pad_token, t.unk_token,
                t.chat_template, t(PROBE)["input_ids"], t(PROBE, add_special_tokens=False)["input_ids"], chat,
                t.padding_side, t.truncation_side)
    return key(a) == key(b)


def cached_metadata(gguf: Path, kind: str, read_file, read_dir, same):
    """The GGUF file's ``kind`` (config or tokenizer): ``read_dir(path)`` of its saved copy when there is
    one, else ``read_file()``, saved for the next time (once, under the entry's lock) when reading the
    saved copy back gives the same thing (``same``); anything that cannot be written is skipped."""
    if not enabled():
        return read_file()
    d = metadata_dir(gguf, kind)
    source = {"gguf_file": Path(gguf).name, "gguf_sha256": file_sha256(gguf), "kind": kind}
    try:
        if json.loads((d / SOURCE).read_text(encoding="utf-8")) == source:
            return read_dir(str(d))
    except (OSError, ValueError):
        pass
    obj = read_file()
    try:
        check_parent(d, "GGUF metadata cache")
        with hold_destination(d, wait=True):
            with atomic_directory(d, overwrite=True) as tmp:
                obj.save_pretrained(str(tmp))
                if not same(obj, read_dir(str(tmp))):
                    raise EditorError(f"its saved {kind} reads back differently")
                atomic_write_json(tmp / SOURCE, source)
    except (EditorError, OSError, ValueError) as e:
        log.warning("not caching the %s of %s: %s", kind, Path(gguf).name, e)
    return obj
