"""Neuron Adjust as pure tensor functions (DESIGN §3): the selection scores, the global top-p %
selection (shared with the Selective Pruning baseline), the NA constants and the neuron
permutation, and the plan that ties them together.

Nothing here touches files or modules; every σ is floored at ``SIGMA_FLOOR`` and NaN/Inf
inputs are rejected with the layer named.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch

from editor.errors import EditorError
from editor.methods import SIGMA_FLOOR

SCORES = ("paper", "standardized", "overlap", "bhattacharyya", "selective")  # overlap: the recipe's name for bhattacharyya


@dataclass(frozen=True)
class Gaussian:
    """Per-neuron mean and (sample) standard deviation of one layer, float64."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, mean, std, where: str = "") -> "Gaussian":
        mean = torch.as_tensor(mean, dtype=torch.float64)
        std = torch.as_tensor(std, dtype=torch.float64)
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise EditorError(f"non-finite statistics (NaN/Inf) {where}".strip())
        return cls(mean, std.clamp(min=SIGMA_FLOOR))


def neuron_scores(forget: Gaussian, retain: Gaussian, score: str = "paper") -> torch.Tensor:
    """Per-neuron selection score (larger = more forget-specific).

    * ``paper``: μf − μr (the paper's);
    * ``standardized``: (μf − μr) / sqrt((σf² + σr²) / 2) — a difference in pooled-σ units;
    * ``overlap`` / ``bhattacharyya``: the Bhattacharyya distance between the two Gaussians, signed by
      μf − μr (separation in mean *and* in spread; a neuron whose forget distribution is merely
      wider still scores).
    * ``selective``: what Neuron Adjust itself would do to the neuron — the expected displacement
      E[1(λ(x) ≥ 0)·π(x)·|x′ − x|] under the forget distribution minus the same under the retain
      distribution (docs/GENERALIZATION.md): large when adjusting moves forget activations a lot
      and leaves retain activations alone; a neuron whose adjustment also fires on retain inputs
      is penalized by exactly the damage it does there.
    """
    d = forget.mean - retain.mean
    sf, sr = forget.std.clamp(min=SIGMA_FLOOR), retain.std.clamp(min=SIGMA_FLOOR)
    vf, vr = sf**2, sr**2
    if score == "paper":
        return d
    if score == "standardized":
        return d / torch.sqrt((vf + vr) / 2)
    if score in ("overlap", "bhattacharyya"):
        s = (vf + vr) / 2
        db = 0.125 * d * d / s + 0.5 * torch.log(s / (sf * sr))
        return torch.where(d >= 0, db, -db)
    if score == "selective":
        return _displacement(forget, retain, forget) - _displacement(forget, retain, retain)
    raise EditorError(f"unknown score {score!r}; expected one of {', '.join(SCORES)}")


def _displacement(forget: Gaussian, retain: Gaussian, under: Gaussian, n: int = 64) -> torch.Tensor:
    """E_{x ~ under}[1(λ(x) ≥ 0)·π(x)·|x′ − x|] per neuron (expected-mode NA displacement), on a
    deterministic grid of n normal quantiles (robust to the indicator's discontinuity)."""
    k = na_constants(forget, retain)
    t = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    x = under.mean[:, None] + under.std.clamp(min=SIGMA_FLOOR)[:, None] * t[None, :]
    lam = k["a"][:, None] * x * x + k["b"][:, None] * x + k["c"][:, None]
    moved = (k["slope"][:, None] * x + k["offset"][:, None] - x).abs()
    g = torch.where(lam >= 0, torch.sigmoid(lam) * moved, torch.zeros_like(moved))
    return g.mean(dim=1)


def selection_count(top_percent: float, total: int) -> int:
    """n = max(1, round(p·N/100)) (Python's round)."""
    if not 0 < top_percent <= 100:
        raise EditorError(f"top_percent must be in (0, 100], got {top_percent}")
    return max(1, round(top_percent * total / 100))


def select_neurons(scores: dict[int, torch.Tensor], top_percent: float) -> dict[int, torch.Tensor]:
    """Global top-p % across all layers; ties broken by (layer, index). Returns sorted indices per
    layer (every layer present, possibly empty)."""
    layers = sorted(scores)
    flat = torch.cat([scores[i].to(torch.float64).reshape(-1) for i in layers])
    flat = torch.where(torch.isnan(flat), torch.full_like(flat, -math.inf), flat)
    n = selection_count(top_percent, flat.numel())
    # stable descending sort keeps (layer, index) order among equal scores
    order = torch.sort(flat, descending=True, stable=True).indices[:n]
    picked = torch.zeros(flat.numel(), dtype=torch.bool)
    picked[order] = True
    out, start = {}, 0
    for i in layers:
        width = scores[i].numel()
        out[i] = picked[start : start + width].nonzero()[:, 0]
        start += width
    return out


def na_constants(forget: Gaussian, retain: Gaussian) -> dict[str, torch.Tensor]:
    """a, b, c of λ(x) = log N(x; μf, σf) − log N(x; μr, σr) = a x² + b x + c, and the map
    x' = μr − (σr/σf)(x − μf) = slope·x + offset. float64 in and out (the runtime evaluates them in
    float64: with a σ at its floor they reach ~1e12 and cancel near the means)."""
    mf, mr = forget.mean.to(torch.float64), retain.mean.to(torch.float64)
    sf = forget.std.to(torch.float64).clamp(min=SIGMA_FLOOR)
    sr = retain.std.to(torch.float64).clamp(min=SIGMA_FLOOR)
    a = 1 / (2 * sr**2) - 1 / (2 * sf**2)
    b = mf / sf**2 - mr / sr**2
    c = mr**2 / (2 * sr**2) - mf**2 / (2 * sf**2) + torch.log(sr / sf)
    slope = -(sr / sf)
    offset = mr + (sr / sf) * mf
    out = {"a": a, "b": b, "c": c, "slope": slope, "offset": offset}
    for k, v in out.items():
        if not torch.isfinite(v).all():
            raise EditorError(f"Neuron Adjust constant {k} is not finite")
    return {k: v.to(torch.float64) for k, v in out.items()}


def permutation_for(selected: torch.Tensor, width: int) -> torch.Tensor:
    """perm with perm[j] = original neuron at position j: the selected first (ascending), then the
    rest (ascending)."""
    mask = torch.zeros(width, dtype=torch.bool)
    mask[selected] = True
    return torch.cat([mask.nonzero()[:, 0], (~mask).nonzero()[:, 0]]).to(torch.int64)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=perm.dtype)
    return inv


@dataclass
class NALayerPlan:
    selected: torch.Tensor  # original indices, ascending
    permutation: torch.Tensor  # perm[j] = original index at position j
    constants: dict[str, torch.Tensor]  # a, b, c, slope, offset in selected (= permuted) order


@dataclass
class NAPlan:
    mode: str
    seed: int
    score: str
    top_percent: float
    layers: dict[int, NALayerPlan] = field(default_factory=dict)

    @property
    def counts(self) -> dict[int, int]:
        return {i: int(p.selected.numel()) for i, p in self.layers.items()}

    def summary(self) -> dict:
        return {"mode": self.mode, "seed": self.seed, "score": self.score, "top_percent": self.top_percent,
                "counts": {str(i): n for i, n in sorted(self.counts.items())}, "total": sum(self.counts.values())}

    def digest(self) -> str:
        """A short digest of the plan (selection + constants): ties statistics profiled with this
        NA active (the KSD keys) to it."""
        h = hashlib.sha256(json.dumps(self.summary(), sort_keys=True).encode())
        for i in sorted(self.layers):
            lp = self.layers[i]
            h.update(lp.permutation.numpy().tobytes())
            for k in sorted(lp.constants):
                h.update(lp.constants[k].numpy().tobytes())
        return h.hexdigest()[:16]


def plan_neuron_adjust(forget: dict[int, Gaussian], retain: dict[int, Gaussian], *, top_percent: float,
                       mode: str, seed: int, score: str = "paper") -> NAPlan:
    scores = {i: neuron_scores(forget[i], retain[i], score) for i in forget}
    chosen = select_neurons(scores, top_percent)
    plan = NAPlan(mode=mode, seed=seed, score=score, top_percent=top_percent)
    for i, sel in chosen.items():
        width = forget[i].mean.numel()
        consts = na_constants(Gaussian(forget[i].mean[sel], forget[i].std[sel]), Gaussian(retain[i].mean[sel], retain[i].std[sel]))
        plan.layers[i] = NALayerPlan(sel, permutation_for(sel, width), consts)
    return plan


def pooled(gaussians: list[Gaussian], counts: list[int]) -> Gaussian:
    """Pool several retain sets into one Gaussian per neuron (exact pooled mean / sample std)."""
    if len(gaussians) == 1:
        return gaussians[0]
    n = torch.tensor(counts, dtype=torch.float64)
    means = torch.stack([g.mean for g in gaussians])
    stds = torch.stack([g.std for g in gaussians])
    total = n.sum()
    mean = (n[:, None] * means).sum(0) / total
    m2 = ((n[:, None] - 1) * stds**2 + n[:, None] * (means - mean) ** 2).sum(0)
    return Gaussian(mean, torch.sqrt(m2 / (total - 1)).clamp(min=SIGMA_FLOOR))
