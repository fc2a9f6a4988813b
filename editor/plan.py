"""Planning: from statistics (``editor.profile.stats.Statistics``: a profile run in memory or a
statistics file, one interface) to what each method installs — the Neuron Adjust plan, the KSD
bounds (the paper's box, the calibrated box or the linear detector's shares), the pruned neurons.

The plans only read statistics and the recipe; the math is ``editor.methods``'. The same recipe
and statistics give the same plans bit for bit, from memory or from the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from editor.errors import EditorError
from editor.methods.calibrate import calibration_config
from editor.methods.key_space import KSDBounds, LinearShare, ksd_bounds
from editor.methods.neuron_adjust import Gaussian, NAPlan, neuron_scores, plan_neuron_adjust, pooled, select_neurons
from editor.model.arch import resolve_layer
from editor.profile.stats import Statistics

# the KSD forget set profiled again with Neuron Adjust active (both methods on) is stored as
# ``<set>@neuron_adjust``: the box must describe the keys the edited model will see
NA_SUFFIX = "@neuron_adjust"


@dataclass
class Plans:
    neuron_adjust: NAPlan | None = None
    key_space: dict[int, KSDBounds | LinearShare] = field(default_factory=dict)
    key_space_info: dict = field(default_factory=dict)  # how the guard was chosen (the paper's, calibrated, linear)
    prune: dict[int, torch.Tensor] | None = None

    def summary(self) -> dict:
        out = {}
        if self.neuron_adjust:
            out["neuron_adjust"] = self.neuron_adjust.summary()
        if self.key_space:
            out["key_space"] = self.key_space_info
        if self.prune is not None:
            out["prune"] = {str(i): int(v.numel()) for i, v in self.prune.items()}
        return out


def ksd_set_name(recipe) -> str | None:
    """The statistics set KSD bounds come from: profiled with NA active when both methods are on."""
    if not recipe.key_space:
        return None
    return recipe.key_space.forget + (NA_SUFFIX if recipe.neuron_adjust else "")


def _gaussians(stats: Statistics, set_name: str, n_layers: int) -> tuple[dict[int, Gaussian], int]:
    out, count = {}, 0
    for i in range(n_layers):
        mean, std = stats.stat(set_name, i, "pre", "mean"), stats.stat(set_name, i, "pre", "std")
        count = int(stats.stat(set_name, i, "pre", "count"))
        out[i] = Gaussian.of(mean, std, where=f"for set {set_name!r} layer {i}")
    return out, count


def forget_retain(stats: Statistics, n_layers: int, forget: str, retain: list[str]) -> tuple[dict, dict]:
    """Per layer, the forget set's Gaussians and the retain sets' pooled ones."""
    f, _ = _gaussians(stats, forget, n_layers)
    parts = [_gaussians(stats, r, n_layers) for r in retain]
    r = {i: pooled([p[0][i] for p in parts], [p[1] for p in parts]) for i in range(n_layers)}
    return f, r


def plan_na(recipe, n_layers: int, stats: Statistics) -> NAPlan:
    na = recipe.neuron_adjust
    f, r = forget_retain(stats, n_layers, na.forget, na.retain_sets)
    return plan_neuron_adjust(f, r, top_percent=na.top_percent, mode=na.mode, seed=na.seed, score=na.score)


def plan_key_space(recipe, n_layers: int, stats: Statistics) -> tuple[dict[int, KSDBounds | LinearShare], dict]:
    ks = recipe.key_space
    name = ksd_set_name(recipe)
    layer = resolve_layer(ks.layer, n_layers, "key_space.layer")
    if not stats.has_set(name):
        raise EditorError(f"statistics have no set {name!r}: profile again with this recipe")
    if ks.calibrated and ks.detector == "linear":
        return _linear_key_space(recipe, stats, name)
    if ks.calibrated:
        return _calibrated_key_space(recipe, stats, name)
    b = ksd_bounds(*(stats.stat(name, layer, "key", s) for s in ("mean", "std", "min", "max")), ks.scale)
    return {layer: b}, {"method": "paper", "layer": layer, "scale": ks.scale, "k": b.k, "set": name}


def _stored_calibration(recipe, stats: Statistics, name: str) -> dict:
    info = stats.info(name).get("calibration")
    if not info or info.get("config") != calibration_config(recipe):
        raise EditorError("the statistics hold no key_space calibration for these settings "
                          "(key_space.retain / detector / false_positive_budget / folds / seed / check): "
                          "profile again with this recipe")
    return info


def _calibrated_key_space(recipe, stats: Statistics, name: str) -> tuple[dict[int, KSDBounds], dict]:
    """Bounds of the calibrated setting stored at profile time: the chosen layer(s), dims and α
    over the KSD set's streaming statistics (other dims ±inf)."""
    info = _stored_calibration(recipe, stats, name)
    bounds = {}
    for layer in info["layers"]:
        dims = torch.tensor(info["dims"][str(layer)], dtype=torch.long)
        bounds[int(layer)] = ksd_bounds(*(stats.stat(name, layer, "key", s) for s in ("mean", "std", "min", "max")),
                                        info["scale"][str(layer)], dims=dims)
    plan = {"method": "calibrated", "layers": info["layers"], "scale": info["scale"],
            "dims": {str(i): b.dims for i, b in bounds.items()}, "k": {str(i): b.k for i, b in bounds.items()},
            "cv": info["cv"], "retain": info["config"]["retain"], "set": name}
    return bounds, plan


def _linear_key_space(recipe, stats: Statistics, name: str) -> tuple[dict[int, LinearShare], dict]:
    """The pooled linear detector stored at profile time: per layer its weight, the bias on the
    first layer (the runtime sums the layers' shares)."""
    info = _stored_calibration(recipe, stats, name)
    shares = {}
    for j, layer in enumerate(info["layers"]):
        w = stats.detector(name, layer)
        shares[int(layer)] = LinearShare(w.to(torch.float32).cpu(), info["bias"] if j == 0 else 0.0)
    plan = {"method": "linear", "detector": "linear", "pool": info["pool"], "layers": info["layers"],
            "cv": info["cv"], "retain": info["config"]["retain"], "set": name}
    return shares, plan


def plan_all(recipe, n_layers: int, stats: Statistics) -> Plans:
    """Every plan of the recipe. With both methods on, the KSD keys must have been profiled under
    this very NA plan (its digest is stored with them)."""
    plans = Plans()
    if recipe.neuron_adjust:
        plans.neuron_adjust = plan_na(recipe, n_layers, stats)
        if recipe.key_space:
            profiled_under = stats.info(recipe.key_space.forget + NA_SUFFIX).get("neuron_adjust")
            if profiled_under != plans.neuron_adjust.digest():
                raise EditorError("the statistics' KSD keys were profiled under a different Neuron Adjust plan: "
                                  "profile again with this recipe")
    if recipe.key_space:
        plans.key_space, plans.key_space_info = plan_key_space(recipe, n_layers, stats)
    if recipe.prune:
        pr = recipe.prune
        f, r = forget_retain(stats, n_layers, pr.forget, pr.retain_sets)
        plans.prune = select_neurons({i: neuron_scores(f[i], r[i], pr.score) for i in f}, pr.top_percent)
    return plans
