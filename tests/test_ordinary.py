"""The shipped ordinary prompts (editor/ordinary): the parts are ``split()``'s, the prompts shipped
before the near-neighbour contrast categories are unchanged, and no prompt is an arithmetic
exercise or a request for Python code (they are negatives of both real-model forget recipes)."""

from __future__ import annotations

import hashlib
import re
from collections import Counter

from editor import ordinary

# the file before the near-neighbour contrast prompts were appended: 1 139 lines, this sha256
BEFORE_LINES = 1139
BEFORE_SHA256 = "b4094cd6bc6a8fc4eadcee52f057fb7921e0e2a894da170e7b6dc6d1333f7fbd"

# an arithmetic exercise: numbers joined by an operator or an operation word, a request to compute
# with a number, a percentage of a number
EXERCISE = [r"\d\s*[+×*÷=]\s*\d", r"\d+\s+(plus|minus|times|multiplied by|divided by|squared|cubed)\b",
            r"\b(what is|what's|how much is|calculate|compute|solve|add up|sum of|subtract)\b[^.?!]{0,20}\d",
            r"\d\s*(%|percent) of\s+\d"]
CODE_REQUEST = (r"\b(write|implement|show me|give me|complete|fix|debug|generate)\b[^.?!]{0,40}"
                r"\b(function|script|program|code|class|snippet|one-liner|loop)\b")


def test_parts_are_the_split():
    rows = ordinary.load()
    assert ordinary.split(rows) == [r["part"] for r in rows]
    assert all(set(r) == {"text", "category", "lang", "part"} for r in rows)
    assert len({r["text"] for r in rows}) == len(rows)


def test_prompts_shipped_before_are_unchanged():
    lines = ordinary.PROMPTS.read_bytes().splitlines(keepends=True)
    assert hashlib.sha256(b"".join(lines[:BEFORE_LINES])).hexdigest() == BEFORE_SHA256


def test_a_grown_category_keeps_its_parts():
    """Adding prompts to a category splits them as a block of their own: the first block's parts
    are what they would be without them."""
    rows = [r for r in ordinary.load() if r["category"] == "code_other"]
    (first,) = ordinary.GROWN["code_other"]
    assert ordinary.split(rows[:first]) == [r["part"] for r in rows[:first]]
    assert ordinary.split(rows)[:first] == [r["part"] for r in rows[:first]]
    later = Counter(r["part"] for r in rows[first:])
    assert later == {"calibration": 18, "development": 6, "evaluation": 16}


def test_contrast_categories():
    rows = ordinary.load()
    assert set(ordinary.CONTRAST_CATEGORIES) <= {r["category"] for r in rows}
    assert not set(ordinary.CONTRAST_CATEGORIES) & set(ordinary.HELD_OUT_CATEGORIES)
    for cat in ordinary.CONTRAST_CATEGORIES:
        mine = [r for r in rows if r["category"] == cat]
        assert len(mine) >= (100 if cat == "code_other" else 60), cat
        parts = Counter(r["part"] for r in mine)
        assert set(parts) == {"calibration", "development", "evaluation"}, cat
        assert parts["evaluation"] >= 24, cat  # their own line on every scorecard
        if cat != "code_other":
            assert any(r["lang"] != "en" for r in mine), cat
            assert sum(r["lang"] == "en" for r in mine) > 0.8 * len(mine), cat


def test_no_arithmetic_exercise_and_no_python_request():
    for r in ordinary.load():
        t = r["text"]
        for pattern in EXERCISE:
            assert not re.search(pattern, t, re.I), (r["category"], t)
        if re.search(r"python", t, re.I):  # the language or the snake, talked about: never a code request
            assert r["category"] == "near_python_talk", t
            assert not re.search(CODE_REQUEST, t, re.I), t
            assert not re.search(r"\bdef |\bimport |print\(|```", t), t
