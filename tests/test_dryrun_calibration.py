"""``run --dry-run`` of a calibrated key_space (docs/GENERALIZATION.md §1): calibration is on when
``key_space.retain`` names retain sets and ``key_space.calibrate`` is not false; the plan then says
that the layer(s), dims and α will be chosen by calibration (budget, folds, seed, retain sets) and
does not present the recipe's layer / scale as the ones that will be used."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from editor.cli import main
from editor.dryrun import dry_run

CONFIGS = Path(__file__).resolve().parent / "configs"


def _write(tmp_path: Path, obj: dict) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(obj, sort_keys=False))
    return p


def _recipe(key_space: dict, *, na: bool = False, **data_over) -> dict:
    data = {
        "f": {"path": "openai/gsm8k", "name": "main", "split": "train", "text": "{answer}", "limit": 200},
        "q": {"path": "openai/gsm8k", "name": "main", "split": "train", "text": "Q: {question}", "limit": 100},
        "r": {"path": "google-research-datasets/mbpp", "name": "full", "split": "train", "text": "{code}"},
        "r2": {"path": "google-research-datasets/mbpp", "name": "full", "split": "train", "text": "{text}", "limit": 50},
    }
    data.update(data_over)
    obj = {"model": str(CONFIGS / "llama-3-8b"), "dtype": "bfloat16", "data": data, "key_space": key_space}
    if na:
        obj["neuron_adjust"] = {"forget": "f", "retain": "r", "top_percent": 3.0}
    return obj


CALIBRATED = {"forget": "q", "retain": ["r", "r2"], "layer": -2, "scale": 3.0,
              "false_positive_budget": 0.02, "folds": 4, "seed": 7}


def test_calibrated_plan_names_calibration_not_the_recipe_layer(tmp_path):
    plan = dry_run(_write(tmp_path, _recipe(CALIBRATED)))
    ks = [line for line in plan.splitlines() if line.startswith("key_space") or line.startswith("              ")]
    assert ("key_space     forget 'q': calibrated — the layer(s), the guarded dims and α (scale) are chosen by calibration "
            "at profile time; the recipe's layer (-2) and scale (3) are not used") in plan
    assert ("              retain sets 'r', 'r2'; background: the 559 shipped ordinary prompts (calibration part); "
            "false-positive budget 0.02 (2 % per retain set and on the background), 4-fold cross-validation, seed 7") in plan
    assert "every layer 0..31 (and pairs of the best), the top-m of the 14336 key dims" in plan
    # the paper's fixed-layer plan is not printed: no resolved layer, no "scale α = 3"
    assert "layer -2 → 30" not in plan and "→ 30 (of 0..31)" not in plan
    assert "scale α = 3" not in plan and "scale α" not in plan
    assert any("refusal" in line for line in ks)
    # memory of the calibration keys: (100 + 374 + 50 + 559 background) queries × 24 keys × 32 layers × 14336 × 4 B
    assert "calibration: ≤ 1083 queries × 24 key(s) × 32 layers × 14336 × 4 B = 44.42 GiB of keys (float32, CPU)" in plan
    assert "keys: each query's last prompt token + up to 23 greedy continuation tokens" in plan
    assert "→ calibrate key_space (q vs r, r2, background, 4-fold CV) → plan (key_space)" in plan


def test_one_retain_set_and_defaults(tmp_path):
    plan = dry_run(_write(tmp_path, _recipe({"forget": "q", "retain": "r"})))
    assert ("retain sets 'r'; background: the 559 shipped ordinary prompts (calibration part); false-positive budget 0.01 "
            "(1 % per retain set and on the background), 5-fold cross-validation, seed 0") in plan
    assert "the recipe's layer (-1) and scale (2) are not used" in plan
    assert "calibration: ≤ 1033 queries × 24 key(s)" in plan  # 100 + 374 + 559 background


def test_calibrate_false_keeps_the_paper_plan(tmp_path):
    """retain queries named but ``calibrate: false``: the recipe's layer and scale are the plan."""
    ks = dict(CALIBRATED, calibrate=False)
    plan = dry_run(_write(tmp_path, _recipe(ks)))
    assert "key_space     forget 'q': layer -2 → 30 (of 0..31)" in plan and "scale α = 3" in plan
    assert "calibrate: false — the retain sets 'r', 'r2' choose nothing; the recipe's layer and scale are used" in plan
    assert "chosen by calibration" not in plan and "calibrate key_space" not in plan and "calibration:" not in plan


def test_no_retain_is_the_paper_plan(tmp_path):
    plan = dry_run(_write(tmp_path, _recipe({"forget": "q", "layer": -2, "scale": 3.0})))
    assert "layer -2 → 30 (of 0..31)" in plan and "scale α = 3" in plan
    assert "chosen by calibration" not in plan and "calibrate" not in plan and "calibration:" not in plan


def test_calibrated_with_neuron_adjust(tmp_path):
    plan = dry_run(_write(tmp_path, _recipe(CALIBRATED, na=True)))
    assert "keys profiled again with Neuron Adjust active (q@neuron_adjust); the calibration's keys are collected with it active too" in plan
    assert "statistics: 4 set(s)" in plan  # f, r (NA), q (KSD) and q with NA on: retain queries are keys only
    assert "profile q again with Neuron Adjust on → calibrate key_space" in plan
    assert "scale α" not in plan


def test_unknown_query_counts_are_left_to_run_time(tmp_path):
    obj = _recipe({"forget": "q", "retain": "x"}, x={"path": "someone/private-prompts", "split": "train", "text": "{p}"})
    plan = dry_run(_write(tmp_path, obj))
    assert "calibration: per query ≤ 24 key(s) × 32 layers × 14336 × 4 B of keys (float32, CPU); query counts known at run time" in plan


def test_cli_dry_run_says_calibration(tmp_path):
    res = CliRunner().invoke(main, ["run", str(_write(tmp_path, _recipe(CALIBRATED))), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "chosen by calibration" in res.output and "seed 7" in res.output and "scale α" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # nothing written


@pytest.mark.parametrize("calibrate", [None, True])
def test_calibration_on_by_retain_or_explicitly(tmp_path, calibrate):
    ks = {"forget": "q", "retain": ["r"]}
    if calibrate is not None:
        ks["calibrate"] = calibrate
    assert "chosen by calibration" in dry_run(_write(tmp_path, _recipe(ks)))
