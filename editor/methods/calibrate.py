"""Calibrated Key Space Detection (issue #9, docs/GENERALIZATION.md).

The paper's KSD guards every key dimension of one fixed layer with one fixed α. Probed in one
phrasing, that box is tight around the probed template and lets rephrased forget queries escape;
raising α starts refusing other skills. Calibration uses *retain queries* (the other skills'
prompts) to choose, per layer, the key dimensions where forget and retain keys separate best,
and picks the layer(s), the number of dimensions m and α by K-fold cross-validation on the probe
sets:

1. ``KeySet``: per query, the last-real-token down-projection input (key) at every layer plus
   the keys of its greedy continuation (collected by ``editor.profile.collect``, the profiler's
   tokenization and batching): the runtime tests every forward call, so a query is refused when
   ANY of its keys is inside the box — the calibration scores it the same way.
2. ``cross_validate``: seeded K folds over the forget queries and over the retain queries. On each
   fold's training part: dimension ranking by ``separation`` (|μf − μr| / (σf + σr)), the box of
   the top-m dimensions exactly as the paper builds it (μ ± α·k·σ on the forget prompt keys,
   k = max training deviation over those dimensions). On the held-out part: forget coverage and
   retain false positives. Candidates: every layer, and the OR of two layers (each its own α,
   among the best single layers), every m of ``dims_grid``, every α of ``SCALES``. Feasible: the
   held-out false-positive rate of EVERY retain set ≤ budget and, on every fold, every set's
   training rate ≤ budget. Chosen: the largest held-out coverage; ties (within ``tolerance``)
   broken by the largest mean held-out depth margin (how far inside the box the held-out forget
   queries lie — the widest box the budget allows, the most robust to rephrasing), then fewer
   layers, smaller m, smaller α, lower layer — every step deterministic.
3. ``refit_dims``: the chosen dimensions re-ranked on all probe keys; the bounds themselves come
   from the forget set's streaming statistics (``editor.methods.key_space.ksd_bounds(...,
   dims=...)``, others ±inf) in ``editor.plan``, so ``export --stats`` rebuilds them bit for bit.
   ``editor.pipeline.calibrate_job`` collects the keys and stores the decision with the statistics.

The pooled linear detector (``calibrate_linear``, docs/GENERALIZATION.md §4.3) is fitted here too.
This module is pure math on key matrices.
Only probe-set keys ever reach these functions: the calibration is handed the key matrices of
the sets named by ``key_space.forget`` / ``key_space.retain`` and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations, product

import torch

from editor.errors import EditorError
from editor.methods import SIGMA_FLOOR

SCALES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
CALIBRATION_VERSION = 2
# the runtime tests the key of every forward call: the prompt's last token, then each generated
# token fed back until EOS. A query is refused when ANY of those keys is inside the box, so the
# calibration scores each query by all of them: its prompt key plus the keys of its greedy
# continuation (this many new tokens, stopped at EOS).
CONTINUATION_TOKENS = 24


@dataclass
class KeySet:
    """The keys of one query set at every layer: ``keys[layer]`` [N, d] (rows: first each query's
    prompt key, in query order, then continuation keys), ``owner`` [N] (the query of each row)."""

    keys: dict[int, torch.Tensor]
    owner: torch.Tensor
    n: int
    group: torch.Tensor | None = None  # [n] the retain set of each query (the budget holds per set)

    def __post_init__(self):
        if self.group is None:
            self.group = torch.zeros(self.n, dtype=torch.long)

    @classmethod
    def of(cls, prompt: dict[int, torch.Tensor], continuation: dict[int, torch.Tensor] | None = None,
           owner: torch.Tensor | None = None, group: torch.Tensor | None = None) -> "KeySet":
        n = next(iter(prompt.values())).shape[0]
        own = torch.arange(n)
        if continuation is None or owner is None or owner.numel() == 0:
            return cls(dict(prompt), own, n, group)
        return cls({i: torch.cat([prompt[i], continuation[i]]) for i in prompt}, torch.cat([own, owner.long()]), n, group)

    def prompt(self, layer: int) -> torch.Tensor:
        return self.keys[layer][: self.n]

    def rows(self, queries: torch.Tensor) -> torch.Tensor:
        """Row indices of every key owned by ``queries``."""
        return torch.isin(self.owner, queries).nonzero()[:, 0]

    def query_depth(self, box: "Box", layer: int, queries: torch.Tensor) -> torch.Tensor:
        """Per query of ``queries``: the smallest depth over all its keys (inside at α ⇔ ≤ α)."""
        rows = self.rows(queries)
        d = box.depth(self.keys[layer][rows])
        pos = torch.searchsorted(queries, self.owner[rows])
        return torch.full((queries.numel(),), math.inf, dtype=torch.float64).scatter_reduce_(0, pos, d, "amin")


def dims_grid(width: int) -> list[int]:
    """Powers of two below ``width``, then ``width`` itself (the paper's box: every dimension)."""
    out, m = [], 1
    while m < width:
        out.append(m)
        m *= 2
    return out + [width]


# ---------------------------------------------------------------------------------------------
# pure functions on key matrices
# ---------------------------------------------------------------------------------------------


def separation_signed(forget: torch.Tensor, retain: torch.Tensor) -> torch.Tensor:
    """(μf − μr) / (σf + σr) per dimension (σ: sample std, floored), float64."""
    f, r = forget.to(torch.float64), retain.to(torch.float64)
    sf = f.std(0, unbiased=True).clamp(min=SIGMA_FLOOR) if f.shape[0] > 1 else torch.full_like(f[0], SIGMA_FLOOR)
    sr = r.std(0, unbiased=True).clamp(min=SIGMA_FLOOR) if r.shape[0] > 1 else torch.full_like(r[0], SIGMA_FLOOR)
    return (f.mean(0) - r.mean(0)) / (sf + sr)


def separation(forget: torch.Tensor, retain: torch.Tensor) -> torch.Tensor:
    """|μf − μr| / (σf + σr) per dimension (σ: sample std, floored), float64."""
    return separation_signed(forget, retain).abs()


def rank_dims(forget: torch.Tensor, retain: torch.Tensor) -> torch.Tensor:
    """Dimensions by decreasing separation; ties by index (stable)."""
    s = separation(forget, retain)
    s = torch.where(torch.isnan(s), torch.full_like(s, -math.inf), s)
    return torch.sort(s, descending=True, stable=True).indices


def fold_indices(n: int, folds: int, seed: int, salt: int = 0) -> list[torch.Tensor]:
    """A seeded permutation of range(n) cut into ``folds`` nearly equal parts."""
    if n < folds:
        raise EditorError(f"key_space calibration: {n} queries cannot be split into {folds} folds")
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + salt)
    perm = torch.randperm(n, generator=g)
    return [p.sort().values for p in torch.tensor_split(perm, folds)]


@dataclass
class Box:
    """μ ± α·k·σ over ``dims`` (the paper's construction, restricted)."""

    dims: torch.Tensor
    mean: torch.Tensor  # [m] float64
    std: torch.Tensor  # [m] float64, floored
    k: float

    @classmethod
    def fit(cls, forget: torch.Tensor, dims: torch.Tensor) -> "Box":
        x = forget[:, dims].to(torch.float64)
        mean = x.mean(0)
        std = (x.std(0, unbiased=True) if x.shape[0] > 1 else torch.zeros_like(mean)).clamp(min=SIGMA_FLOOR)
        k = float(((x - mean).abs() / std).max()) if x.numel() else 0.0
        return cls(dims, mean, std, k)

    def depth(self, keys: torch.Tensor) -> torch.Tensor:
        """max over the box's dimensions of |v − μ| / (k·σ): a key is inside at α iff depth ≤ α."""
        z = (keys[:, self.dims].to(torch.float64) - self.mean).abs() / self.std
        return z.max(dim=1).values / max(self.k, 1e-12)


@dataclass
class Candidate:
    layers: tuple[int, ...]
    m: int
    scales: tuple[float, ...]  # α of each layer
    coverage: float  # held-out forget coverage (each forget query predicted once, while held out)
    fpr: float  # held-out retain false-positive rate, the largest over the retain sets
    fpr_train: float  # training retain FPR, the largest over folds and retain sets
    margin: float  # mean held-out forget depth margin (1 − depth/α, clipped at 0)
    fpr_by_set: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"layers": list(self.layers), "m": self.m, "scales": list(self.scales), "coverage": round(self.coverage, 6),
                "fpr": round(self.fpr, 6), "fpr_train": round(self.fpr_train, 6), "margin": round(self.margin, 6)}


@dataclass
class Calibration:
    chosen: Candidate
    feasible: int
    total: int
    frontier: list[dict] = field(default_factory=list)  # best candidate per m (for the report)


def _sort_key(c: Candidate, tolerance: float, best: float):
    tied = c.coverage >= best - tolerance
    return (not tied, -round(c.margin, 9), len(c.layers), c.m, c.scales, c.layers)


def cross_validate(forget: dict[int, torch.Tensor] | KeySet, retain: dict[int, torch.Tensor] | KeySet, *,
                   folds: int = 5, seed: int = 0, budget: float = 0.01, scales=SCALES, dims: list[int] | None = None,
                   layers: list[int] | None = None, pairs: bool = True, pair_layers: int = 4,
                   tolerance: float = 0.0) -> Calibration:
    """Choose (layers, m, α) by K-fold CV on the probe keys; see the module docstring.

    ``forget`` / ``retain``: the probe sets' keys — {layer: [n, d]} prompt keys, or ``KeySet``s that
    add each query's continuation keys (a query counts as inside when any of its keys is). Folds are
    drawn over queries. The box is fitted on the training forget queries' prompt keys; dimensions
    are ranked against every key of the training retain queries."""
    fs = forget if isinstance(forget, KeySet) else KeySet.of(forget)
    rs = retain if isinstance(retain, KeySet) else KeySet.of(retain)
    layers = sorted(fs.keys) if layers is None else sorted(layers)
    if not layers:
        raise EditorError("key_space calibration: no layers")
    width = fs.keys[layers[0]].shape[1]
    dims = dims_grid(width) if dims is None else sorted({min(int(m), width) for m in dims})
    scales = sorted(float(a) for a in scales)
    n_f, n_r = fs.n, rs.n
    f_folds = fold_indices(n_f, folds, seed, salt=1)
    r_folds = fold_indices(n_r, folds, seed, salt=2)
    alphas = torch.tensor(scales, dtype=torch.float64)

    # per retain set (``KeySet.group``): the budget holds for every one of them
    onehot = torch.nn.functional.one_hot(rs.group, int(rs.group.max()) + 1 if rs.n else 1).double()  # [n_r, K]
    counts = onehot.sum(0).clamp(min=1)

    # per (layer, m), per fold: [n_alpha, n] inside-tables of the held-out forget / held-out retain /
    # training retain queries, and the held-out forget depth margins
    tables: dict[tuple[int, int], list[tuple[torch.Tensor, ...]]] = {}
    train_sets = []
    for j in range(folds):
        ft = torch.cat([f_folds[i] for i in range(folds) if i != j]).sort().values
        rt = torch.cat([r_folds[i] for i in range(folds) if i != j]).sort().values
        train_sets.append((ft, rt))
    for layer in layers:
        for j, (ft, rt) in enumerate(train_sets):
            f_train = fs.prompt(layer)[ft]
            order = rank_dims(f_train, rs.keys[layer][rs.rows(rt)])
            for m in dims:
                box = Box.fit(f_train, order[:m])
                df = fs.query_depth(box, layer, f_folds[j])
                dr = rs.query_depth(box, layer, r_folds[j])
                drt = rs.query_depth(box, layer, rt)
                tables.setdefault((layer, m), []).append((
                    df[None, :] <= alphas[:, None], dr[None, :] <= alphas[:, None], drt[None, :] <= alphas[:, None],
                    (1 - df[None, :] / alphas[:, None]).clamp(min=0),
                ))

    def combine(group, m, j, k):
        """Table ``k`` of fold ``j`` for the layers of ``group``, one row per α tuple (product order)."""
        t = tables[(group[0], m)][j][k]
        for layer in group[1:]:
            u = tables[(layer, m)][j][k]
            t = (t[:, None, :] | u[None, :, :]) if k < 3 else torch.maximum(t[:, None, :], u[None, :, :])
            t = t.reshape(-1, u.shape[1])
        return t

    eps = 1e-12
    cands: list[Candidate] = []
    total = 0

    def evaluate(group):
        nonlocal total
        combos = list(product(scales, repeat=len(group)))
        for m in dims:
            covered = torch.zeros(len(combos), dtype=torch.float64)
            margin = torch.zeros_like(covered)
            false_pos = torch.zeros(len(combos), onehot.shape[1], dtype=torch.float64)
            fpr_tr = torch.zeros(len(combos), dtype=torch.float64)
            for j, (_, rt) in enumerate(train_sets):
                covered += combine(group, m, j, 0).double().sum(1)
                margin += combine(group, m, j, 3).sum(1)
                false_pos += combine(group, m, j, 1).double() @ onehot[r_folds[j]]
                oh = onehot[rt]
                fpr_tr = torch.maximum(fpr_tr, ((combine(group, m, j, 2).double() @ oh) / oh.sum(0).clamp(min=1)).max(1).values)
            cov, mar = covered / n_f, margin / n_f
            by_set = false_pos / counts
            fpr = by_set.max(1).values
            total += len(combos)
            ok = (fpr <= budget + eps) & (fpr_tr <= budget + eps) & (cov > 0)
            for a in ok.nonzero()[:, 0].tolist():
                cands.append(Candidate(tuple(group), m, tuple(combos[a]), float(cov[a]), float(fpr[a]), float(fpr_tr[a]),
                                       float(mar[a]), [round(float(x), 6) for x in by_set[a]]))

    for layer in layers:
        evaluate((layer,))
    if pairs and len(layers) > 1:
        # OR of two layers (each its own α), among the layers whose single boxes did best
        best_single = {layer: max(((c.coverage, c.margin) for c in cands if c.layers == (layer,)), default=(0.0, 0.0))
                       for layer in layers}
        top = sorted(sorted(layers, key=lambda i: best_single[i], reverse=True)[:pair_layers])
        for group in combinations(top, 2):
            evaluate(group)

    feasible = cands
    if not feasible:
        raise EditorError(f"key_space calibration: no setting keeps the retain false-positive rate within "
                          f"{budget:.2%} while covering any held-out forget query (more probe data, another "
                          f"false_positive_budget, or calibrate: false)")
    best = max(c.coverage for c in feasible)
    feasible.sort(key=lambda c: _sort_key(c, tolerance, best))
    frontier = {}
    for c in sorted(feasible, key=lambda c: (c.m, -c.coverage, -round(c.margin, 9), len(c.layers), c.scales, c.layers)):
        frontier.setdefault(c.m, c.as_dict())
    return Calibration(feasible[0], len(feasible), total, [frontier[m] for m in sorted(frontier)])


def refit_dims(forget: dict[int, torch.Tensor] | KeySet, retain: dict[int, torch.Tensor] | KeySet, layers,
               m: int) -> dict[int, list[int]]:
    """The chosen setting's dimensions, ranked on all probe keys: {layer: sorted top-m dims}."""
    fs = forget if isinstance(forget, KeySet) else KeySet.of(forget)
    rs = retain if isinstance(retain, KeySet) else KeySet.of(retain)
    return {int(layer): sorted(int(d) for d in rank_dims(fs.prompt(layer), rs.keys[layer])[:m]) for layer in layers}


def inside(keys: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """The runtime's test (float32 keys against float32 bounds, every dimension)."""
    k = keys.float()
    return ((k >= lower) & (k <= upper)).all(dim=-1)


def calibration_config(recipe, background: dict | None = None) -> dict:
    """What a stored calibration must agree with (else: profile again). ``background``: the
    background set's description (its fingerprint identifies the texts), None without one."""
    ks = recipe.key_space
    out = {"version": CALIBRATION_VERSION, "forget": ks.forget, "retain": ks.retain_sets,
           "false_positive_budget": ks.false_positive_budget, "folds": ks.folds, "seed": ks.seed,
           "check": ks.check, "continuation_tokens": continuation_tokens(ks.check)}
    if ks.detector != "box":  # only then: statistics calibrated before the field existed stay valid
        out["detector"] = ks.detector
        out["solver"] = "gram"
        if ks.weights != "signed":  # only then: statistics fitted before the field existed stay valid
            out["weights"] = ks.weights
    if background is not None:
        out["background"] = {k: background[k] for k in ("source", "sets", "texts", "fingerprint") if k in background}
    return out


def continuation_tokens(check: str) -> int:
    """How many generated tokens' keys the runtime tests per query: with ``check: prompt`` only the
    prompt's key decides, so the calibration scores each query by its prompt key alone."""
    return 0 if check == "prompt" else CONTINUATION_TOKENS


def calibrate_keys(forget: dict[int, torch.Tensor] | KeySet, retain: dict[int, torch.Tensor] | KeySet, *, budget: float,
                   folds: int, seed: int, pairs: bool = True, retain_names: list[str] | None = None) -> dict:
    """CV choice + refit dims, as the JSON-able record stored with the statistics. ``retain_names``:
    the names of the retain sets (``retain.group`` indexes them)."""
    fs = forget if isinstance(forget, KeySet) else KeySet.of(forget)
    rs = retain if isinstance(retain, KeySet) else KeySet.of(retain)
    cal = cross_validate(fs, rs, folds=folds, seed=seed, budget=budget, pairs=pairs)
    c = cal.chosen
    dims = refit_dims(fs, rs, c.layers, c.m)
    return {
        "method": "calibrated",
        "layers": [int(x) for x in c.layers],
        "m": c.m,
        "scale": {str(layer): a for layer, a in zip(c.layers, c.scales)},
        "dims": {str(k): v for k, v in dims.items()},
        "cv": {"forget_coverage": round(c.coverage, 6), "retain_fpr": round(c.fpr, 6),
               "retain_fpr_train_max": round(c.fpr_train, 6), "margin": round(c.margin, 6),
               "retain_fpr_by_set": dict(zip(retain_names or [f"set{i}" for i in range(len(c.fpr_by_set))], c.fpr_by_set)),
               "folds": folds, "seed": seed, "budget": budget, "feasible": cal.feasible, "candidates": cal.total},
        "frontier": cal.frontier,
        "n_forget": fs.n,
        "n_retain": rs.n,
        "keys": {"forget": int(fs.owner.numel()), "retain": int(rs.owner.numel())},
    }


# ---------------------------------------------------------------------------------------------
# the pooled linear detector (key_space.detector: linear; docs/GENERALIZATION.md §4.3)
# ---------------------------------------------------------------------------------------------

LINEAR_WEIGHT_DECAY = 1e-3
LINEAR_MAX_ITER = 500
# eigenvalues of a fold's Gram matrix below this share of the largest span no direction of the data
GRAM_RANK_TOL = 1e-10


def _all_finite(x: torch.Tensor, elements: int = 1 << 20) -> bool:
    """``torch.isfinite(x).all()`` a block of rows at a time (≤ ``elements`` per block): on a whole
    matrix it makes an ``abs`` copy and two boolean ones."""
    step = max(1, elements // max(1, x.shape[-1]))
    return all(bool(torch.isfinite(x[i : i + step]).all()) for i in range(0, x.shape[0], step))


def feature_moments(blocks: list[dict[int, torch.Tensor]], layers: list[int]) -> tuple[dict, dict]:
    """Per layer, the mean and the (population, floored) standard deviation of every feature over
    all rows of ``blocks`` (float64): the standardization of the fit. Taken over every probe query,
    forget and negative alike — no label enters it, so the cross-fitting stays honest about labels."""
    mu, sd = {}, {}
    for layer in layers:
        x = torch.cat([b[layer] for b in blocks]).to(torch.float64)
        if not _all_finite(x):
            raise EditorError("key_space calibration: non-finite pooled keys")
        mu[layer] = x.mean(0)
        sd[layer] = x.std(0, unbiased=False).clamp(min=SIGMA_FLOOR)
    return mu, sd


def _standardized(blocks: list[dict[int, torch.Tensor]], layer: int, mu: dict, sd: dict) -> torch.Tensor:
    """One layer's standardized features of every row of ``blocks`` (float32 [n, d_ff])."""
    x = torch.cat([b[layer] for b in blocks]).to(torch.float64)
    return x.sub_(mu[layer]).div_(sd[layer]).to(torch.float32)


def gram(blocks: list[dict[int, torch.Tensor]], layers: list[int], mu: dict, sd: dict) -> torch.Tensor:
    """G = Z Zᵀ (float64 [n, n]) of the standardized features Z of every row of ``blocks`` (in order),
    over the layer-major concatenation of their layers — one layer block at a time (float32 products
    of O(1) values, summed in float64): O(n² · features) time, O(n² + n · d_ff) memory beyond the keys."""
    n = sum(next(iter(b.values())).shape[0] for b in blocks)
    g = torch.zeros(n, n, dtype=torch.float64)
    for layer in layers:
        z = _standardized(blocks, layer, mu, sd)
        g += (z @ z.T).to(torch.float64)
    return g


def fit_kernel_logistic(k: torch.Tensor, y: torch.Tensor, *, weight_decay: float = LINEAR_WEIGHT_DECAY,
                        max_iter: int = LINEAR_MAX_ITER) -> tuple[torch.Tensor, float]:
    """The class-balanced, L2-regularized logistic regression of ``fit_logistic``'s objective —
    mean BCE (positives weighted n_neg / n_pos) + weight_decay · ‖w‖² over standardized features z —
    solved in the span of the training rows: its minimizer is w = Zᵀα (the loss's gradient lies in
    that span), and with K = Z Zᵀ = U S Uᵀ the scores are Zw = U S^½ β and ‖w‖² = ‖β‖² for
    α = U S^-½ β. So the fit is the same problem over β ∈ R^rank, with the rows of U S^½ as features:
    O(m³) for the eigendecomposition, O(m²) per step, whatever the number of features.
    ``k``: [m, m] float64, ``y``: [m] 0/1. Returns (α [m] float64, b): score(z) = z·Zᵀα + b."""
    y = y.to(torch.float64)
    n_pos = float(y.sum())
    n_neg = float(y.numel()) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise EditorError("key_space calibration: every training fold needs forget and retain queries")
    s, u = torch.linalg.eigh(k)
    keep = s > GRAM_RANK_TOL * max(float(s.max()), 1e-300)
    s, u = s[keep], u[:, keep]
    f = u * s.sqrt()
    beta = torch.zeros(f.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    pos_weight = torch.tensor(n_neg / n_pos, dtype=torch.float64)
    opt = torch.optim.LBFGS([beta, b], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(f @ beta + b, y, pos_weight=pos_weight)
        loss = loss + weight_decay * (beta * beta).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    alpha = u @ (beta.detach() / s.sqrt())
    bias = float(b.detach()[0])
    if not (torch.isfinite(alpha).all() and math.isfinite(bias)):
        raise EditorError("key_space calibration: the linear detector did not converge to finite weights")
    return alpha, bias


# non-negative weights: the features a fold fits on — those whose mean is most above the negatives'
# (standardized separation > 0), at most this many (on the dev splits 4 096 to 65 536 decided the same)
MONOTONE_FEATURES = 8192


def fit_nonnegative_logistic(z: torch.Tensor, y: torch.Tensor, *, weight_decay: float = LINEAR_WEIGHT_DECAY,
                             max_iter: int = LINEAR_MAX_ITER) -> tuple[torch.Tensor, float]:
    """``fit_kernel_logistic``'s objective (mean BCE, positives weighted n_neg / n_pos, + weight_decay ·
    ‖w‖²) over standardized features ``z`` [m, k] with every weight ≥ 0 (the bias free): a convex
    problem with bounds, solved by L-BFGS-B (scipy) from zeros — deterministic. Returns (w [k] float64, b)."""
    import numpy as np
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    yt = y.to(torch.float64).numpy()
    n_pos = float(yt.sum())
    n_neg = float(yt.size) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise EditorError("key_space calibration: every training fold needs forget and retain queries")
    zt = np.asfortranarray(z.to(torch.float32).numpy())  # column-major: a column subset is contiguous
    cw = np.where(yt == 1, n_neg / n_pos, 1.0) / yt.size

    def loss_grad(p):
        w, b = p[:-1], p[-1]
        # most weights sit on their bound 0 (a few hundred of 8 192 are positive at the optimum): the
        # scores need only the positive ones' columns — half of each evaluation's memory traffic
        nz = np.flatnonzero(w)
        if nz.size * 4 < w.size:
            s = (zt[:, nz] @ w[nz].astype(np.float32)).astype(np.float64) + b
        else:
            s = (zt @ w.astype(np.float32)).astype(np.float64) + b
        loss = cw * (yt * np.logaddexp(0.0, -s) + (1 - yt) * np.logaddexp(0.0, s))
        g = cw * (0.5 * (1.0 + np.tanh(0.5 * s)) - yt)  # cw · (σ(s) − y), σ without overflow
        gw = (zt.T @ g.astype(np.float32)).astype(np.float64) + 2 * weight_decay * w
        return float(loss.sum() + weight_decay * (w @ w)), np.concatenate([gw, [g.sum()]])

    k = zt.shape[1]
    # numpy's BLAS on one thread, whatever the machine's cores or the command's --threads: the two
    # matrix-vector products per evaluation are memory-bound, and on 2 cores they took 3x the CPU time
    # and longer in wall time than on one (SmolLM2's recipe: 26 s against 16 s); the fitted weights
    # then do not depend on the thread count either (a BLAS's summation order does)
    with threadpool_limits(limits=1, user_api="blas"):
        res = minimize(loss_grad, np.zeros(k + 1), jac=True, method="L-BFGS-B",
                       bounds=[(0.0, None)] * k + [(None, None)], options={"maxiter": max_iter, "ftol": 1e-12, "gtol": 1e-9})
    w, b = torch.from_numpy(res.x[:-1].copy()), float(res.x[-1])
    if not (torch.isfinite(w).all() and math.isfinite(b)):
        raise EditorError("key_space calibration: the linear detector did not converge to finite weights")
    return w, b


def fold_separations(blocks: list[dict[int, torch.Tensor]], layers: list[int], mu: dict, pos_folds: list[torch.Tensor],
                     neg_folds: list[torch.Tensor]) -> list[torch.Tensor]:
    """For each fold k, ``separation_signed`` of every feature (layer-major concatenation) over the
    fold's TRAINING rows — the positives outside ``pos_folds[k]`` against the negatives outside
    ``neg_folds[k]`` (row indices into the concatenation of ``blocks``). One pass over the keys for
    all folds: per layer, each fold's count, sum and sum of squares of the keys centred on ``mu``
    (float64), the training side's being the total minus the fold's — O(n · features), not
    O(folds · n · features). Returns float64 [features] per fold."""
    folds = len(pos_folds)
    per_fold: list[list[torch.Tensor]] = [[] for _ in range(folds)]
    for layer in layers:
        x = torch.cat([b[layer] for b in blocks])
        sums = []  # per side: [folds, 3, d_ff] — count, Σx, Σx² of the centred keys
        for part in (pos_folds, neg_folds):
            rows = []
            for idx in part:
                c = x.index_select(0, idx).to(torch.float64).sub_(mu[layer])
                rows.append(torch.stack([torch.full_like(c[0], float(c.shape[0])), c.sum(0), c.square().sum(0)]))
            sums.append(torch.stack(rows))
        for k in range(folds):
            stats = []
            for side in sums:
                n, s1, s2 = (side.sum(0) - side[k]).unbind(0)
                mean = s1 / n.clamp(min=1)
                var = (s2 - s1 * mean) / (n - 1).clamp(min=1)
                sd = torch.where(n > 1, var.clamp(min=0).sqrt(), torch.zeros_like(var)).clamp(min=SIGMA_FLOOR)
                stats.append((mean, sd))
            (mp, sp), (mn, sn) = stats
            per_fold[k].append((mp - mn) / (sp + sn))
    return [torch.cat(v) for v in per_fold]


def _positive_columns(sep: torch.Tensor, limit: int) -> torch.Tensor:
    """The ``limit`` columns whose separation ``sep`` (``fold_separations``) is largest and > 0,
    ascending."""
    order = torch.sort(torch.where(torch.isnan(sep), torch.full_like(sep, -math.inf), sep), descending=True, stable=True).indices
    top = order[:limit]
    return top[sep[top] > 0].sort().values


def _standardized_columns(blocks: list[dict[int, torch.Tensor]], layers: list[int], cols: torch.Tensor, mu: dict,
                          sd: dict) -> torch.Tensor:
    """float32 [n, len(cols)]: the standardized features ``cols`` (ascending, layer-major) of every row."""
    out, start = [], 0
    for layer in layers:
        w = blocks[0][layer].shape[1]
        lo, hi = (int(v) for v in torch.searchsorted(cols, torch.tensor([start, start + w])))
        if hi > lo:
            c = cols[lo:hi] - start
            x = torch.cat([b[layer].index_select(1, c) for b in blocks]).to(torch.float64)
            out.append(((x - mu[layer][c]) / sd[layer][c]).to(torch.float32))
        start += w
    return torch.cat(out, 1) if out else torch.zeros(sum(next(iter(b.values())).shape[0] for b in blocks), 0)


def budget_threshold(scores: torch.Tensor, group: torch.Tensor, budget: float) -> float:
    """The smallest threshold t such that, in every retain set g, at most ⌊budget·n_g⌋ scores are
    > t (a false positive is a score above the threshold)."""
    t = -math.inf
    for g in group.unique(sorted=True).tolist():
        s = torch.sort(scores[group == g], descending=True).values
        allowed = int(math.floor(budget * s.numel() + 1e-9))
        if allowed < s.numel():
            t = max(t, float(s[allowed]))
    return t


def calibrate_linear(forget: dict[int, torch.Tensor], retain: dict[int, torch.Tensor], group: torch.Tensor, *,
                     budget: float, folds: int, seed: int, retain_names: list[str] | None = None,
                     weights: str = "signed", on_fold: Callable[[], None] | None = None
                     ) -> tuple[dict, dict[int, torch.Tensor]]:
    """K-fold cross-fitted pooled linear detector over every layer's pooled key (``on_fold()`` is
    called after each fold's fit: the caller's progress bar).

    ``weights``: ``signed`` (any sign: the fit in kernel form below) or ``nonnegative`` — every weight
    ≥ 0 (``fit_nonnegative_logistic`` on the fold's ``MONOTONE_FEATURES`` features most above the
    negatives): the score is then monotone in every pooled key — text appended after a request never
    lowers it (a causal model's earlier keys stay, a max only grows) and text around it adds nothing
    negative; signed weights let unrelated text (a long story) subtract.

    Features: every layer's pooled key, standardized over all probe queries (``feature_moments``).
    On each fold: fit on the training forget (positive) and retain (negative) queries
    (``fit_kernel_logistic`` on the fold's block of the Gram matrix, computed once: ``gram``), score
    the held-out ones (out-of-fold scores). Threshold: the smallest one whose out-of-fold
    false-positive rate is ≤ budget in EVERY retain set (``budget_threshold``). The detector is the
    average of the K fold models (a linear model again, w = Zᵀᾱ) shifted by that threshold, so it
    abstains when its score is > 0; the out-of-fold rates are its cross-validated estimate. Returns
    (record, {layer: weight float32 [d_ff]}) in the raw key space; the record holds the bias and the
    CV figures.

    Cost: O(n² · features) for the Gram matrix, O(folds · n³) for the fits, O(n · features) for the
    weights — n the number of probe queries; memory O(n² + n · d_ff) beyond the keys."""
    layers = sorted(forget)
    blocks = [forget, retain]
    n_f, n_r = forget[layers[0]].shape[0], retain[layers[0]].shape[0]
    if weights not in ("signed", "nonnegative"):
        raise ValueError(f"weights must be signed or nonnegative, got {weights!r}")
    mu, sd = feature_moments(blocks, layers)
    width = sum(forget[i].shape[1] for i in layers)
    y_all = torch.cat([torch.ones(n_f), torch.zeros(n_r)]).to(torch.float64)
    ff = fold_indices(n_f, folds, seed, salt=1)
    rf = fold_indices(n_r, folds, seed, salt=2)
    oof = torch.empty(n_f + n_r, dtype=torch.float64)
    alpha_sum = torch.zeros(n_f + n_r, dtype=torch.float64)
    w_sum = torch.zeros(width, dtype=torch.float64)  # nonnegative: the fold models' standardized weights
    g = gram(blocks, layers, mu, sd) if weights == "signed" else None
    # the non-negative fit's feature choice, per fold from its training rows only (out-of-fold honest)
    seps = fold_separations(blocks, layers, mu, ff, [n_f + r for r in rf]) if g is None else None
    bs, kept = [], []
    for k in range(folds):
        tr = torch.cat([torch.cat([ff[j] for j in range(folds) if j != k]),
                        n_f + torch.cat([rf[j] for j in range(folds) if j != k])])
        ho = torch.cat([ff[k], n_f + rf[k]])
        if g is not None:
            alpha, b = fit_kernel_logistic(g[tr][:, tr], y_all[tr])
            oof[ho] = g[ho][:, tr] @ alpha + b
            alpha_sum[tr] += alpha
        else:
            # the fold's features: chosen on its training rows only, so the out-of-fold scores stay honest
            cols = _positive_columns(seps[k], MONOTONE_FEATURES)
            z = _standardized_columns(blocks, layers, cols, mu, sd)
            w, b = fit_nonnegative_logistic(z[tr], y_all[tr])
            oof[ho] = z[ho].to(torch.float64) @ w + b
            w_sum[cols] += w
            kept.append(int(cols.numel()))
            del z
        bs.append(b)
        if on_fold is not None:
            on_fold()
    oof_f, oof_r = oof[:n_f], oof[n_f:]
    t = budget_threshold(oof_r, group, budget)
    covered = oof_f > t
    names = retain_names or [f"set{g_}" for g_ in range(int(group.max()) + 1)]
    by_set = {names[g_]: round(float((oof_r[group == g_] > t).double().mean()), 6) for g_ in group.unique(sorted=True).tolist()}
    # the average fold model: w = Zᵀ ᾱ over the standardized features, then back to the raw key space
    alpha_mean = alpha_sum / folds
    bias_std = sum(bs) / len(bs)
    out, offset, start = {}, 0.0, 0
    for layer in layers:
        if g is not None:
            w = (_standardized(blocks, layer, mu, sd).to(torch.float64).T @ alpha_mean) / sd[layer]
        else:
            w = w_sum[start : start + sd[layer].numel()] / folds / sd[layer]
        start += sd[layer].numel()
        offset += float((w * mu[layer]).sum())
        out[layer] = w.to(torch.float32).contiguous()
    bias = bias_std - offset - t
    if not all(torch.isfinite(w).all() for w in out.values()) or not math.isfinite(bias):
        raise EditorError("key_space calibration: the linear detector did not converge to finite weights")
    record = {
        "method": "linear",
        "detector": "linear",
        "pool": "max",
        "layers": [int(x) for x in layers],
        "bias": float(bias),
        "cv": {"forget_coverage": round(float(covered.double().mean()), 6),
               "retain_fpr": round(float((oof_r > t).double().mean()), 6),
               "retain_fpr_by_set": by_set, "folds": folds, "seed": seed, "budget": budget,
               "features": width, "weight_decay": LINEAR_WEIGHT_DECAY,
               **({"solver": "gram"} if g is not None else {"solver": "l-bfgs-b", "features_fitted": kept})},
        "weights": weights,
        "n_forget": int(n_f),
        "n_retain": int(n_r),
    }
    return record, out
