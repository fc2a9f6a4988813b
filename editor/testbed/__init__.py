"""The embedded testbed: a tiny multi-skill Llama trained on synthetic text.

* ``MODEL_DIR`` – the committed HF model directory (``AutoModelForCausalLM`` /
  ``AutoTokenizer`` load it offline);
* ``DATA_DIR``  – ``probe.jsonl`` and ``eval.jsonl`` (fields ``prompt``,
  ``answer``, ``skill``, ``phrasing``);
* ``load_examples(split)`` – the examples of ``"probe"`` or ``"eval"`` (read
  from ``DATA_DIR``) or ``"train"`` (regenerated from the seeded generator).

See ``editor/testbed/README.md`` for the conventions and the training command.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

from editor.io import read_jsonl

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_DIR = PACKAGE_DIR / "model"
DATA_DIR = PACKAGE_DIR / "data"
SKILLS = ("math", "python", "facts_en", "facts_fr", "facts_de")

__all__ = ["MODEL_DIR", "DATA_DIR", "SKILLS", "load_examples"]


def load_examples(split: str) -> List[dict]:
    """Examples of a split as a list of dicts (``prompt``, ``answer``, ``skill``, ``phrasing``)."""
    if split == "train":
        from .corpus import generate

        return generate("train")
    path = DATA_DIR / f"{split}.jsonl"
    if split not in ("probe", "eval") or not path.exists():
        raise ValueError(f"unknown split {split!r}: expected 'probe', 'eval' or 'train'")
    return read_jsonl(path, f"testbed {split}")[0]
