"""The planning math (editor.methods) and the runtime NA / KSD modules against the literal
formulas of DESIGN §3 (tests/reference_methods.py), plus one test per defect of the paper's
public code that we do not copy."""

from __future__ import annotations

import math

import pytest
import torch

from editor.errors import EditorError
from editor.methods import SIGMA_FLOOR
from editor.methods.key_space import ksd_bounds
from editor.methods.neuron_adjust import (
    Gaussian,
    na_constants,
    neuron_scores,
    plan_neuron_adjust,
    select_neurons,
    selection_count,
)
from editor.runtime.modeling_skill_editor import KeySpace, NeuronAdjust, neuron_adjust
from tests import reference_methods as ref


def na_module(mf, sf, mr, sr, mode, seed=0, layer=0):
    """A runtime NA module for len(mf) neurons, constants planned by editor.methods."""
    consts = na_constants(Gaussian.of(mf, sf), Gaussian.of(mr, sr))
    n = len(consts["a"])
    m = NeuronAdjust(n, n, mode=mode, seed=seed, layer=layer)
    with torch.no_grad():
        for k, v in consts.items():
            getattr(m, k).copy_(v)
    return m


def random_stats(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(4, n, generator=g, dtype=torch.float64)
    mf, mr = z[0], 0.7 * z[1]
    sf, sr = torch.exp(0.5 * z[2]), torch.exp(0.5 * z[3])
    return [t.float().double() for t in (mf, sf, mr, sr)]


# ------------------------------------------------------------------------------------------
# Neuron Adjust: the runtime function against the Gaussian log-densities
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["expected", "hard"])
def test_na_matches_log_density_formula(mode):
    mf, sf, mr, sr = random_stats(64)
    # edge cases: σ = 0, σ below the floor, both floored, forget == retain, μf < 0, huge ratio
    sf[0] = 0.0
    sr[1] = 0.0
    sf[2], sr[2] = 0.0, 1e-9
    sf[3] = 1e-8
    mf[4], sf[4] = mr[4], sr[4]
    mf[5] = -3.0
    sf[6], sr[6] = 1e-3, 10.0
    m = na_module(mf, sf, mr, sr, mode)
    g = torch.Generator().manual_seed(1)
    x = (mf + 2.0 * torch.randn(500, 64, generator=g, dtype=torch.float64) * ref.floor(sf).clamp(min=0.05)).float()
    # and values right at / next to each neuron's means (where a, b, c cancel when σ is floored)
    near = torch.stack([mf, mr, mf + 1e-6, mf - 3e-6, mf + 1e-4, mr + 1e-4]).float()
    x = torch.cat([x, near])
    got = m(x).double()
    want = ref.adjust(x.double(), mf, sf, mr, sr, mode)
    lam = ref.llr(x.double(), mf, sf, mr, sr)
    fired = lam >= 0
    assert fired.any() and (~fired).any()
    # the floored neurons do fire at their forget mean (λ(μf) = ln(σr/σf) + ½((μf−μr)/σr)² > 0)
    assert fired[-6, [0, 2, 3]].all()
    tol = 1e-6 * (1 + want.abs())
    assert ((got - want).abs() <= tol).all(), (got - want).abs().max()


def test_floored_neuron_near_its_mean_is_exact():
    """With σf at the 1e-6 floor and μf ≈ 0.87, λ near μf is a sum of terms ~1e11: float32
    constants give λ(μf + 1.7e-4) = 0 (fires, maps x to ~−150) where the truth is −14112."""
    mf, sf, mr, sr = (torch.tensor([v], dtype=torch.float64) for v in (0.8654988408088684, 0.0, 0.5908187627792358, 0.9015723466873169))
    x = torch.tensor([0.865666925907135, 0.8654988408088684], dtype=torch.float32)[:, None]
    for mode in ("hard", "expected"):
        got = na_module(mf, sf, mr, sr, mode)(x).double()
        want = ref.adjust(x.double(), mf, sf, mr, sr, mode)
        assert got[0, 0] == x[0, 0], "λ = −14112: not adjusted"
        assert abs(got[1, 0] - want[1, 0]) < 1e-6 and abs(want[1, 0] - mr[0]) < 1e-6, "at μf: mapped onto μr"


def test_na_constants_are_the_closed_form():
    mf, sf, mr, sr = random_stats(32, seed=3)
    c = na_constants(Gaussian.of(mf, sf), Gaussian.of(mr, sr))
    x = torch.linspace(-4, 4, 17, dtype=torch.float64)[:, None]
    lam = (c["a"] * x + c["b"]) * x + c["c"]
    assert torch.allclose(lam, ref.llr(x, mf, sf, mr, sr), rtol=1e-9, atol=1e-9)
    assert torch.allclose(c["slope"] * x + c["offset"], ref.mapped(x, mf, sf, mr, sr), rtol=1e-12, atol=1e-12)


def test_empty_na_module_is_identity():
    m = NeuronAdjust(0, 8, mode="sample")
    y = torch.randn(2, 3, 8)
    assert torch.equal(m(y), y)


# ------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------


def test_selection_count():
    for n_total in (1, 7, 96, 1000, 2**20):
        for p in (1e-4, 0.5, 3.0, 33.3, 50.0, 100.0):
            assert selection_count(p, n_total) == max(1, round(p * n_total / 100))
    for bad in (0, -1, 100.5):
        with pytest.raises(EditorError):
            selection_count(bad, 10)


def test_selection_global_top_p_ties_by_layer_then_index():
    # all equal: the first n in (layer, index) order, whatever the dict order
    flat = {2: torch.zeros(5), 0: torch.zeros(5), 1: torch.zeros(5)}
    got = select_neurons(flat, 100 * 7 / 15)
    assert {i: v.tolist() for i, v in got.items()} == {0: [0, 1, 2, 3, 4], 1: [0, 1], 2: []}
    # many ties, several percentages: the literal sort
    g = torch.Generator().manual_seed(0)
    scores = {i: torch.randint(0, 4, (23,), generator=g).double() for i in range(4)}
    for p in (0.5, 3, 10, 27.5, 50, 99, 100):
        got = select_neurons(scores, p)
        want = ref.select(scores, p)
        assert {i: v.tolist() for i, v in got.items()} == want, p
        assert sum(len(v) for v in want.values()) == max(1, round(p * 92 / 100))


@pytest.mark.parametrize("score", ["paper", "standardized"])
def test_plan_selection_matches_literal(score):
    forget, retain, scores = {}, {}, {}
    for i in range(3):
        mf, sf, mr, sr = random_stats(40, seed=10 + i)
        sf[0] = 0.0  # the floor reaches the standardized score too
        if i == 1:
            mf = mr - 5  # nothing selected in layer 1
        forget[i], retain[i] = Gaussian.of(mf, sf), Gaussian.of(mr, sr)
        scores[i] = ref.paper_score(mf, mr) if score == "paper" else ref.standardized_score(mf, sf, mr, sr)
    plan = plan_neuron_adjust(forget, retain, top_percent=20.0, mode="hard", seed=0, score=score)
    want = ref.select(scores, 20.0)
    assert {i: lp.selected.tolist() for i, lp in plan.layers.items()} == want
    assert plan.counts[1] == 0 and plan.layers[1].permutation.tolist() == list(range(40))
    for i, lp in plan.layers.items():
        sel = lp.selected
        assert lp.permutation[: len(sel)].tolist() == sel.tolist()
        assert sorted(lp.permutation.tolist()) == list(range(40))
        c = lp.constants
        mf, sf, mr, sr = forget[i].mean[sel], forget[i].std[sel], retain[i].mean[sel], retain[i].std[sel]
        x = torch.linspace(-2, 2, 5, dtype=torch.float64)[:, None]
        assert torch.allclose((c["a"] * x + c["b"]) * x + c["c"], ref.llr(x, mf, sf, mr, sr), rtol=1e-9, atol=1e-6)


def test_standardized_score_is_scale_free():
    mf, sf, mr, sr = random_stats(10, seed=4)
    s1 = neuron_scores(Gaussian.of(mf, sf), Gaussian.of(mr, sr), "standardized")
    s2 = neuron_scores(Gaussian.of(7 * mf, 7 * sf), Gaussian.of(7 * mr, 7 * sr), "standardized")
    assert torch.allclose(s1, s2) and torch.allclose(s1, ref.standardized_score(mf, sf, mr, sr))
    assert not torch.allclose(neuron_scores(Gaussian.of(7 * mf, 7 * sf), Gaussian.of(7 * mr, 7 * sr), "paper"), s1)


def test_sigma_floor_in_both_methods():
    zero = torch.zeros(3, dtype=torch.float64)
    mean = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    assert torch.equal(Gaussian.of(mean, zero).std, torch.full((3,), SIGMA_FLOOR, dtype=torch.float64))
    # NA constants: σ = 0 (even bypassing Gaussian.of) is σ = 1e-6
    raw = na_constants(Gaussian(mean, zero), Gaussian(mean + 1, torch.ones(3, dtype=torch.float64)))
    floored = na_constants(Gaussian.of(mean, torch.full((3,), 1e-6)), Gaussian.of(mean + 1, torch.ones(3)))
    for k in raw:
        assert torch.isfinite(raw[k]).all() and torch.equal(raw[k], floored[k]), k
    assert torch.isfinite(neuron_scores(Gaussian(mean, zero), Gaussian(mean, zero), "standardized")).all()
    # KSD: a dimension constant over the probes has σ = 1e-6
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(10, 4, generator=g, dtype=torch.float64)
    keys[:, 1] = 0.75
    b = ksd_bounds(keys.mean(0), keys.std(0), keys.min(0).values, keys.max(0).values, 1.5)
    box = ref.KSDBox(keys, 1.5)
    assert box.sigma[1] == SIGMA_FLOOR
    half = 1.5 * box.k * SIGMA_FLOOR
    assert abs(float(b.upper[1]) - (0.75 + half)) < 1e-7 and abs(float(b.lower[1]) - (0.75 - half)) < 1e-7


# ------------------------------------------------------------------------------------------
# Key Space Detection bounds and the runtime box test
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.8, 1.0, 2.0])
def test_ksd_bounds_match_literal_box(scale):
    g = torch.Generator().manual_seed(5)
    keys = (torch.randn(12, 16, generator=g) * torch.linspace(0.01, 3, 16) + torch.linspace(-2, 2, 16)).float()
    keys[:, 3] = 0.25  # constant dimension
    k64 = keys.double()
    b = ksd_bounds(k64.mean(0), k64.std(0), k64.min(0).values, k64.max(0).values, scale)
    box = ref.KSDBox(keys, scale)
    assert math.isclose(b.k, box.k, rel_tol=1e-12) and b.dims == 16
    assert torch.allclose(b.lower.double(), box.mu - scale * box.k * box.sigma, rtol=1e-6, atol=1e-7)
    assert torch.allclose(b.upper.double(), box.mu + scale * box.k * box.sigma, rtol=1e-6, atol=1e-7)
    ks = KeySpace(16)
    with torch.no_grad():
        ks.lower.copy_(b.lower)
        ks.upper.copy_(b.upper)
    # probes and perturbed probes
    noise = torch.randn(48, 16, generator=g) * keys.std(0) * torch.tensor([0.05, 2.0]).repeat_interleave(24)[:, None]
    q = torch.cat([keys, keys.repeat(4, 1) + noise])
    q[:, 3] = torch.where(torch.rand(60, generator=g) < 0.9, torch.tensor(0.25), torch.tensor(0.2501))
    ks.observe(q)
    want = box.inside(q)
    clear = box.margin(q).abs() > 1e-5
    assert torch.equal(ks.inside[clear], want[clear]) and clear.float().mean() > 0.9
    assert want.any() and (~want).any()
    if scale >= 1:
        assert box.inside(keys).all() or scale == 1.0  # α ≥ 1 keeps every probe (α = 1: on the edge)


def test_ksd_bad_scale():
    with pytest.raises(EditorError):
        ksd_bounds(torch.zeros(2), torch.ones(2), torch.zeros(2), torch.ones(2), 0.0)


# ------------------------------------------------------------------------------------------
# sample mode: π(x) statistics, per-element draws, seeds
# ------------------------------------------------------------------------------------------

# one neuron type: μf = 1, σf = 1, μr = −1, σr = 1  ⇒  λ(x) = 2x, x′ = −x
_LINEAR = dict(mf=[1.0], sf=[1.0], mr=[-1.0], sr=[1.0])


def _repeat(stats, n):
    return {k: torch.tensor(v * n, dtype=torch.float64) for k, v in stats.items()}


def test_sample_rate_matches_posterior():
    xs = torch.tensor([-0.6, -0.2, -0.01, 0.01, 0.05, 0.2, 0.4, 0.7, 1.0, 1.5])  # x′ = −x ≠ x
    k = len(xs)
    s = _repeat(_LINEAR, k)
    m = na_module(s["mf"], s["sf"], s["mr"], s["sr"], "sample", seed=11)
    rows = 4000
    y = xs.repeat(rows, 1)
    out = m(y)
    replaced = out != y
    assert torch.equal(out[replaced], (-y)[replaced]), "a replaced value is x′"
    rate = replaced.double().mean(0)
    lam = ref.llr(xs.double(), 1.0, 1.0, -1.0, 1.0)
    assert torch.allclose(lam, 2 * xs.double())
    p = torch.where(lam >= 0, torch.sigmoid(lam), torch.zeros_like(lam))
    tol = 5 * torch.sqrt(p * (1 - p) / rows) + 1e-12
    assert ((rate - p).abs() <= tol).all(), (rate, p)
    assert rate[xs < 0].eq(0).all(), "λ < 0: never replaced, although π > 0"
    # overall: the mean replaced fraction is the mean posterior
    assert abs(rate.mean() - p.mean()) < 5 * math.sqrt(0.25 / (rows * k))


def test_sample_draws_are_per_element():
    """The paper draws one number per batch row; ours draws per element: equal x in one row,
    in two neurons with equal constants or at several positions, are adjusted independently."""
    s = _repeat(_LINEAR, 2)
    m = na_module(s["mf"], s["sf"], s["mr"], s["sr"], "sample", seed=3)
    x = 0.3
    p = float(torch.sigmoid(torch.tensor(2 * x)))
    rows, positions = 2000, 10
    y = torch.full((rows, positions, 2), x)
    replaced = m(y) != y
    both = (replaced[..., 0] == replaced[..., 1]).double().mean().item()
    assert abs(both - (p * p + (1 - p) ** 2)) < 0.02, "two neurons, same x, same row: independent"
    row_uniform = (replaced.all(-1).all(-1) | (~replaced).all(-1).all(-1)).double().mean().item()
    assert row_uniform < 0.05, "a row is not adjusted as one block"
    assert abs(replaced.double().mean().item() - p) < 0.01


def test_sample_seeded():
    s = _repeat(_LINEAR, 6)
    y = torch.rand(64, 6) * 2 - 0.5

    def run(seed, layer=0):
        return na_module(s["mf"], s["sf"], s["mr"], s["sr"], "sample", seed=seed, layer=layer)(y)

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    assert not torch.equal(run(5, layer=0), run(5, layer=1)), "each layer has its own stream"
    m = na_module(s["mf"], s["sf"], s["mr"], s["sr"], "sample", seed=5)
    first, second = m(y), m(y)
    assert not torch.equal(first, second)
    m.reset_rng()
    assert torch.equal(m(y), first)
    m.reset_rng(6)
    assert torch.equal(m(y), run(6))


# ------------------------------------------------------------------------------------------
# the paper code's defects we do not copy: (1) μf for σf, (2) variance for std, (3) one draw per
# row (test_sample_draws_are_per_element); (4) and (5) live in test_runtime.py
# ------------------------------------------------------------------------------------------


def test_negative_forget_mean_is_adjusted():
    """(1) The paper passes μf where σf is expected: with μf < 0 the 'σ' is negative and the
    neuron never fires. Ours: a neuron with μf = −2 fires at its forget mean and maps onto μr."""
    forget = {0: Gaussian.of([-2.0, 0.0, 0.0], [0.5, 1.0, 1.0])}
    retain = {0: Gaussian.of([-3.0, 0.0, 0.0], [0.5, 1.0, 1.0])}
    plan = plan_neuron_adjust(forget, retain, top_percent=34.0, mode="hard", seed=0)
    assert plan.layers[0].selected.tolist() == [0]
    m = NeuronAdjust(1, 3, mode="hard")
    with torch.no_grad():
        for k, v in plan.layers[0].constants.items():
            getattr(m, k).copy_(v)
    x = torch.tensor([[-2.0], [-1.8], [-3.5]])
    out = m(x)
    want = ref.adjust(x.double(), -2.0, 0.5, -3.0, 0.5, "hard")
    assert torch.allclose(out.double(), want, atol=1e-6)
    assert out[0, 0].item() == pytest.approx(-3.0) and out[1, 0].item() == pytest.approx(-3.2)
    assert out[2, 0].item() == -3.5, "looks like retain: kept"


def test_constants_use_standard_deviations_not_variances():
    """(2) The paper stores a variance where it says std. With σf = 2, σr = 1 the map's ratio is
    σr/σf = 1/2 (a variance would give 1/4) and a = 1/(2σr²) − 1/(2σf²) = 3/8."""
    c = na_constants(Gaussian.of([0.0], [2.0]), Gaussian.of([0.5], [1.0]))
    assert c["slope"].item() == pytest.approx(-0.5)
    assert c["a"].item() == pytest.approx(0.375)
    assert c["c"].item() == pytest.approx(0.125 + math.log(0.5))
    out = neuron_adjust(torch.tensor([3.0]), c["a"], c["b"], c["c"], c["slope"], c["offset"], "hard")
    assert out.item() == pytest.approx(0.5 - 0.5 * 3.0)  # -1.0, not 0.5 - 0.25*3 = -0.25
    assert ref.llr(3.0, 0.0, 2.0, 0.5, 1.0) > 0


def test_every_recipe_score_is_a_method_score():
    """The recipe's score names (validated before any weight is loaded) must all plan."""
    import typing

    from editor.recipe import NAScore

    mf, sf, mr, sr = random_stats(6, seed=8)
    for name in typing.get_args(NAScore):
        s = neuron_scores(Gaussian.of(mf, sf), Gaussian.of(mr, sr), name)
        assert s.shape == (6,) and torch.isfinite(s).all(), name
    overlap = neuron_scores(Gaussian.of(mf, sf), Gaussian.of(mr, sr), "overlap")
    d = mf - mr
    v = (sf**2 + sr**2) / 2
    bhatt = 0.125 * d * d / v + 0.5 * torch.log(v / (sf * sr))
    assert torch.allclose(overlap, torch.where(d >= 0, bhatt, -bhatt))
