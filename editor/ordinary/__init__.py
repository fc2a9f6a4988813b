"""Ordinary prompts: what real users send a small instruction-tuned model (stories, questions,
instructions, chat, prose, facts, other human languages, other programming languages, …),
written by the project. 1 359 prompts in 22 categories, each record ``{text, category, lang,
part}``; four of them (``CONTRAST_CATEGORIES``) are near-neighbour contrast prompts that look
like the real-model recipes' forget skills (arithmetic, Python) but are not them.

Two uses, never mixed:

- ``part: calibration`` — the default **background negatives** of the key_space calibration
  (``key_space.background: default``): a guard must hold its false-positive budget on the rest of
  the world, not only on the retain sets a user happened to name.
- ``part: evaluation`` — the default **false-refusal** set of every scorecard (``evaluate.ordinary:
  default``): no calibration ever reads it. It also holds every prompt of two categories
  (``HELD_OUT_CATEGORIES``) that no calibration part contains, so the rate includes kinds of text
  the guard never saw.
- ``part: development`` — where the project chose its guard design (bench/), kept apart from both.

``split()`` reproduces the ``part`` field from the prompts (seeded, stratified by category);
``tests`` check that the shipped file agrees with it.
"""

from __future__ import annotations

import random
from pathlib import Path

from editor.io import read_jsonl

PROMPTS = Path(__file__).parent / "prompts.jsonl"
SEED = 20261128
HELD_OUT_CATEGORIES = ("roleplay_dialogue", "wordplay_trivia")
# near-neighbour contrast: prompts that look like a forgotten skill (math, Python) but are not it —
# scorecards report them on their own line, apart from the headline false-refusal rate
CONTRAST_CATEGORIES = ("near_math_numbers", "near_math_talk", "near_python_talk", "code_other")
PARTS = (("calibration", 0.45), ("development", 0.15), ("evaluation", 0.40))
# categories that grew after their first split: {category: the record counts (file order) at which
# it grew}. The records before the first count keep the parts they always had; each later block
# is split on its own (seeded by "category/count"), so adding prompts never moves a shipped one.
GROWN = {"code_other": (62,)}


def split(records: list[dict]) -> list[str]:
    """The part of each record: whole held-out categories → evaluation; every other category
    shuffled (seeded by its name) and cut 45 / 15 / 40 % — block by block where it grew (``GROWN``)."""
    parts = [""] * len(records)
    by_cat: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_cat.setdefault(r["category"], []).append(i)
    for cat, idx in sorted(by_cat.items()):
        if cat in HELD_OUT_CATEGORIES:
            for i in idx:
                parts[i] = "evaluation"
            continue
        cuts = [0, *GROWN.get(cat, ()), len(idx)]
        for lo, hi in zip(cuts, cuts[1:]):
            block = idx[lo:hi]
            random.Random(f"{SEED}/{cat}" + (f"/{lo}" if lo else "")).shuffle(block)
            start = 0
            for j, (name, share) in enumerate(PARTS):
                n = len(block) - start if j == len(PARTS) - 1 else round(share * len(block))
                for i in block[start : start + n]:
                    parts[i] = name
                start += n
    return parts


def load(part: str | None = None) -> list[dict]:
    """The shipped records (of one ``part``)."""
    rows, _ = read_jsonl(PROMPTS, "ordinary prompts")
    return [r for r in rows if part is None or r["part"] == part]
