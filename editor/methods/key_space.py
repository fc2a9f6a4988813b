"""Key Space Detection as pure tensor functions (DESIGN §3): the paper's hypercube μ ± α·k·σ
(optionally over chosen dimensions, the calibrated box) and the pooled linear detector's per-layer
shares (fitted in ``editor.methods.calibrate``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from editor.errors import EditorError
from editor.methods import SIGMA_FLOOR


@dataclass
class LinearShare:
    """One layer's share of the pooled linear detector (``key_space.detector: linear``): the
    runtime abstains when Σ_layers (weight · maxpool(key) + bias) > 0."""

    weight: torch.Tensor  # float32 [d]
    bias: float


@dataclass
class KSDBounds:
    lower: torch.Tensor  # float32 [d]
    upper: torch.Tensor  # float32 [d]
    k: float
    scale: float
    dims: int  # guarded dimensions


def ksd_bounds(mean, std, vmin, vmax, scale: float, dims: torch.Tensor | None = None) -> KSDBounds:
    """Hypercube μ ± α·k·σ with k = max over probes and dimensions of |v − μ|/σ (closed form from
    the per-dimension min/max). ``dims`` restricts the guard (others get ±inf)."""
    if not scale > 0:
        raise EditorError(f"key_space.scale must be > 0, got {scale}")
    mean = torch.as_tensor(mean, dtype=torch.float64)
    std = torch.as_tensor(std, dtype=torch.float64).clamp(min=SIGMA_FLOOR)
    vmin = torch.as_tensor(vmin, dtype=torch.float64)
    vmax = torch.as_tensor(vmax, dtype=torch.float64)
    for name, t in (("mean", mean), ("std", std), ("min", vmin), ("max", vmax)):
        if not torch.isfinite(t).all():
            raise EditorError(f"key statistics ({name}) are not finite")
    if dims is None:
        dims = torch.arange(mean.numel())
    dev = torch.maximum((vmax - mean).abs(), (vmin - mean).abs()) / std
    k = float(dev[dims].max()) if dims.numel() else 0.0
    half = scale * k * std
    lower = torch.full_like(mean, -math.inf)
    upper = torch.full_like(mean, math.inf)
    lower[dims] = (mean - half)[dims]
    upper[dims] = (mean + half)[dims]
    return KSDBounds(lower.to(torch.float32), upper.to(torch.float32), k, float(scale), int(dims.numel()))
