"""Literal Neuron Adjust / Key Space Detection, written straight from DESIGN §3.

Independent of the code under test: no import from ``editor``. Everything works on the
*unpatched, unpermuted* model through plain forward hooks, in float64, from the Gaussian
log-densities themselves (not from a, b, c) and from the raw probe keys (not from min/max).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

FLOOR = 1e-6
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)

# model_type -> (decoder layers, pre-activation module, down projection, fused gate|up, Conv1D)
LAYOUT = {
    "llama": ("model.layers", "mlp.gate_proj", "mlp.down_proj", False, False),
    "mistral": ("model.layers", "mlp.gate_proj", "mlp.down_proj", False, False),
    "qwen2": ("model.layers", "mlp.gate_proj", "mlp.down_proj", False, False),
    "qwen3": ("model.layers", "mlp.gate_proj", "mlp.down_proj", False, False),
    "gemma": ("model.layers", "mlp.gate_proj", "mlp.down_proj", False, False),
    "gemma2": ("model.layers", "mlp.gate_proj", "mlp.down_proj", False, False),
    "phi3": ("model.layers", "mlp.gate_up_proj", "mlp.down_proj", True, False),
    "phi": ("model.layers", "mlp.fc1", "mlp.fc2", False, False),
    "gpt2": ("transformer.h", "mlp.c_fc", "mlp.c_proj", False, True),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", False, False),
    "opt": ("model.decoder.layers", "fc1", "fc2", False, False),
}


def layers_of(model):
    return model.get_submodule(LAYOUT[model.config.model_type][0])


def d_ff_of(model):
    _, _, down_path, _, conv1d = LAYOUT[model.config.model_type]
    w = layers_of(model)[0].get_submodule(down_path).weight
    return int(w.shape[0] if conv1d else w.shape[1])


# ------------------------------------------------------------------------------------------
# the math, literally
# ------------------------------------------------------------------------------------------


def floor(sigma):
    return torch.as_tensor(sigma, dtype=torch.float64).clamp(min=FLOOR)


def log_normal(x, mu, sigma):
    """log N(x; μ, σ)."""
    return -0.5 * ((x - mu) / sigma) ** 2 - torch.log(sigma) - LOG_SQRT_2PI


def llr(x, mf, sf, mr, sr):
    """λ(x) = log N(x; μf, σf) − log N(x; μr, σr), σ floored."""
    x = torch.as_tensor(x, dtype=torch.float64)
    mf, mr = torch.as_tensor(mf, dtype=torch.float64), torch.as_tensor(mr, dtype=torch.float64)
    sf, sr = floor(sf), floor(sr)
    return log_normal(x, mf, sf) - log_normal(x, mr, sr)


def mapped(x, mf, sf, mr, sr):
    """x′ = μr − (σr/σf)(x − μf)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    mf, mr = torch.as_tensor(mf, dtype=torch.float64), torch.as_tensor(mr, dtype=torch.float64)
    sf, sr = floor(sf), floor(sr)
    return mr - (sr / sf) * (x - mf)


def adjust(x, mf, sf, mr, sr, mode):
    """Deterministic NA modes (``expected`` / ``hard``) on float64."""
    lam = llr(x, mf, sf, mr, sr)
    xp = mapped(x, mf, sf, mr, sr)
    x = torch.as_tensor(x, dtype=torch.float64)
    fire = lam >= 0
    if mode == "hard":
        return torch.where(fire, xp, x)
    if mode == "expected":
        return x + fire.double() * torch.sigmoid(lam) * (xp - x)
    raise ValueError(mode)


def select(scores_by_layer: dict[int, torch.Tensor], top_percent: float) -> dict[int, list[int]]:
    """Global top-p %: n = max(1, round(p·N/100)), larger score first, ties by (layer, index)."""
    items = [(float(s), layer, j) for layer, sc in scores_by_layer.items() for j, s in enumerate(sc.tolist())]
    n = max(1, round(top_percent * len(items) / 100))
    items.sort(key=lambda t: (-t[0], t[1], t[2]))
    out = {layer: [] for layer in scores_by_layer}
    for _, layer, j in items[:n]:
        out[layer].append(j)
    return {layer: sorted(v) for layer, v in out.items()}


def paper_score(mf, mr):
    return torch.as_tensor(mf, dtype=torch.float64) - torch.as_tensor(mr, dtype=torch.float64)


def standardized_score(mf, sf, mr, sr):
    """(μf − μr) in units of the pooled standard deviation sqrt((σf² + σr²)/2)."""
    sf, sr = floor(sf), floor(sr)
    return paper_score(mf, mr) / torch.sqrt((sf**2 + sr**2) / 2)


class KSDBox:
    """The literal hypercube from raw probe keys v [probes, d]."""

    def __init__(self, keys: torch.Tensor, scale: float):
        v = keys.to(torch.float64)
        self.mu = v.mean(0)
        self.sigma = floor(v.std(0, unbiased=True))
        self.k = float(((v - self.mu).abs() / self.sigma).max())
        self.scale = float(scale)

    def inside(self, key: torch.Tensor) -> torch.Tensor:
        """|key − μ| ≤ α·k·σ in every dimension; key [..., d] -> bool [...]."""
        return ((key.to(torch.float64) - self.mu).abs() <= self.scale * self.k * self.sigma).all(-1)

    def margin(self, key: torch.Tensor) -> torch.Tensor:
        """Signed distance to the boundary in units of the half-width (> 0 inside)."""
        half = self.scale * self.k * self.sigma
        return (1 - (key.to(torch.float64) - self.mu).abs() / half).min(-1).values


def last_real(attention_mask: torch.Tensor | None, batch: int, seq: int) -> list[int | None]:
    """Per row, the index (in the current chunk of ``seq`` tokens) of its last real token."""
    out = []
    for r in range(batch):
        if attention_mask is None:
            out.append(seq - 1)
            continue
        chunk = attention_mask[r, -seq:].tolist()
        real = [j for j, m in enumerate(chunk) if m]
        out.append(real[-1] if real else None)
    return out


# ------------------------------------------------------------------------------------------
# hooks on the unpatched, unpermuted model
# ------------------------------------------------------------------------------------------


@contextmanager
def literal_edit(model, na: dict | None = None, mode: str = "expected", ksd_layer: int | None = None):
    """Hooks that apply literal NA and record the keys of ``ksd_layer``.

    ``na``: {layer: (selected original indices, μf, σf, μr, σr)} (stats of the selected neurons).
    Yields a list that receives, per forward call, the down-projection input of ``ksd_layer``
    reshaped to [batch, seq, d_ff] (OPT flattens tokens: reshaped back by the caller's shape).
    """
    mt = model.config.model_type
    _, pre_path, down_path, fused, _ = LAYOUT[mt]
    layers = layers_of(model)
    d = d_ff_of(model)
    keys: list[torch.Tensor] = []
    handles = []

    def na_hook(module, args, out, sel, mf, sf, mr, sr):
        gate = out[..., :d] if fused else out
        x = gate[..., sel]
        new = adjust(x.double(), mf, sf, mr, sr, mode).to(out.dtype)
        out = out.clone()
        idx = torch.as_tensor(sel, dtype=torch.long)
        out[..., idx] = new  # for a fused module, indices < d address the gate half
        return out

    def key_hook(module, args):
        keys.append(args[0].detach())

    try:
        for layer, (sel, mf, sf, mr, sr) in (na or {}).items():
            if len(sel) == 0:
                continue
            pre = layers[layer].get_submodule(pre_path)
            handles.append(pre.register_forward_hook(
                lambda m, a, o, sel=list(sel), mf=mf, sf=sf, mr=mr, sr=sr: na_hook(m, a, o, sel, mf, sf, mr, sr)))
        if ksd_layer is not None:
            handles.append(layers[ksd_layer].get_submodule(down_path).register_forward_pre_hook(key_hook))
        yield keys
    finally:
        for h in handles:
            h.remove()


def decisions(box: KSDBox, key: torch.Tensor, attention_mask, batch: int, seq: int):
    """Literal per-row abstention: the key at the row's last real token lies inside the box."""
    key = key.reshape(batch, seq, -1)
    out, margins = [], []
    for r, j in enumerate(last_real(attention_mask, batch, seq)):
        if j is None:
            out.append(False)
            margins.append(float("inf"))
            continue
        out.append(bool(box.inside(key[r, j])))
        margins.append(float(box.margin(key[r, j])))
    return out, margins


def primal_logistic(x: torch.Tensor, y: torch.Tensor, weight_decay: float = 1e-3, iters: int = 2000):
    """The linear detector's objective solved literally in feature space: standardize every column
    (mean, population std floored at 1e-6), minimize mean BCE with positives weighted n_neg / n_pos
    + weight_decay · ‖w‖² by L-BFGS over (w, b); return (w, b) in the raw feature space."""
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    mu, sd = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    pw = torch.tensor(float((1 - y).sum() / y.sum()), dtype=torch.float64)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                            tolerance_change=1e-15, history_size=50)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, pos_weight=pw) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    wr = w.detach() / sd
    return wr, float(b.detach()[0] - (wr * mu).sum())
