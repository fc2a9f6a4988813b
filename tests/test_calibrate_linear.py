"""The pooled linear detector's calibration (``key_space.detector: linear``, docs/GENERALIZATION.md
§4.3): the budget threshold, the logistic fit in kernel form against a literal feature-space fit,
determinism, the pooled keys against a literal one-text reference, the recipe rules, and profile →
export end to end (the calibration only ever sees the probe sets; export from the statistics file
reproduces the in-process checkpoint)."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch

from editor.methods import calibrate
from editor.methods.calibrate import budget_threshold, calibrate_linear, feature_moments, fit_kernel_logistic, gram
from editor.errors import EditorError
from editor.profile import collect
from tests.helpers import QUERIES, QUERY_SETS, calibration_project
from tests.reference import reference_pooled_keys
from tests.reference_methods import primal_logistic
from tests.tiny import save_tiny

FORGET, RETAIN, EVAL = QUERIES["forget"], QUERIES["retain"], QUERIES["eval"]

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0.0, 0.01, 0.05, 0.2])
def test_budget_threshold_is_the_smallest_within_budget_in_every_set(budget):
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(230, generator=g, dtype=torch.float64)
    group = torch.cat([torch.zeros(100), torch.ones(30), torch.full((100,), 2.0)]).long()
    scores[group == 1] += 1.5  # one set sits closer to the forget side: it decides the threshold
    t = budget_threshold(scores, group, budget)
    for k in range(3):
        s = scores[group == k]
        assert int((s > t).sum()) <= math.floor(budget * s.numel() + 1e-9)
    # minimal: any lower threshold (the next score below t) breaks the budget of some set
    below = scores[scores < t]
    if below.numel():
        t2 = float(below.max())
        assert any(int((scores[group == k] > t2).sum()) > math.floor(budget * int((group == k).sum()) + 1e-9) for k in range(3))


def test_budget_threshold_small_cases():
    scores = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    zeros = torch.zeros(3, dtype=torch.long)
    assert budget_threshold(scores, zeros, 0.99) == -1.0  # ⌊0.99·3⌋ = 2 allowed: only the lowest stays out
    assert budget_threshold(scores, zeros, 0.0) == 2.0  # none allowed: nothing may score above the top
    assert budget_threshold(scores, zeros, 0.34) == 0.3  # one allowed


def _clusters(seed: int, n_f=40, n_r=160, d=24, shift=3.0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n_f, d, generator=g)
    r = torch.randn(n_r, d, generator=g)
    f[:, 5] += shift
    f[:, 9] -= shift
    return f, r


def _kernel_fit(x: torch.Tensor, y: torch.Tensor):
    """``fit_kernel_logistic`` on one block of features, expressed back in the raw feature space."""
    blocks = [{0: x}]
    mu, sd = feature_moments(blocks, [0])
    alpha, b = fit_kernel_logistic(gram(blocks, [0], mu, sd), y)
    z = (x.double() - mu[0]) / sd[0]
    w = (z.T @ alpha) / sd[0]
    return w, b - float((w * mu[0]).sum())


@pytest.mark.parametrize("n_f,n_r,d", [(40, 160, 24), (12, 18, 90)])  # more rows than features, and fewer
def test_kernel_fit_is_the_feature_space_fit(n_f, n_r, d):
    """The fit in the span of the rows (Gram matrix, eigendecomposition) minimizes the same objective
    as a literal fit over the features: the same detector (scores and weights)."""
    f, r = _clusters(0, n_f=n_f, n_r=n_r, d=d)
    f, r = f * 7 + 100, r * 7 + 100  # far from standardized: (w, b) must undo the standardization
    x = torch.cat([f, r])
    y = torch.cat([torch.ones(n_f), torch.zeros(n_r)])
    w, b = _kernel_fit(x, y)
    w_ref, b_ref = primal_logistic(x, y)
    s, s_ref = x.double() @ w + b, x.double() @ w_ref + b_ref
    assert (s[:n_f] > 0).float().mean() > 0.95 and (s[n_f:] < 0).float().mean() > 0.95
    torch.testing.assert_close(s, s_ref, atol=2e-4 * float(s_ref.abs().max()), rtol=0)
    torch.testing.assert_close(w, w_ref, atol=2e-4 * float(w_ref.abs().max()), rtol=0)
    if n_f + n_r > d:  # enough rows to find the two informative features
        assert set(torch.topk(w.abs(), 2).indices.tolist()) == {5, 9}


def test_kernel_fit_refuses_one_class_and_non_finite():
    x = torch.randn(10, 3)
    with pytest.raises(EditorError):
        _kernel_fit(x, torch.zeros(10))
    x[0, 0] = float("nan")
    with pytest.raises(EditorError, match="non-finite"):
        _kernel_fit(x, torch.cat([torch.ones(5), torch.zeros(5)]))


def _layers(f, r):
    """Split the features in two 'layers' of 12 dims, as the calibration receives them."""
    return {0: f[:, :12], 1: f[:, 12:]}, {0: r[:, :12], 1: r[:, 12:]}


def test_calibrate_linear_deterministic_and_within_budget():
    f, r = _clusters(1)
    fk, rk = _layers(f, r)
    group = torch.cat([torch.zeros(80), torch.ones(80)]).long()
    rec1, w1 = calibrate_linear(fk, rk, group, budget=0.05, folds=4, seed=0, retain_names=["a", "b"])
    rec2, w2 = calibrate_linear(fk, rk, group, budget=0.05, folds=4, seed=0, retain_names=["a", "b"])
    assert rec1 == rec2 and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert sorted(w1) == [0, 1] and w1[0].dtype == torch.float32 and w1[0].shape == (12,)
    cv = rec1["cv"]
    assert cv["forget_coverage"] > 0.9
    assert all(v <= 0.05 + 1e-12 for v in cv["retain_fpr_by_set"].values()) and set(cv["retain_fpr_by_set"]) == {"a", "b"}
    # another seed: other folds, still a valid record
    rec3, _ = calibrate_linear(fk, rk, group, budget=0.05, folds=4, seed=7, retain_names=["a", "b"])
    assert rec3["cv"]["seed"] == 7


def test_calibrated_detector_generalizes_to_fresh_draws_of_the_same_clusters():
    """The final detector (averaged fold models, shifted by the cross-fitted threshold), applied
    the way the runtime does — Σ_layers weight·key + bias > 0 — to new samples."""
    f, r = _clusters(2)
    fk, rk = _layers(f, r)
    group = torch.zeros(len(r), dtype=torch.long)
    rec, w = calibrate_linear(fk, rk, group, budget=0.02, folds=5, seed=0)
    f2, r2 = _clusters(99, n_f=400, n_r=2000)
    fk2, rk2 = _layers(f2, r2)
    score = lambda k: sum(k[i].double() @ w[i].double() for i in w) + rec["bias"]  # noqa: E731
    assert (score(fk2) > 0).float().mean() > 0.9
    assert (score(rk2) > 0).float().mean() < 0.05


# ---------------------------------------------------------------------------------------------
# pooled keys vs a literal one-text reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_pooled_keys_are_the_max_over_every_real_token(arch, side, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editor.model.arch import spec_for

    save_tiny(arch, tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    spec = spec_for(model.config)
    texts = ["3 + 4 = ", "the cat sat on the long mat", "a", "12 + 19 = 31 and more"]
    got = collect.pooled_keys(model, tok, spec, texts, batch_size=3, padding_side=side)
    want = reference_pooled_keys(model, [tok(t)["input_ids"] for t in texts])
    assert set(want) == set(got)
    for i in want:
        torch.testing.assert_close(got[i], want[i], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# recipe rules
# ---------------------------------------------------------------------------------------------


def _recipe(root: Path, key_space: str) -> Path:
    p = root / "r.yaml"
    p.write_text(textwrap.dedent(f"""\
        model: model
        data:
          forget: {{path: forget.jsonl}}
          retain: {{path: retain.jsonl}}
        key_space: {key_space}
        """), encoding="utf-8")
    return p


@pytest.mark.parametrize("key_space,match", [
    ("{forget: forget, detector: linear, check: prompt}", "retain queries"),
    ("{forget: forget, retain: retain, detector: linear}", "check: prompt"),
    ("{forget: forget, retain: retain, detector: linear, check: prompt, calibrate: false}", "retain queries"),
    ("{forget: forget, retain: retain, detector: cone, check: prompt}", "detector"),
    ("{forget: forget, retain: retain, detector: linear, check: prompt, max_features: 10}", "unknown key"),
])
def test_recipe_rules_of_the_linear_detector(tmp_path, key_space, match):
    from editor.recipe import load_recipe

    with pytest.raises(EditorError, match=match):
        load_recipe(_recipe(tmp_path, key_space))


# ---------------------------------------------------------------------------------------------
# end to end on a tiny model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linear_job(make_project):
    return calibration_project(make_project, "lin", """key_space: {forget: forget, retain: retain, detector: linear, check: prompt, folds: 3, seed: 0,
                    false_positive_budget: 0.05}""")


@pytest.mark.slow
def test_linear_end_to_end_never_sees_eval_and_export_reproduces(linear_job, monkeypatch):
    from editor import pipeline
    from editor.pipeline import export_recipe, prepare, profile_job, profile_recipe
    from editor.profile.stats import load_stats

    root = linear_job
    seen: list[str] = []
    real_prepare, real_collect = pipeline.prepare, collect.pooled_keys

    class Poison:
        name = "scorecard"

        def __getattr__(self, item):
            raise AssertionError(f"evaluation data touched: .{item}")

    def prepare_(recipe):
        job = real_prepare(recipe)
        job.sets["scorecard"] = Poison()
        return job

    def spy(model, tok, spec, texts, **kw):
        seen.extend(texts)
        return real_collect(model, tok, spec, texts, **kw)

    monkeypatch.setattr(pipeline, "prepare", prepare_)
    monkeypatch.setattr(collect, "pooled_keys", spy)
    stats_path = profile_recipe(root / "recipe.yaml", root / "stats", progress=False)
    ckpt = export_recipe(root / "recipe.yaml", root / "stats", root / "ckpt")
    monkeypatch.undo()
    # ... and the default background negatives (the shipped ordinary prompts' calibration part), never
    # their held-out evaluation part (the scorecard's false-refusal set) nor the development part
    from editor import ordinary

    background = [r["text"] for r in ordinary.load("calibration")]
    assert sorted(set(seen)) == sorted(set(FORGET + RETAIN + background))
    assert not {r["text"] for r in ordinary.load() if r["part"] != "calibration"} & set(seen)
    assert not {r["prompt"] for r in EVAL} & set(seen)

    sf = load_stats(stats_path)
    cal = sf.sets["forget@neuron_adjust"]["calibration"]
    mcfg = json.loads((root / "model" / "config.json").read_text())
    assert cal["method"] == "linear" and cal["config"]["detector"] == "linear"
    assert cal["layers"] == list(range(mcfg["num_hidden_layers"]))  # every layer
    assert all(sf.detector("forget@neuron_adjust", i).shape == (mcfg["intermediate_size"],) for i in cal["layers"])
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    ks = cfg["skill_editor"]["key_space"]
    assert ks["detector"] == "linear" and ks["check"] == "prompt" and ks["plan"]["method"] == "linear"
    assert ks["plan"]["cv"]["retain_fpr"] <= 0.05 + 1e-12

    # profiling again in memory plans the same detector as the file, bit for bit
    from editor.model.loading import load_model, load_tokenizer

    job = prepare(root / "recipe.yaml")
    tok = load_tokenizer(job.recipe)
    model = load_model(job.recipe, job.config)
    mem = profile_job(job, model, tok, progress=False)  # leaves NA applied
    p_mem, p_file = job.plans(mem), job.plans(sf)
    assert p_mem.key_space_info == p_file.key_space_info
    for layer, share in p_file.key_space.items():
        assert torch.equal(share.weight, p_mem.key_space[layer].weight) and share.bias == p_mem.key_space[layer].bias

    # the checkpoint's `abstained` == the literal rule on keys pooled by the calibration's collector
    from editor.model.arch import spec_for
    from editor.runtime.modeling_skill_editor import SkillEditorForCausalLM

    spec = spec_for(job.config)
    texts = FORGET[:6] + RETAIN[:10] + [r["prompt"] for r in EVAL]
    pooled = collect.pooled_keys(model, tok, spec, texts, batch_size=4, max_length=32)
    score = sum(pooled[i].double() @ p_file.key_space[i].weight.double() + p_file.key_space[i].bias for i in pooled)
    expect = score > 0
    assert expect[:6].any() and not expect[6:16].all(), "the detector should tell some forget from retain queries"
    loaded = SkillEditorForCausalLM.from_pretrained(str(ckpt)).eval()
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        got = loaded(**enc).abstained
    assert got.tolist() == expect.tolist()


@pytest.mark.slow
def test_box_statistics_refused_for_a_linear_recipe(linear_job, tmp_path):
    """Statistics calibrated for the hypercube must not be exported as a linear detector (and back)."""
    from editor.pipeline import export_recipe, profile_recipe

    root = linear_job
    box = root / "recipe-box.yaml"
    box.write_text((root / "recipe.yaml").read_text().replace("detector: linear, check: prompt", "check: prompt"))
    stats = tmp_path / "stats"
    profile_recipe(box, stats, progress=False)
    with pytest.raises(EditorError, match="calibration"):
        export_recipe(root / "recipe.yaml", stats, tmp_path / "ck")


@pytest.mark.slow
def test_dry_run_and_inspect_describe_the_linear_detector(linear_job, tmp_path):
    from click.testing import CliRunner

    from editor.cli import main
    from editor.pipeline import export_recipe, profile_recipe

    root = linear_job
    res = CliRunner().invoke(main, ["run", str(root / "recipe.yaml"), "--dry-run"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "pooled linear detector" in res.output and "of pooled keys" in res.output
    assert "the recipe's layer (-1) and scale (2) are not used" in res.output

    stats = tmp_path / "stats"
    profile_recipe(root / "recipe.yaml", stats, progress=False)
    ckpt = export_recipe(root / "recipe.yaml", stats, tmp_path / "ck")
    res = CliRunner().invoke(main, ["inspect", str(ckpt)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "pooled linear detector over layers" in res.output
    assert "plan: linear, fitted on retain" in res.output and "out-of-fold forget coverage" in res.output
    card = (Path(ckpt) / "README.md").read_text()
    assert "pooled linear detector" in card and "out of fold" in card


def test_calibrate_linear_leaves_its_keys_alone():
    f, r = _clusters(5)
    fk, rk = _layers(f, r)
    f0, r0 = {k: v.clone() for k, v in fk.items()}, {k: v.clone() for k, v in rk.items()}
    calibrate_linear(fk, rk, torch.zeros(len(r), dtype=torch.long), budget=0.05, folds=4, seed=0)
    assert all(torch.equal(fk[k], f0[k]) and torch.equal(rk[k], r0[k]) for k in fk)


# ---------------------------------------------------------------------------------------------
# non-negative weights (key_space.weights: nonnegative)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [12, 240])
def test_nonnegative_fit_is_the_bounded_optimum(d):
    """L-BFGS-B's answer satisfies the optimality conditions of the bounded problem, checked literally:
    at a free weight (> 0) the gradient is 0, at a weight held at 0 it is ≥ 0 (it would only rise).
    With 240 features most weights end on their bound (the scores then read only the positive ones'
    columns)."""
    from editor.methods.calibrate import fit_nonnegative_logistic

    f, r = _clusters(3, n_f=40, n_r=120, d=d)
    f[:, 12:] -= 1.5  # the added features are lower for the forget side: their weights end at 0
    x = torch.cat([f, r]).double()
    z = (x - x.mean(0)) / x.std(0, unbiased=False)
    y = torch.cat([torch.ones(40), torch.zeros(120)]).double()
    w, b = fit_nonnegative_logistic(z, y)
    assert (w >= 0).all() and w[5] > 0 and w[9] == 0  # feature 9 is lower for the forget side: no weight
    wt = w.clone().requires_grad_(True)
    bt = torch.tensor([b], dtype=torch.float64, requires_grad=True)
    pw = torch.tensor(120 / 40, dtype=torch.float64)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ wt + bt, y, pos_weight=pw) + 1e-3 * (wt * wt).sum()
    gw, gb = torch.autograd.grad(loss, [wt, bt])
    assert abs(float(gb)) < 1e-5
    free = w > 1e-8
    tol = 1e-5 if d == 12 else 5e-5  # the fit's products are float32: its gradient is that accurate
    assert gw[free].abs().max() < tol and (gw[~free] > -tol).all()
    if d > 12:
        assert int(free.sum()) * 4 < d


def test_fold_separations_are_each_folds_training_separation():
    """``fold_separations`` (one pass, sums per fold) equals, for every fold, ``separation_signed``
    of the training rows taken literally (every row outside the fold, both sides)."""
    from editor.methods.calibrate import fold_indices, fold_separations, separation_signed

    f, r = _clusters(4, n_f=30, n_r=70, d=20)
    fk, rk = _layers(f, r)
    layers = sorted(fk)
    mu, _ = feature_moments([fk, rk], layers)
    ff, rf = fold_indices(30, 3, 0, salt=1), fold_indices(70, 3, 0, salt=2)
    got = fold_separations([fk, rk], layers, mu, ff, [30 + i for i in rf])
    for k in range(3):
        keep_f = torch.cat([ff[j] for j in range(3) if j != k])
        keep_r = torch.cat([rf[j] for j in range(3) if j != k])
        want = torch.cat([separation_signed(fk[layer][keep_f], rk[layer][keep_r]) for layer in layers])
        assert torch.allclose(got[k], want, rtol=1e-9, atol=1e-12), k


def test_nonnegative_detector_never_drops_when_text_is_added():
    """With non-negative weights a max-pooled score is monotone: pooling more tokens (a story around
    the request) can only raise it — unlike signed weights, which the same added text can pull down."""
    f, r = _clusters(6, n_f=60, n_r=240, d=24)
    f[:, 9] += 6.0  # the forget side higher in two features (a non-negative detector reads only rises)
    f[:, 17] += 3.0
    fk, rk = _layers(f, r)
    group = torch.zeros(len(r), dtype=torch.long)
    rec, w = calibrate_linear(fk, rk, group, budget=0.02, folds=4, seed=0, weights="nonnegative")
    assert rec["weights"] == "nonnegative" and all((w[i] >= 0).all() for i in w)
    assert rec["cv"]["forget_coverage"] > 0.9 and rec["cv"]["retain_fpr"] <= 0.02 + 1e-12
    g = torch.Generator().manual_seed(1)
    request = {i: fk[i][:10] for i in fk}
    story = {i: torch.randn(10, 12, generator=g) * 3 for i in fk}
    pooled = {i: torch.maximum(request[i], story[i]) for i in fk}  # max-pool over request + story tokens
    score = lambda k: sum(k[i].double() @ w[i].double() for i in w) + rec["bias"]  # noqa: E731
    assert (score(pooled) >= score(request) - 1e-9).all()
    rec_s, w_s = calibrate_linear(fk, rk, group, budget=0.02, folds=4, seed=0)
    assert any((w_s[i] < 0).any() for i in w_s)  # the signed detector has weights the story can pull down


def test_weights_field_is_for_the_linear_detector():
    from editor.recipe import parse_recipe

    base = {"model": "m", "data": {"f": {"path": "f.jsonl"}, "r": {"path": "r.jsonl"}}}
    with pytest.raises(EditorError, match="key_space.weights: applies to the linear detector only"):
        parse_recipe({**base, "key_space": {"forget": "f", "retain": "r", "weights": "nonnegative"}})
    r = parse_recipe({**base, "key_space": {"forget": "f", "retain": "r", "detector": "linear", "check": "prompt",
                                              "weights": "nonnegative"}})
    assert calibrate.calibration_config(r)["weights"] == "nonnegative"
    r2 = parse_recipe({**base, "key_space": {"forget": "f", "retain": "r", "detector": "linear", "check": "prompt"}})
    assert "weights" not in calibrate.calibration_config(r2)  # statistics fitted before the field stay valid


@pytest.mark.parametrize("threads", [1, 2])
def test_nonnegative_fit_keeps_numpy_to_one_thread(monkeypatch, threads):
    """The bounded fit runs scipy (numpy's BLAS) on one thread whatever torch's thread count (the
    command's --threads), never on every core of the machine."""
    import scipy.optimize
    from threadpoolctl import threadpool_info

    seen = []
    real = scipy.optimize.minimize

    def spy(*a, **kw):
        seen.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
        return real(*a, **kw)

    monkeypatch.setattr(scipy.optimize, "minimize", spy)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        z = torch.randn(40, 6, generator=g)
        y = (z[:, 0] > 0).double()
        calibrate.fit_nonnegative_logistic(z, y)
    finally:
        torch.set_num_threads(old)
    assert seen and all(s <= {1} for s in seen), seen


def _linear_job(make_project, name: str):
    """A prepared job with a calibrated non-negative linear detector and no Neuron Adjust (its profile
    pass collects the forget keys), its model and tokenizer."""
    from editor.model.loading import load_model, load_tokenizer
    from editor.pipeline import prepare

    recipe = make_project(name, """\
        key_space: {forget: forget, retain: retain, detector: linear, check: prompt, folds: 3, seed: 0,
                    false_positive_budget: 0.05, weights: nonnegative}
        """, files=QUERIES, sets=QUERY_SETS, profile="{batch_size: 8, max_length: 32}")
    job = prepare(recipe)
    return job, load_model(job.recipe, job.config), load_tokenizer(job.recipe)


def test_profile_pass_collects_the_forget_keys_once(make_project, monkeypatch):
    """Without Neuron Adjust, the pooled linear detector's forget keys come from the pass that
    profiles the forget set (not a second pass over it), and the detector is the one a separate
    collection gives, bit for bit (with every prompt read whole, as the profile pass reads it: shared
    prefixes round differently)."""
    from editor.model.arch import spec_for
    from editor.pipeline import calibrate_job, profile_job
    from editor.profile import prefix

    monkeypatch.setattr(prefix, "PREFIX_CALL_TOKENS", 10**9)  # no group saves that much

    job, model, tok = _linear_job(make_project, "shared-keys")
    passes: list[list[str]] = []
    real = collect.pooled_keys

    def spy(m, t, spec, texts, **kw):
        passes.append(list(texts))
        return real(m, t, spec, texts, **kw)

    monkeypatch.setattr(collect, "pooled_keys", spy)
    shared = profile_job(job, model, tok, progress=False)
    assert not any(set(p) & set(QUERIES["forget"]) for p in passes), "the forget set ran through the model again"
    assert passes, "the negatives are collected in their own pass"
    record, weights = calibrate_job(job, model, tok, spec_for(job.config))  # forget keys collected on their own
    monkeypatch.setattr(collect, "pooled_keys", real)
    assert any(set(p) == set(QUERIES["forget"]) for p in passes)
    got = shared["forget"]
    assert got.info["calibration"]["bias"] == record["bias"]
    assert all(torch.equal(got.detector[i], weights[i]) for i in weights)


def test_forget_keys_are_freed_inside_the_fit(make_project, monkeypatch):
    """The forget set's keys that the profile pass collected are handed over (``PerTextKeys.take``:
    the tap keeps no reference) and freed inside the ``calibration fit`` stage, before its heap trim —
    not when the profile job returns: the stages after it do not carry them."""
    import weakref

    from editor.pipeline import profile_job
    from editor.progress import listen

    job, model, tok = _linear_job(make_project, "handed-keys")
    refs: list = []
    real_take = collect.PerTextKeys.take

    def take(self):
        keys = real_take(self)
        assert self.keys == {}
        refs.extend(weakref.ref(t) for t in keys.values())
        return keys

    monkeypatch.setattr(collect.PerTextKeys, "take", take)
    alive: list[int] = []
    with listen(lambda name, wall, cpu: alive.append(sum(r() is not None for r in refs)) if name == "calibration fit" else None):
        profile_job(job, model, tok, progress=False)
    assert refs and alive == [0], (len(refs), alive)
