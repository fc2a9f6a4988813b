#!/usr/bin/env python
"""How separable is a forget skill at the guard's position? (issue #9, docs/GENERALIZATION.md §4.1)

    python bench/separability.py                        # facts_fr probed in facts_fr/0, and math/0
    python bench/separability.py --model DIR            # another testbed build
    python bench/separability.py --probe facts_fr/0 --probe math/0 --budget 0.02 --target 0.9

KSD decides on the key (the down projection's input) at the prompt's last token. This script asks
what ANY detector over those keys could achieve, as a bound on what a hypercube can: a logistic
regression (standardized keys, L2, class-balanced; LBFGS) trained on the probed phrasing's probe
prompts (positive) against every other skill's probe prompts (negative) — one layer at a time
and all layers concatenated. Reported on ``eval.jsonl``:

- ``honest``: threshold = the (1 − budget) quantile of the classifier's scores on a held-out half
  of the probe negatives (the classifier is trained on the other half) → coverage of the unseen
  phrasings of the skill and the false-positive rate of every retained skill.
- ``oracle``: threshold chosen on the evaluation set itself so that ``target`` of the unseen
  phrasings are covered → the false-positive rate of the worst retained skill. If that exceeds the
  budget, no threshold of this linear detector meets the target, even with the answers in hand.

A linear detector is not an upper bound on every box (a box is an intersection of half-spaces),
but it is a far richer family than the boxes' axis-aligned 1-D thresholds; the exhaustive box
ceilings are in docs/GENERALIZATION.md §4.1. Deterministic (seeded split, LBFGS from zeros).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fit_logistic(x: torch.Tensor, y: torch.Tensor, weight_decay: float = 1e-3, iters: int = 500):
    """Class-balanced L2 logistic regression on standardized features; returns a scoring function."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    z = z.double()
    pos_weight = (y == 0).sum() / (y == 1).sum().clamp(min=1)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.double(), pos_weight=pos_weight)
        loss = loss + weight_decay * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_, b_ = w.detach(), b.detach()
    return lambda q: (((q - mu) / sd).double() @ w_ + b_)


def keys_of(model_dir: Path, data_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editor.model.arch import spec_for
    from editor.profile.collect import last_token_keys
    from editor.testbed import DATA_DIR

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    spec = spec_for(model.config)
    out = {}
    for split in ("probe", "eval"):
        with open(Path(data_dir or DATA_DIR) / f"{split}.jsonl", encoding="utf-8") as fh:
            ex = [json.loads(line) for line in fh if line.strip()]
        keys = last_token_keys(model, tok, spec, [e["prompt"] for e in ex], batch_size=64, max_length=256)
        out[split] = ([e["phrasing"] for e in ex], keys)
    return out


def analyse(keys, probed: str, budget: float, target: float, seed: int = 0) -> list[dict]:
    skill = probed.split("/")[0]
    skill_of = lambda p: p.split("/")[0]  # noqa: E731
    (pp, pk), (ep, ek) = keys["probe"], keys["eval"]
    retained = sorted({skill_of(p) for p in pp} - {skill})
    pos = torch.tensor([p == probed for p in pp])
    neg_idx = torch.tensor([i for i, p in enumerate(pp) if skill_of(p) != skill])
    g = torch.Generator().manual_seed(seed)
    perm = neg_idx[torch.randperm(len(neg_idx), generator=g)]
    neg_train, neg_hold = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    unseen = torch.tensor([skill_of(p) == skill and p != probed for p in ep])
    masks = {s: torch.tensor([skill_of(p) == s for p in ep]) for s in retained}
    n_layers = len(pk)
    rows = []
    for name, layers in [*[(f"layer {i}", [i]) for i in range(n_layers)], ("all layers", list(range(n_layers)))]:
        x = torch.cat([pk[i] for i in layers], 1)
        xe = torch.cat([ek[i] for i in layers], 1)
        tr = torch.cat([torch.nonzero(pos).flatten(), neg_train])
        f = fit_logistic(x[tr], pos[tr].float())
        s_hold, s_eval = f(x[neg_hold]), f(xe)
        # per retained skill: its held-out negatives' (1 - budget) quantile; the strictest wins
        hold_skill = [skill_of(pp[int(i)]) for i in neg_hold]
        th = max(torch.quantile(s_hold[torch.tensor([h == s for h in hold_skill])], 1 - budget).item() for s in retained)
        honest = {"coverage": (s_eval[unseen] > th).double().mean().item(),
                  "fpr": {s: (s_eval[m] > th).double().mean().item() for s, m in masks.items()}}
        th_o = torch.quantile(s_eval[unseen], 1 - target).item()
        oracle = {s: (s_eval[m] >= th_o).double().mean().item() for s, m in masks.items()}
        rows.append({"probed": probed, "keys": name, "honest": honest, "oracle_fpr": oracle})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="model dir (default: the embedded testbed)")
    ap.add_argument("--data", type=Path, default=None, help="dir with probe.jsonl / eval.jsonl")
    ap.add_argument("--probe", action="append", default=None, help="probed phrasing (repeatable)")
    ap.add_argument("--budget", type=float, default=0.02)
    ap.add_argument("--target", type=float, default=0.90)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from editor.testbed import MODEL_DIR

    keys = keys_of(args.model or MODEL_DIR, args.data)
    for probed in args.probe or ["facts_fr/0", "math/0"]:
        rows = analyse(keys, probed, args.budget, args.target)
        retained = list(rows[0]["oracle_fpr"])
        print(f"\nLinear detector on last-token keys, trained on {probed} vs the retained skills' probe prompts"
              f" (eval.jsonl; honest = threshold at {args.budget:.0%} FPR on held-out probe negatives;"
              f" oracle = threshold set on eval to cover {args.target:.0%} of the unseen phrasings)\n")
        head = ["keys", "honest: unseen covered", *[f"honest FPR {s}" for s in retained], "oracle: worst FPR"]
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" for _ in head) + "|")
        for r in rows:
            worst = max(r["oracle_fpr"].items(), key=lambda kv: kv[1])
            cells = [r["keys"], f"{r['honest']['coverage']:.1%}", *[f"{r['honest']['fpr'][s]:.1%}" for s in retained],
                     f"{worst[1]:.1%} ({worst[0]})"]
            print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
