"""Issue #9 on the embedded testbed: math probed in ONE phrasing (``recipes/generalize/math.yaml``:
calibrated KSD, ``check: prompt``, 2 % budget) must abstain on ≥ 90 % of the unseen math phrasings
with ≤ 2 % abstention on every retained skill — measured by ``run``'s own scorecard (greedy
generation through the exported checkpoint on ``eval.jsonl``, which the calibration never reads:
``tests/test_calibrate.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from editor.pipeline import run_recipe

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("testbed-generalize")


def test_calibrated_math_generalizes_to_unseen_phrasings(tmp_path):
    out = tmp_path / "gen-math"
    summary = run_recipe(ROOT / "recipes" / "generalize" / "math.yaml", out, progress=False, echo=lambda *a, **k: None)
    card = summary["scorecard"]
    phrasings = card["phrasings"]["after"]
    unseen = [p for name, p in phrasings.items() if p["skill"] == "math" and name != "math/0"]
    n = sum(p["n"] for p in unseen)
    rate = sum(p["n"] * p["abstained"] for p in unseen) / n
    assert n == 100 and rate >= 0.90, phrasings
    for skill, r in card["after"].items():
        if skill != "math":
            assert r["abstained"] <= 0.02, (skill, r)
    plan = json.loads((out / "skill_editor.json").read_text())["edit"]["key_space"]["plan"]
    assert plan["method"] == "calibrated" and plan["cv"]["budget"] == 0.02
