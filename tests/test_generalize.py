"""Issue #9 on the embedded testbed: a skill probed in ONE phrasing must be refused on ≥ 90 % of its
unseen phrasings with ≤ 2 % abstention on every retained skill — measured by ``run``'s own
scorecard (greedy generation through the exported checkpoint on ``eval.jsonl``, which the
calibration never reads: ``tests/test_calibrate.py``, ``tests/test_calibrate_linear.py``).

- math, calibrated hypercube (``recipes/generalize/math.yaml``: ``check: prompt``, 2 % budget);
- math and French facts, pooled linear detector (``recipes/generalize/math-linear.yaml``,
  ``french-linear.yaml``: 1 % budget). The hypercube cannot reach the bar for French on this model
  (docs/GENERALIZATION.md §4.1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from editor.pipeline import run_recipe

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.xdist_group("testbed-generalize"), pytest.mark.slow]


def _check_target(out: Path, recipe: str, skill: str, probed: str, n_unseen: int) -> dict:
    summary = run_recipe(ROOT / "recipes" / "generalize" / recipe, out, progress=False, echo=lambda *a, **k: None)
    card = summary["scorecard"]
    phrasings = card["phrasings"]["after"]
    unseen = [p for name, p in phrasings.items() if p["skill"] == skill and name != probed]
    n = sum(p["n"] for p in unseen)
    rate = sum(p["n"] * p["abstained"] for p in unseen) / n
    assert n == n_unseen and rate >= 0.90, phrasings
    for other, r in card["after"].items():
        if other != skill:
            assert r["abstained"] <= 0.02, (other, r)
    return json.loads((out / "skill_editor.json").read_text())["edit"]["key_space"]["plan"]


def test_calibrated_math_generalizes_to_unseen_phrasings(tmp_path):
    plan = _check_target(tmp_path / "gen-math", "math.yaml", "math", "math/0", 100)
    assert plan["method"] == "calibrated" and plan["cv"]["budget"] == 0.02


@pytest.mark.parametrize("recipe,skill,probed,n_unseen", [
    ("french-linear.yaml", "facts_fr", "facts_fr/0", 135),
    ("math-linear.yaml", "math", "math/0", 100),
])
def test_linear_detector_generalizes_to_unseen_phrasings(tmp_path, recipe, skill, probed, n_unseen):
    plan = _check_target(tmp_path / "gen", recipe, skill, probed, n_unseen)
    assert plan["method"] == "linear" and plan["cv"]["budget"] == 0.01
