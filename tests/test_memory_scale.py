"""Memory at real-model scale (issue #18, items 4–5): the calibration's per-text keys are written in
place into matrices allocated once (no per-batch chunks, no masked copy of a batch's activations),
the linear detector's fit holds one float64 copy of its features, the load-time architecture check
runs the decoder stack without the LM head, and the dry run's calibration estimate says so.

Peak memory itself is measured by ``bench/peak_memory.py --smollm2`` (docs/SCALE.md), not here:
RSS in a shared test process says nothing reliable. These tests pin the mechanics and their
results (identical to the straightforward formulation they replace)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from editor.errors import EditorError
from editor.methods import calibrate
from editor.model.arch import check_mapping, spec_for
from editor.profile import collect
from tests.tiny import char_tokenizer, tiny_model

TEXTS = ["a", "the cat sat on the mat", "12 + 30 = 42", "def f(x): return x", "bonjour", "xy", "a longer text of words"]


def _reference_keys(model, tok, spec, texts, reduce, side):
    """The keys the straightforward way: every text alone (no padding), hooks on the down projections."""
    from editor.model.arch import decoder_layers

    layers = decoder_layers(model, spec)
    out = {i: [] for i in range(len(layers))}
    for t in texts:
        got = {}
        hs = [layer.get_submodule(spec.down).register_forward_pre_hook(lambda m, a, i=i: got.__setitem__(i, a[0]))
              for i, layer in enumerate(layers)]
        try:
            with torch.no_grad():
                model(**tok(t, return_tensors="pt"))
        finally:
            for h in hs:
                h.remove()
        for i, x in got.items():
            x = x.reshape(-1, x.shape[-1])
            out[i].append(x.amax(0) if reduce == "max" else x[-1])
    return {i: torch.stack(v) for i, v in out.items()}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_per_text_keys_equal_each_text_alone(arch, side):
    model, tok = tiny_model(arch), char_tokenizer()
    spec = spec_for(model.config)
    for reduce, fn in (("max", collect.pooled_keys), ("last", collect.last_token_keys)):
        got = fn(model, tok, spec, TEXTS, batch_size=3, max_length=64, padding_side=side)
        want = _reference_keys(model, tok, spec, TEXTS, reduce, side)
        assert sorted(got) == sorted(want)
        for i in got:
            assert got[i].dtype == torch.float32 and got[i].is_contiguous()
            assert got[i].shape == (len(TEXTS), want[i].shape[1])
            torch.testing.assert_close(got[i], want[i].float(), rtol=1e-5, atol=1e-5)


def test_pooled_row_maxima_ignore_padding_on_both_sides():
    """The pooled reduction of a [B, T, d] batch allocates [B, d] (the stacked row maxima), never a
    [B, T, d] masked copy — and still ignores the padding, on both sides."""
    x = torch.randn(3, 5, 4)
    for side in ("left", "right"):
        lengths = [5, 2, 1]
        mask = torch.zeros(3, 5, dtype=torch.long)
        for r, n in enumerate(lengths):
            mask[r, 5 - n:] = 1 if side == "left" else 0
            if side == "right":
                mask[r, :n] = 1
        b = collect.Batch(torch.zeros(3, 5, dtype=torch.long), mask, mask, torch.zeros(0), torch.zeros(3), 8, torch.arange(3))
        got = collect.max_over_real_tokens(x, b)
        want = x.masked_fill(~mask.bool()[:, :, None], float("-inf")).amax(1)
        assert torch.equal(got, want)


def test_gram_equals_the_concatenated_standardized_matrix():
    """The Gram matrix built one layer block at a time == Z Zᵀ of the whole standardized matrix."""
    g = torch.Generator().manual_seed(0)
    blocks_f = {i: torch.randn(9, 5 + i, generator=g) * (i + 1) + i for i in range(3)}
    blocks_r = {i: torch.randn(7, 5 + i, generator=g) for i in range(3)}
    layers = [0, 1, 2]
    x = torch.cat([torch.cat([blocks_f[i] for i in layers], 1), torch.cat([blocks_r[i] for i in layers], 1)]).double()
    z = (x - x.mean(0)) / x.std(0, unbiased=False)
    mu, sd = calibrate.feature_moments([blocks_f, blocks_r], layers)
    torch.testing.assert_close(calibrate.gram([blocks_f, blocks_r], layers, mu, sd), z @ z.T, atol=1e-4, rtol=1e-5)


def test_architecture_check_skips_the_lm_head():
    model = tiny_model("llama")
    calls = []
    h = model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    try:
        check_mapping(model, spec_for(model.config), "llama")
    finally:
        h.remove()
    assert calls == []
    # and it still catches a changed MLP: a down projection whose input is not act(gate) × up
    bad = tiny_model("llama")
    bad.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: (a[0] * 2,))
    with pytest.raises(EditorError, match="layer 1"):
        check_mapping(bad, spec_for(bad.config), "llama")


def test_dry_run_calibration_estimate_names_the_peak(monkeypatch):
    """The dry run's linear-calibration line gives the keys, the fit's Gram matrices and their sum
    (what the calibration adds above the profile's peak: docs/SCALE.md measures it)."""
    from types import SimpleNamespace

    from editor.dryrun.estimate import calibration_estimate
    from editor.dryrun.render import calibration_memory, human_bytes

    ks = SimpleNamespace(forget="f", retain_sets=["r"], detector="linear", layer=-1, scale=2.0,
                         false_positive_budget=0.01, folds=5, seed=0, check="prompt",
                         background="none", background_sets=[], weights="signed")
    recipe = SimpleNamespace(key_space=ks, set_format=lambda name: "raw")
    cfg = {"retain": ["r"], "false_positive_budget": 0.01, "folds": 5, "seed": 0, "continuation_tokens": 0}
    monkeypatch.setattr(calibrate, "calibration_config", lambda r: cfg)
    est = calibration_estimate(recipe, {"f": {"texts": 135}, "r": {"texts": 690}}, 30, 1536)
    keys = 825 * 30 * 1536 * 4
    fit = 4 * 825 * 825 * 8 + 825 * 1536 * 12
    assert (est.keys_bytes, est.fit_bytes) == (keys, fit)
    memory = calibration_memory(est)
    assert human_bytes(keys) in memory and human_bytes(fit) in memory
    assert "above the profile" in memory
    # non-negative weights: no Gram matrix; the fold's screened features instead
    ks.weights = "nonnegative"
    est = calibration_estimate(recipe, {"f": {"texts": 135}, "r": {"texts": 690}}, 30, 1536)
    fit = 825 * 1536 * 12 + 825 * calibrate.MONOTONE_FEATURES * 16 + 30 * 1536 * 16
    assert (est.keys_bytes, est.fit_bytes) == (keys, fit)
    memory = calibration_memory(est)
    assert human_bytes(fit) in memory and "screened features" in memory and "Gram" not in memory


@pytest.mark.parametrize("model, d_ff", [("smollm2", 1536), ("qwen", 4864)])
def test_dry_run_stage_peaks_within_25_percent_of_the_real_models(model, d_ff):
    """The dry run's per-stage peak RSS (``stage_peaks``) against what ``bench/peak_memory.py``
    measured on the two real models in float32 (batch 8, ≤ 512 tokens): within ±25 % for profile,
    export and the ONNX export. The profile and export lines were fitted on random Llamas, so these
    two points test them; the ONNX line's slope was read off these two points (docs/SCALE.md)."""
    from editor.dryrun.estimate import stage_peaks

    rec = json.loads((Path(__file__).resolve().parents[1] / "bench" / "results" / f"peak_memory-{model}.json").read_text())
    w = rec["model"]["weights_bytes"]
    est = stage_peaks(w, transient_bytes=8 * 512 * d_ff * 8, onnx=True)
    for stage, key in (("profile", "profile"), ("export", "export"), ("export onnx", "export-onnx")):
        measured = rec[key]["peak_mb"] * 2**20
        assert abs(est[stage] / measured - 1) <= 0.25, (model, stage, est[stage] / 2**20, rec[key]["peak_mb"])


@pytest.mark.parametrize("model", [pytest.param("demo"), pytest.param("smollm2"),
                                   pytest.param("qwen", marks=pytest.mark.qwen)])
def test_dry_run_run_peaks_within_25_percent_of_the_shipped_runs(model):
    """The dry run's peaks inside ``run`` (``DryRun.run_peaks``: one process, every stage in its order)
    against the stage peaks ``bench/stages.py`` measured in ``run`` of each real model's shipped math
    recipe (the two scorecards, profile, calibration, export) and of the testbed's demo (no calibration):
    within ±25 %. Computed here from the recipe, not read from the figures' file, so a change of the
    formulas is checked against the measurement."""
    from editor.dryrun.estimate import estimate

    root = Path(__file__).resolve().parents[1]
    rec = json.loads((root / "bench" / "results" / f"stages-{model}.json").read_text())
    measured = {s["stage"]: s["peak_rss_mib"] for s in rec["stages"] if s.get("peak_rss_mib")}
    if "calibration fit" in measured:
        measured["calibration"] = max(measured["calibration keys"], measured["calibration fit"])
    est = estimate(root / rec["recipe"]).run_peaks
    assert set(est) == {"base scorecard", "profile", "edited scorecard", "export"} | (set() if model == "demo" else {"calibration"})
    for stage, peak in est.items():
        assert abs(peak / 2**20 / measured[stage] - 1) <= 0.25, (model, stage, round(peak / 2**20), measured[stage])
