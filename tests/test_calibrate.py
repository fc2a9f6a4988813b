"""Calibrated Key Space Detection (issue #9): pure functions on key matrices, determinism, the
false-positive budget, ±inf outside the chosen dims, and profile → export end to end on a tiny
model (the calibration only ever sees probe-set keys; the exported checkpoint's ``abstained``
equals the in-process decision)."""

from __future__ import annotations

import builtins
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from editor.methods import calibrate
from editor.methods.calibrate import Box, cross_validate, dims_grid, fold_indices, rank_dims, separation
from editor.errors import EditorError
from editor.methods.key_space import ksd_bounds
from editor.profile import collect
from tests.helpers import QUERIES, calibration_project

torch.set_num_threads(1)


def _keys(seed: int, n_f=40, n_r=120, d=32, sep=(3, 7, 11), shift=4.0):
    """Synthetic keys: forget and retain agree except on ``sep`` dims (forget shifted there)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n_f, d, generator=g)
    r = torch.randn(n_r, d, generator=g) * 1.5
    for j in sep:
        f[:, j] = f[:, j] * 0.3 + shift
    return f, r


# ---------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------


def test_dims_grid():
    assert dims_grid(48) == [1, 2, 4, 8, 16, 32, 48]
    assert dims_grid(64) == [1, 2, 4, 8, 16, 32, 64]
    assert dims_grid(1) == [1]


def test_separation_ranks_the_separating_dims_first():
    f, r = _keys(0)
    s = separation(f, r)
    ref = (f.double().mean(0) - r.double().mean(0)).abs() / (f.double().std(0) + r.double().std(0))
    torch.testing.assert_close(s, ref)
    assert sorted(rank_dims(f, r)[:3].tolist()) == [3, 7, 11]
    # ties keep index order
    same = torch.zeros(5, 4)
    assert rank_dims(same, same).tolist() == [0, 1, 2, 3]


def test_box_depth_is_the_paper_box():
    f, _ = _keys(1)
    dims = torch.tensor([3, 7])
    box = Box.fit(f, dims)
    # at α = 1 every training key is inside (k is the max training deviation)
    assert bool((box.depth(f) <= 1 + 1e-12).all())
    # the same box as methods.key_space.ksd_bounds restricted to those dims
    b = ksd_bounds(f.double().mean(0), f.double().std(0), f.min(0).values, f.max(0).values, 2.0, dims=dims)
    assert b.k == pytest.approx(box.k, rel=1e-6)
    torch.testing.assert_close(b.lower[dims].double(), box.mean - 2 * box.k * box.std, rtol=1e-6, atol=1e-5)


def test_folds_are_a_seeded_partition():
    a = fold_indices(23, 5, seed=0)
    assert sorted(torch.cat(a).tolist()) == list(range(23))
    assert [x.tolist() for x in a] == [x.tolist() for x in fold_indices(23, 5, seed=0)]
    assert [x.tolist() for x in a] != [x.tolist() for x in fold_indices(23, 5, seed=1)]
    with pytest.raises(EditorError, match="folds"):
        fold_indices(3, 5, seed=0)


def _three_layers(seed):
    out_f, out_r = {}, {}
    for layer, shift in enumerate((0.8, 4.0, 1.5)):
        f, r = _keys(seed * 10 + layer, shift=shift)
        out_f[layer], out_r[layer] = f, r
    return out_f, out_r


def test_same_seed_same_setting_and_bounds():
    f, r = _three_layers(0)
    a = calibrate.calibrate_keys(f, r, budget=0.02, folds=4, seed=3)
    b = calibrate.calibrate_keys(f, r, budget=0.02, folds=4, seed=3)
    assert a == b
    # another seed: other folds (the chosen setting may or may not differ; the CV numbers do)
    c = calibrate.calibrate_keys(f, r, budget=0.02, folds=4, seed=4)
    assert c["cv"]["seed"] == 4 and a["cv"]["seed"] == 3
    assert json.dumps(c, sort_keys=True) != json.dumps(a, sort_keys=True)
    # the well-separated layer wins
    assert 1 in a["layers"]


@pytest.mark.parametrize("budget", [0.0, 0.02, 0.1])
def test_budget_respected_on_training_and_held_out_folds(budget):
    # overlapping distributions: many settings break the budget
    f, r = _three_layers(1)
    for layer in r:  # 12 retain keys look like forget keys on the separating dims
        r[layer][:12, [3, 7, 11]] = f[layer][:12, [3, 7, 11]]
    folds, seed = 4, 2
    cal = cross_validate(f, r, folds=folds, seed=seed, budget=budget)
    c = cal.chosen
    assert c.fpr <= budget + 1e-12 and c.fpr_train <= budget + 1e-12
    # recompute the chosen setting's training-fold FPR independently
    ff, rf = fold_indices(40, folds, seed, salt=1), fold_indices(120, folds, seed, salt=2)
    for j in range(folds):
        ft = torch.cat([ff[i] for i in range(folds) if i != j])
        rt = torch.cat([rf[i] for i in range(folds) if i != j])
        hit = torch.zeros(rt.numel(), dtype=torch.bool)
        for layer in c.layers:
            box = Box.fit(f[layer][ft], rank_dims(f[layer][ft], r[layer][rt])[: c.m])
            hit |= box.depth(r[layer][rt]) <= c.scales[c.layers.index(layer)]
        assert hit.double().mean().item() <= budget + 1e-12


def test_no_feasible_setting_is_an_error():
    g = torch.Generator().manual_seed(0)
    same = torch.randn(30, 8, generator=g)
    with pytest.raises(EditorError, match="false-positive"):
        cross_validate({0: same}, {0: same.clone()}, folds=3, seed=0, budget=0.0, scales=(1.0, 2.0))


def test_selected_dims_get_inf_elsewhere():
    f, r = _keys(2)
    rec = calibrate.calibrate_keys({0: f}, {0: r}, budget=0.01, folds=4, seed=0)
    dims = torch.tensor(rec["dims"]["0"])
    assert len(dims) == rec["m"] < 32
    b = ksd_bounds(f.mean(0), f.std(0), f.min(0).values, f.max(0).values, rec["scale"]["0"], dims=dims)
    other = torch.ones(32, dtype=torch.bool)
    other[dims] = False
    assert torch.isinf(b.lower[other]).all() and (b.lower[other] < 0).all()
    assert torch.isinf(b.upper[other]).all() and (b.upper[other] > 0).all()
    assert torch.isfinite(b.lower[dims]).all() and torch.isfinite(b.upper[dims]).all()
    assert b.dims == len(dims)
    # the forget keys are inside, most retain keys are not
    assert calibrate.inside(f, b.lower, b.upper).all()
    assert calibrate.inside(r, b.lower, b.upper).double().mean() <= 0.05


def test_budget_holds_for_every_retain_set():
    """Two retain sets: a small one that looks like the forget set on one separating dim, a big one
    that does not: the budget is checked on each set's own rate, not on the pooled one."""
    from editor.methods.calibrate import KeySet

    f, r = _keys(3, n_r=200)
    g = torch.Generator().manual_seed(9)
    r[:20, 3] = f[:20, 3] + 0.01 * torch.randn(20, generator=g)
    group = torch.tensor([0] * 20 + [1] * 180)
    pooled = cross_validate({0: f}, {0: r}, folds=4, seed=0, budget=0.1, scales=(1.0, 2.0, 4.0)).chosen
    per_set = cross_validate(KeySet.of({0: f}), KeySet.of({0: r}, group=group), folds=4, seed=0, budget=0.1,
                             scales=(1.0, 2.0, 4.0)).chosen
    assert len(per_set.fpr_by_set) == 2 and max(per_set.fpr_by_set) == pytest.approx(per_set.fpr, abs=1e-6) and per_set.fpr <= 0.1 + 1e-12
    # recompute the chosen setting's held-out rate of the small set: within the budget
    ff, rf = fold_indices(40, 4, 0, salt=1), fold_indices(200, 4, 0, salt=2)
    fp = 0
    for j in range(4):
        ft = torch.cat([ff[i] for i in range(4) if i != j])
        rt = torch.cat([rf[i] for i in range(4) if i != j])
        box = Box.fit(f[ft], rank_dims(f[ft], r[rt])[: per_set.m])
        held = rf[j][rf[j] < 20]
        fp += int((box.depth(r[held]) <= per_set.scales[0]).sum())
    assert fp / 20 <= 0.1 + 1e-12
    assert pooled.fpr <= 0.1 + 1e-12  # pooled: the big set dilutes the small set's false positives


def test_query_depth_counts_any_key_of_a_query():
    """A query is inside when ANY of its keys (prompt or continuation) is."""
    from editor.methods.calibrate import KeySet

    f, r = _keys(4, n_r=10)
    box = Box.fit(f, torch.tensor([3, 7, 11]))
    far = r[:3].clone()
    cont = {0: torch.cat([f[:1], r[5:6]])}  # query 2 continues into a forget-like key; query 4 does not
    ks = KeySet.of({0: far}, cont, torch.tensor([2, 1]))
    depth = ks.query_depth(box, 0, torch.arange(3))
    assert depth[2] <= 1.0 and depth[0] > 1.0
    assert depth[1] == pytest.approx(min(box.depth(far[1:2]).item(), box.depth(r[5:6]).item()))


def test_continuation_keys_are_the_runtime_keys():
    """Each generated token fed back: its key equals the key at that position of a full forward."""
    from editor.model.arch import spec_for
    from tests.tiny import char_tokenizer, tiny_model

    model, tok = tiny_model("llama"), char_tokenizer()
    spec = spec_for(model.config)
    texts = ["12 + 7 = ", "the cat sat", "a"*5]
    prompt = collect.last_token_keys(model, tok, spec, texts, batch_size=2)
    cont, owner = collect.generated_keys(model, tok, spec, texts, new_tokens=4, batch_size=2)
    assert owner.tolist().count(0) == 3 and sorted(set(owner.tolist())) == [0, 1, 2]  # new_tokens - 1 per row (no EOS)
    for q, text in enumerate(texts):
        ids = tok([text])["input_ids"][0]
        seq = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=4, do_sample=False, pad_token_id=0)[0]
        full = collect.last_token_keys(model, tok, spec, [tok.decode(seq[1:k]) for k in range(len(ids), len(ids) + 4)])
        for layer in prompt:
            torch.testing.assert_close(prompt[layer][q], full[layer][0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(cont[layer][owner == q], full[layer][1:], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# end to end: profile → export on a tiny model
# ---------------------------------------------------------------------------------------------

FORGET, RETAIN, EVAL = QUERIES["forget"], QUERIES["retain"], QUERIES["eval"]


@pytest.fixture(scope="module")
def tiny_job(make_project):
    return calibration_project(make_project, "cal",
                               "key_space: {forget: forget, retain: retain, folds: 3, seed: 0, false_positive_budget: 0.05}")


def _guard_eval(monkeypatch, root: Path, seen: list[str], opened: list[str]):
    """After ``prepare`` validated the recipe (which reads every set), poison the scorecard set and
    record every file opened and every text the calibration collects keys of."""
    from editor import pipeline

    real_prepare = pipeline.prepare
    eval_path = str((root / "eval.jsonl").resolve())

    class Poison:
        name = "scorecard"

        def __getattr__(self, item):
            raise AssertionError(f"evaluation data touched: .{item}")

    state = {"spying": False}
    real_open, real_path_open = builtins.open, Path.open

    def spy_open(file, *a, **k):
        if state["spying"] and isinstance(file, (str, Path)):
            opened.append(str(Path(file).resolve()))
        return real_open(file, *a, **k)

    def spy_path_open(self, *a, **k):
        if state["spying"]:
            opened.append(str(self.resolve()))
        return real_path_open(self, *a, **k)

    def prepare(recipe):
        state["spying"] = False  # validation reads every set of the recipe, the scorecard's too
        job = real_prepare(recipe)
        job.sets["scorecard"] = Poison()
        state["spying"] = True
        return job

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(Path, "open", spy_path_open)

    real_collect = collect.last_token_keys

    def spy(model, tok, spec, texts, **kw):
        seen.extend(texts)
        return real_collect(model, tok, spec, texts, **kw)

    monkeypatch.setattr(pipeline, "prepare", prepare)
    monkeypatch.setattr(collect, "last_token_keys", spy)
    return eval_path


@pytest.mark.slow
def test_end_to_end_profile_export_matches_in_process(tiny_job, monkeypatch):
    from editor.cli import main
    from editor.pipeline import export_recipe, prepare, profile_job, profile_recipe
    from editor.profile.stats import load_stats

    root = tiny_job
    seen, opened = [], []
    eval_path = _guard_eval(monkeypatch, root, seen, opened)
    stats_path = profile_recipe(root / "recipe.yaml", root / "stats", progress=False)
    ckpt = export_recipe(root / "recipe.yaml", root / "stats", root / "ckpt")
    monkeypatch.undo()

    # the calibration saw the probe sets' texts only (forget, retain), never the scorecard's
    # ... and the default background negatives (the shipped ordinary prompts' calibration part), never
    # their held-out evaluation part (the scorecard's false-refusal set) nor the development part
    from editor import ordinary

    background = [r["text"] for r in ordinary.load("calibration")]
    assert sorted(set(seen)) == sorted(set(FORGET + RETAIN + background))
    assert not {r["text"] for r in ordinary.load() if r["part"] != "calibration"} & set(seen)
    assert opened and eval_path not in opened  # the spy saw files (config, tokenizer), never the eval file
    assert not {r["prompt"] for r in EVAL} & set(seen)

    # the choice is stored with the statistics and lands in the checkpoint config
    sf = load_stats(stats_path)
    cal = sf.sets["forget@neuron_adjust"]["calibration"]
    assert cal["method"] == "calibrated" and cal["config"]["retain"] == ["retain"]
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    plan = cfg["skill_editor"]["key_space"]["plan"]
    assert plan["method"] == "calibrated" and plan["layers"] == cal["layers"] and plan["scale"] == cal["scale"]
    assert plan["cv"]["retain_fpr"] <= 0.05 + 1e-12
    assert cfg["skill_editor"]["key_space"]["layers"] == cal["layers"]

    # deterministic: profiling again in memory plans the same bounds as the file
    from editor.model.loading import load_model, load_tokenizer

    job = prepare(root / "recipe.yaml")
    tok = load_tokenizer(job.recipe)
    model = load_model(job.recipe, job.config)
    mem = profile_job(job, model, tok, progress=False)  # leaves NA applied
    p_mem, p_file = job.plans(mem), job.plans(sf)
    assert p_mem.key_space_info == p_file.key_space_info
    for layer, b in p_file.key_space.items():
        assert torch.equal(b.lower, p_mem.key_space[layer].lower) and torch.equal(b.upper, p_mem.key_space[layer].upper)
        guarded = torch.isfinite(b.lower)
        assert int(guarded.sum()) == len(cal["dims"][str(layer)]) and torch.isinf(b.upper[~guarded]).all()

    # in-process decision (keys under NA, any chosen layer inside) == the checkpoint's `abstained`
    from editor.model.arch import spec_for

    spec = spec_for(job.config)
    texts = FORGET[:6] + RETAIN[:10] + [r["prompt"] for r in EVAL]
    keys = collect.last_token_keys(model, tok, spec, texts, batch_size=4, max_length=32)
    expect = torch.zeros(len(texts), dtype=torch.bool)
    for layer, b in p_file.key_space.items():
        expect |= calibrate.inside(keys[layer], b.lower, b.upper)
    assert expect[:6].any(), "the calibrated box should cover some forget queries"

    from editor.runtime.modeling_skill_editor import SkillEditorForCausalLM

    loaded = SkillEditorForCausalLM.from_pretrained(str(ckpt)).eval()
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        got = loaded(**enc).abstained
    assert got.tolist() == expect.tolist()

    # the CLI path gives the same checkpoint config
    res = CliRunner().invoke(main, ["export", str(root / "recipe.yaml"), "--stats", str(root / "stats"),
                                    "--out", str(root / "ckpt2")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    cfg2 = json.loads((root / "ckpt2" / "config.json").read_text())
    assert cfg2["skill_editor"] == cfg["skill_editor"]


@pytest.mark.slow
def test_stale_calibration_refused(tiny_job, tmp_path):
    """Stats calibrated under other settings (seed here) must not be exported silently."""
    from editor.pipeline import export_recipe, profile_recipe

    root = tiny_job
    stats = tmp_path / "stats"  # its own statistics: independent of test order and xdist workers
    profile_recipe(root / "recipe.yaml", stats, progress=False)
    text = (root / "recipe.yaml").read_text().replace("folds: 3, seed: 0", "folds: 3, seed: 1")
    other = root / "recipe-seed1.yaml"
    other.write_text(text)
    with pytest.raises(EditorError, match="calibration"):
        export_recipe(other, stats, tmp_path / "ck")


@pytest.mark.slow
def test_paper_ksd_stays_the_default(tiny_job, tmp_path):
    """No retain queries: the paper's KSD (every dim, the recipe's layer and α), no calibration."""
    from editor import pipeline
    from editor.model.loading import load_model, load_tokenizer
    from editor.pipeline import prepare, profile_job

    root = tiny_job
    text = (root / "recipe.yaml").read_text()
    text = text.replace("key_space: {forget: forget, retain: retain, folds: 3, seed: 0, false_positive_budget: 0.05}",
                        "key_space: {forget: forget, layer: 1, scale: 1.5}")
    text = text.replace("neuron_adjust: {forget: answers, retain: retain, top_percent: 5, mode: expected, seed: 0}\n", "")
    p = root / "recipe-paper.yaml"
    p.write_text(text)
    job = prepare(p)
    called = []
    orig = pipeline.calibrate_job
    pipeline.calibrate_job = lambda *a, **k: called.append(1) or orig(*a, **k)
    try:
        stats = profile_job(job, load_model(job.recipe, job.config), load_tokenizer(job.recipe), progress=False)
    finally:
        pipeline.calibrate_job = orig
    assert not called and "calibration" not in stats["forget"].info
    plans = job.plans(stats)
    assert plans.key_space_info["method"] == "paper" and list(plans.key_space) == [1]
    b = plans.key_space[1]
    assert b.dims == 48 and torch.isfinite(b.lower).all() and b.scale == 1.5
    assert math.isfinite(b.k)


@pytest.mark.slow
def test_onnx_export_with_inf_bounds(tiny_job, tmp_path):
    """The calibrated box (±inf outside the chosen dims) exports to ONNX and the graph's
    ``abstained`` agrees with PyTorch on forget and retain prompts (export_onnx validates it)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from editor.pipeline import export_recipe, profile_recipe

    stats = tmp_path / "stats"  # its own statistics: independent of test order and xdist workers
    profile_recipe(tiny_job / "recipe.yaml", stats, progress=False)
    out = export_recipe(tiny_job / "recipe.yaml", stats, tmp_path / "onnx", fmt="onnx")
    manifest = json.loads((Path(out) / "skill_editor.json").read_text())
    assert manifest["edit"]["key_space"]["plan"]["method"] == "calibrated"
    v = manifest["onnx"]["validation"]
    assert v["agree"] and v["abstention_checks"] > 0


# ---------------------------------------------------------------------------------------------
# the NA selection score of issue #9 (editor.methods.neuron_adjust.neuron_scores(..., "selective"))
# ---------------------------------------------------------------------------------------------


def test_selective_score_is_the_expected_displacement_gap():
    from editor.methods.neuron_adjust import Gaussian, na_constants, neuron_scores

    f = Gaussian.of(torch.tensor([2.0, 2.0, 0.5]), torch.tensor([0.5, 0.5, 1.0]))
    r = Gaussian.of(torch.tensor([0.0, 1.8, 0.0]), torch.tensor([0.5, 0.5, 1.0]))
    s = neuron_scores(f, r, "selective")
    # Monte Carlo of E_f[1(λ≥0)·π·|x'−x|] − E_r[...] with the NA constants
    k = na_constants(f, r)
    g = torch.Generator().manual_seed(0)

    def disp(under):
        x = under.mean[:, None] + under.std[:, None] * torch.randn(3, 200_000, generator=g, dtype=torch.float64)
        lam = k["a"][:, None] * x * x + k["b"][:, None] * x + k["c"][:, None]
        moved = (k["slope"][:, None] * x + k["offset"][:, None] - x).abs()
        return torch.where(lam >= 0, torch.sigmoid(lam) * moved, torch.zeros_like(x)).mean(1)

    torch.testing.assert_close(s, disp(f) - disp(r), atol=0.03, rtol=0.03)
    # two neurons with the same μf − μr: the one whose (wide) retain distribution the adjustment
    # also hits ranks lower; the paper's score cannot tell them apart
    wide = Gaussian.of(torch.tensor([0.0, 0.0]), torch.tensor([0.5, 3.0]))
    same_d = Gaussian.of(torch.tensor([2.0, 2.0]), torch.tensor([0.5, 0.5]))
    assert neuron_scores(same_d, wide, "paper")[0] == neuron_scores(same_d, wide, "paper")[1]
    sel = neuron_scores(same_d, wide, "selective")
    assert sel[0] > sel[1]


@pytest.mark.slow
def test_check_prompt_calibrates_on_prompt_keys_only(tiny_job, tmp_path, monkeypatch):
    """``check: prompt``: the runtime decides on the prompt's key alone, so the calibration scores
    each query by that key only (no continuation keys), records the rule, and statistics
    calibrated under the other rule are refused."""
    from editor.pipeline import export_recipe, profile_recipe

    root = tiny_job
    text = (root / "recipe.yaml").read_text()
    prompt_recipe = root / "recipe-prompt.yaml"
    prompt_recipe.write_text(text.replace("false_positive_budget: 0.05}", "false_positive_budget: 0.05, check: prompt}"))
    asked = []
    real = collect.generated_keys

    def spy(model, tok, spec, texts, *, new_tokens, **kw):
        asked.append(new_tokens)
        return real(model, tok, spec, texts, new_tokens=new_tokens, **kw)

    monkeypatch.setattr(collect, "generated_keys", spy)
    stats = tmp_path / "stats"
    profile_recipe(prompt_recipe, stats, progress=False)
    assert asked and all(n < 2 for n in asked)
    meta = json.loads(safe_open_meta(stats)["sets"])
    (record,) = [v["calibration"] for v in meta.values() if "calibration" in v]  # the KSD set (NA on)
    assert record["config"]["check"] == "prompt" and record["config"]["continuation_tokens"] == 0
    assert record["keys"] == {"forget": record["n_forget"], "retain": record["n_retain"]}
    out = export_recipe(prompt_recipe, stats, tmp_path / "ck")
    cfg = json.loads((Path(out) / "config.json").read_text())
    assert cfg["skill_editor"]["key_space"]["check"] == "prompt"
    with pytest.raises(EditorError, match="calibration"):
        export_recipe(root / "recipe.yaml", stats, tmp_path / "ck2")  # every_call recipe, prompt stats


def safe_open_meta(stats_dir: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(stats_dir / "stats.safetensors"), "pt") as f:
        return f.metadata()
