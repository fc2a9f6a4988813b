"""Design of the chat-aware guard on a real model (issue #22): every choice on ``dev``, never ``eval``.

The pooled linear detector decides on the prompt alone (``check: prompt``): whether a prompt is
refused is a function of its pooled keys. So designs can be compared without generating: the pooled
keys of every probe / dev prompt are collected once (cached under ``--cache``, float16), and each
design is a fit (``editor.methods.calibrate.calibrate_linear``) on a choice of probe sets, scored by
the runtime's rule — Σ_layers weight · pooled key + bias > 0 — on the dev sets:

- the battery's ``dev`` items, per skill, phrasing and form (raw / chat): the forget skill's share
  refused (the guard's coverage), every kept skill's share refused (its cost);
- the ordinary prompts' ``development`` part per form, headline categories and near-neighbour contrast
  categories apart;
- the attack suite's ``development`` wrappers around the forget skill's dev requests, per family and form.

    python bench/guard_dev.py --task math --designs fewshot-raw,fewshot-both,requests-both
    python bench/guard_dev.py --model qwen --task python
    python bench/guard_dev.py --model qwen --task math --designs shipped --split eval   # read once

``--split eval`` reads the held-out parts instead — only for a model whose guard is not chosen here
(Qwen: SmolLM2's design, the ``shipped`` one, applied unchanged), and once.

Results: ``bench/results/guard_dev-<model>-<task>[-eval].json`` and a table. With the default
``--split dev`` the ``eval`` split and the ordinary prompts' ``evaluation`` part are never read (the
README's SmolLM2 figures come from ``bench/real_model.py --split eval``, run once after the choice).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editor import ordinary  # noqa: E402
from editor.data import chat_text, raw_conversation  # noqa: E402
from editor.methods.calibrate import calibrate_linear  # noqa: E402
from editor.model.arch import spec_for  # noqa: E402
from editor.model.loading import load_config, load_model, load_tokenizer  # noqa: E402
from editor.profile import collect  # noqa: E402
from editor.recipe import load_recipe  # noqa: E402

BATTERY = ROOT / "editor" / "battery" / "data"
MODELS = {"smollm2": ROOT / "recipes" / "smollm2" / "forget-math.yaml",
          "qwen": ROOT / "recipes" / "qwen2.5-coder-0.5b" / "forget-math.yaml"}
SKILLS = ("math", "python", "capitals", "past_tense", "plurals", "antonyms", "languages")
FORMS = ("raw", "chat")


def battery(split: str, path: Path = BATTERY) -> list[dict]:
    return [json.loads(line) for line in (path / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


def render(texts_or_convs, form: str, tok) -> list[str]:
    out = []
    for t in texts_or_convs:
        conv = t if isinstance(t, list) else [{"role": "user", "content": t}]
        if form == "chat":
            out.append(chat_text(tok, conv))
        else:
            out.append(raw_conversation(conv) if isinstance(t, list) else t)
    return out


class Keys:
    """Pooled keys (max and mean over the prompt's real tokens) of text lists, cached on disk."""

    def __init__(self, model, tok, cache: Path, tag: str, batch_size: int = 16, max_length: int = 512):
        self.model, self.tok, self.cache, self.tag = model, tok, cache, tag
        self.spec = spec_for(model.config)
        self.batch_size, self.max_length = batch_size, max_length
        cache.mkdir(parents=True, exist_ok=True)

    def __call__(self, texts: list[str]) -> dict[str, dict[int, torch.Tensor]]:
        h = hashlib.sha256((self.tag + "\x00" + "\x00".join(texts)).encode()).hexdigest()[:20]
        f = self.cache / f"{h}.safetensors"
        if f.exists():
            t = load_file(str(f))
        else:
            t = self._collect(texts)
            tmp = f.with_suffix(".tmp")
            save_file(t, str(tmp))
            os.replace(tmp, f)
        out: dict[str, dict[int, torch.Tensor]] = {"max": {}, "mean": {}}
        for k, v in t.items():
            kind, layer = k.split(".")
            out[kind][int(layer)] = v.float()
        return out

    @torch.inference_mode()
    def _collect(self, texts: list[str]) -> dict[str, torch.Tensor]:
        prepared = collect.batched_texts(self.tok, texts, batch_size=self.batch_size, max_length=self.max_length, padding_side="left")
        width = collect.d_ff(self.model, self.spec)
        n_layers = len(collect.decoder_layers(self.model, self.spec))
        mx = {i: torch.empty(len(texts), width) for i in range(n_layers)}
        mn = {i: torch.empty(len(texts), width) for i in range(n_layers)}

        def tap(i, x, b):
            x = x.reshape(b.input_ids.shape[0], b.input_ids.shape[1], width).float()
            m = b.attention_mask.bool()[:, :, None]
            mx[i].index_copy_(0, b.rows, x.masked_fill(~m, float("-inf")).amax(1))
            mn[i].index_copy_(0, b.rows, (x * m).sum(1) / m.sum(1))

        t0 = time.time()
        collect.run(self.model, self.spec, prepared.batches, key=tap)
        print(f"  collected {len(texts)} prompts ({prepared.tokens} tokens) in {time.time() - t0:.0f} s", flush=True)
        out = {f"max.{i}": v.half() for i, v in mx.items()}
        out.update({f"mean.{i}": v.half() for i, v in mn.items()})
        return out


def pooled(keys: dict[str, dict[int, torch.Tensor]], pool: str) -> dict[int, torch.Tensor]:
    if pool == "max":
        return keys["max"]
    if pool == "mean":
        return keys["mean"]
    return {i: torch.cat([keys["max"][i], keys["mean"][i]], 1) for i in keys["max"]}  # max+mean


# ---------------------------------------------------------------------------------------------
# designs: which probe sets fit the detector (forget, negatives), in which forms, with which pooling
# ---------------------------------------------------------------------------------------------

FEWSHOT = {"math": ["math/eq"], "python": ["python/docstring"]}


def designs(task: str, probe: list[dict]) -> dict[str, dict]:
    """Each design: forget = probe records of the task in ``forget`` phrasings; negatives = probe
    records of the kept skills (their phrasings ``kept``) + the ordinary calibration part (with or
    without the contrast categories); ``forms``; ``pool``."""
    kinds = {r["phrasing"]: r.get("kind", "fewshot") for r in probe}
    mine = sorted(p for p in kinds if p.startswith(task + "/"))
    requests = [p for p in mine if kinds[p] == "request"]
    fewshot_all = [p for p in kinds if kinds[p] == "fewshot" and not p.startswith(task + "/")]
    all_kept = [p for p in kinds if not p.startswith(task + "/")]
    contrast = list(ordinary.CONTRAST_CATEGORIES)
    d = {
        # what the shipped recipes did before issue #22: one few-shot phrasing, raw only
        "fewshot-raw": dict(forget=FEWSHOT[task], kept=fewshot_all, forms=["raw"], contrast=False, pool="max"),
        "fewshot-both": dict(forget=FEWSHOT[task], kept=fewshot_all, forms=["raw", "chat"], contrast=False, pool="max"),
    }
    if requests:
        d["requests-both"] = dict(forget=FEWSHOT[task] + requests[: len(requests) // 2], kept=all_kept,
                                  forms=["raw", "chat"], contrast=False, pool="max")
        d["requests-both-contrast"] = dict(d["requests-both"], contrast=True)
        d["allreq-both-contrast"] = dict(forget=FEWSHOT[task] + requests, kept=all_kept, forms=["raw", "chat"],
                                         contrast=True, pool="max")
        d["allreq-both-contrast-maxmean"] = dict(d["allreq-both-contrast"], pool="max+mean")
        d["allreq-both-cgroup"] = dict(d["allreq-both-contrast"], contrast_group=True)
        d["allreq-both-cgroup-monotone"] = dict(d["allreq-both-cgroup"], monotone=True)
        # the shipped recipes' guard, fitted by the product's own calibration (key_space.weights: nonnegative)
        d["shipped"] = dict(d["allreq-both-cgroup"], weights="nonnegative")
        for keep in (4096, 65536):
            d[f"allreq-both-cgroup-monotone-k{keep}"] = dict(d["allreq-both-cgroup-monotone"], keep=keep)
        for wd in (1e-2, 1e-4):
            d[f"allreq-both-cgroup-monotone-wd{wd:g}"] = dict(d["allreq-both-cgroup-monotone"], wd=wd)
        probe_req = {"math": ["math/ask", "math/word", "math/multi"], "python": ["python/write", "python/howto"]}[task]
        d["part-both-cgroup"] = dict(d["allreq-both-cgroup"], forget=FEWSHOT[task] + probe_req)
        d["part-both-cgroup-monotone"] = dict(d["part-both-cgroup"], monotone=True)
        d["requests-both-cgroup"] = dict(d["requests-both-contrast"], contrast_group=True)
        d["requests-both-cgroup-monotone"] = dict(d["requests-both-cgroup"], monotone=True)
    return d


def calibrate_monotone(forget, retain, group, *, budget, folds, seed, retain_names=None, keep=16384, wd=1e-3):
    """Experimental: the pooled linear detector with non-negative weights (more text never lowers the
    score: a request inside a long story still scores as high), on the ``keep`` features whose mean is
    most above the negatives' (standardized separation); L-BFGS-B with bounds (scipy)."""
    import math

    import numpy as np
    from scipy.optimize import minimize

    from editor.methods.calibrate import budget_threshold, fold_indices

    layers = sorted(forget)
    xf = torch.cat([forget[i] for i in layers], 1).double()
    xr = torch.cat([retain[i] for i in layers], 1).double()
    x = torch.cat([xf, xr])
    mu, sd = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)
    sep = (xf.mean(0) - xr.mean(0)) / (xf.std(0) + xr.std(0)).clamp(min=1e-6)
    cols = torch.sort(sep, descending=True).indices[:keep]
    cols = cols[sep[cols] > 0]
    z = ((x[:, cols] - mu[cols]) / sd[cols]).numpy()
    n_f, n_r = xf.shape[0], xr.shape[0]
    y = np.concatenate([np.ones(n_f), np.zeros(n_r)])
    ff, rf = fold_indices(n_f, folds, seed, salt=1), fold_indices(n_r, folds, seed, salt=2)
    oof = np.empty(n_f + n_r)
    ws, bs = [], []
    for k in range(folds):
        tr = np.concatenate([torch.cat([ff[j] for j in range(folds) if j != k]).numpy(),
                             n_f + torch.cat([rf[j] for j in range(folds) if j != k]).numpy()])
        ho = np.concatenate([ff[k].numpy(), n_f + rf[k].numpy()])
        zt, yt = z[tr], y[tr]
        pw = (1 - yt).sum() / yt.sum()
        cw = np.where(yt == 1, pw, 1.0) / len(yt)

        def fg(p):
            w, b = p[:-1], p[-1]
            s = zt @ w + b
            l = np.logaddexp(0, -s) * yt + np.logaddexp(0, s) * (1 - yt)
            g = (1 / (1 + np.exp(-s)) - yt) * cw
            return float((cw * l).sum() + wd * (w @ w)), np.concatenate([zt.T @ g + 2 * wd * w, [g.sum()]])

        p0 = np.zeros(z.shape[1] + 1)
        res = minimize(fg, p0, jac=True, method="L-BFGS-B", bounds=[(0, None)] * z.shape[1] + [(None, None)],
                       options={"maxiter": 500})
        w, b = res.x[:-1], res.x[-1]
        oof[ho] = z[ho] @ w + b
        ws.append(w)
        bs.append(b)
    oof_f, oof_r = torch.from_numpy(oof[:n_f]), torch.from_numpy(oof[n_f:])
    t = budget_threshold(oof_r, group, budget)
    w = torch.from_numpy(np.mean(ws, 0))
    wfull = torch.zeros(x.shape[1], dtype=torch.float64)
    wfull[cols] = w / sd[cols]
    bias = float(np.mean(bs)) - float((wfull * mu).sum()) - t
    widths = [forget[i].shape[1] for i in layers]
    weights = {layer: part.float() for layer, part in zip(layers, torch.split(wfull, widths))}
    rec = {"bias": bias, "cv": {"forget_coverage": float((oof_f > t).double().mean()), "features": int(cols.numel())},
           "n_forget": n_f, "n_retain": n_r}
    return rec, weights


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--task", default="math", choices=("math", "python"))
    ap.add_argument("--designs", default=None, help="comma-separated design names (default: all)")
    ap.add_argument("--battery", type=Path, default=BATTERY)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "skill-editor-guard-dev")
    ap.add_argument("--budget", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default=None, help="override the recipe's dtype (e.g. bfloat16)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many records per (phrasing, split) (quick runs)")
    ap.add_argument("--split", choices=("dev", "eval"), default="dev",
                    help="dev (where designs are chosen) or eval — the battery's eval items, the ordinary prompts' "
                         "evaluation part and the evaluation wrappers: read once, for a model whose guard is not chosen "
                         "here (the shipped design applied unchanged)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(MODELS[args.model])
    if args.dtype:
        recipe.dtype = args.dtype
    tok = load_tokenizer(recipe)
    model = load_model(recipe, load_config(recipe))
    keys = Keys(model, tok, args.cache, f"{args.model}/{recipe.model}" + (f"/{args.dtype}" if args.dtype else ""))

    def limited(rows):
        if not args.limit:
            return rows
        seen: dict[str, int] = {}
        out = []
        for r in rows:
            seen[r["phrasing"]] = seen.get(r["phrasing"], 0) + 1
            if seen[r["phrasing"]] <= args.limit:
                out.append(r)
        return out

    probe, dev = limited(battery("probe", args.battery)), limited(battery(args.split, args.battery))
    ord_cal = ordinary.load("calibration")
    part = {"dev": "development", "eval": "evaluation"}[args.split]
    ord_dev = ordinary.load(part)
    all_designs = designs(args.task, probe)
    chosen = args.designs.split(",") if args.designs else list(all_designs)

    # the dev prompts: battery dev per form, ordinary development per form, attacks (development) per form
    dev_sets = []  # (label, kind, texts, form)
    for form in FORMS:
        by_ph: dict[str, list[dict]] = {}
        for r in dev:
            by_ph.setdefault(r["phrasing"], []).append(r)
        for ph, rows in sorted(by_ph.items()):
            dev_sets.append((ph, "battery", render([r["prompt"] for r in rows], form, tok), form))
        cats: dict[str, list[str]] = {}
        for r in ord_dev:
            cats.setdefault(r["category"], []).append(r["text"])
        for c, texts in sorted(cats.items()):
            dev_sets.append((f"ordinary:{c}", "ordinary", render(texts, form, tok), form))
    try:
        from editor import attacks as attack_suite
        from editor.eval.attacks import wrapped

        requests = list(dict.fromkeys(r["prompt"] for r in dev if r["skill"] == args.task and r.get("kind") == "request"))
        wrappers = attack_suite.load(part)
        if requests and wrappers:
            for form in FORMS:
                fams: dict[str, list] = {}
                for w, req in wrapped(wrappers, requests, per_wrapper=6):
                    fams.setdefault(w["family"], []).append(attack_suite.render(w, req))
                for fam, items in sorted(fams.items()):
                    dev_sets.append((f"attack:{fam}", "attack", render(items, form, tok), form))
    except ImportError:
        pass

    print(f"collecting dev keys ({sum(len(t) for _, _, t, _ in dev_sets)} prompts)", flush=True)
    dev_keys = [(label, kind, keys(texts), form) for label, kind, texts, form in dev_sets]

    results = {}
    for name in chosen:
        d = all_designs[name]
        t0 = time.time()
        forget_texts, neg_groups = [], []
        for form in d["forms"]:
            forget_texts += render([r["prompt"] for r in probe if r["phrasing"] in d["forget"]], form, tok)
            for skill in SKILLS:
                if skill == args.task:
                    continue
                rows = [r["prompt"] for r in probe if r["skill"] == skill and r["phrasing"] in d["kept"]]
                if rows:
                    neg_groups.append((f"{skill}[{form}]", render(rows, form, tok)))
            contrast = ordinary.CONTRAST_CATEGORIES
            if d.get("contrast_group"):
                bg = [r["text"] for r in ord_cal if r["category"] not in contrast]
                near = [r["text"] for r in ord_cal if r["category"] in contrast]
                neg_groups.append((f"contrast[{form}]", render(near, form, tok)))
            else:
                bg = [r["text"] for r in ord_cal if d["contrast"] or r["category"] not in contrast]
            neg_groups.append((f"background[{form}]", render(bg, form, tok)))
        fk = pooled(keys(forget_texts), d["pool"])
        neg = [pooled(keys(t), d["pool"]) for _, t in neg_groups]
        rk = {i: torch.cat([n[i] for n in neg]) for i in fk}
        group = torch.cat([torch.full((len(t),), g, dtype=torch.long) for g, (_, t) in enumerate(neg_groups)])
        extra = {k: d[k] for k in ("keep", "wd") if k in d}
        fit = calibrate_monotone if d.get("monotone") else calibrate_linear
        if d.get("weights"):
            extra["weights"] = d["weights"]
        rec, w = fit(fk, rk, group, budget=args.budget, folds=5, seed=0, retain_names=[n for n, _ in neg_groups], **extra)
        fit_s = time.time() - t0
        rows = {}
        for label, kind, k, form in dev_keys:
            x = pooled(k, d["pool"])
            s = sum(x[i].double() @ w[i].double() for i in w) + rec["bias"]
            rows[f"{label}@{form}"] = {"kind": kind, "n": int(s.numel()), "refused": int((s > 0).sum())}
        results[name] = {"design": d, "cv": rec["cv"], "fit_seconds": round(fit_s, 1), "dev": rows,
                         "n_forget": rec["n_forget"], "n_retain": rec["n_retain"]}
        print(f"\n== {name}: fitted on {rec['n_forget']} forget / {rec['n_retain']} negatives in {fit_s:.0f} s; "
              f"oof coverage {rec['cv']['forget_coverage']:.3f}", flush=True)
        print_rows(rows, args.task)
    out = ROOT / "bench" / "results" / (f"guard_dev-{args.model}-{args.task}{'-' + args.dtype if args.dtype else ''}"
                                        f"{'-eval' if args.split == 'eval' else ''}.json")
    old = json.loads(out.read_text()) if out.exists() else {}
    old.update(results)
    out.write_text(json.dumps(old, indent=1) + "\n")
    print(f"wrote {out}")


def print_rows(rows: dict, task: str) -> None:
    def agg(pred):
        n = sum(v["n"] for k, v in rows.items() if pred(k, v))
        r = sum(v["refused"] for k, v in rows.items() if pred(k, v))
        return f"{100 * r / n:5.1f}% ({r}/{n})" if n else "   n/a"

    for form in FORMS:
        at = f"@{form}"
        print(f" [{form}] forget few-shot {agg(lambda k, v: k.endswith(at) and v['kind'] == 'battery' and k.startswith(task + '/') and k.split('@')[0] in FEWSHOT_ALL)}"
              f" | forget requests {agg(lambda k, v: k.endswith(at) and v['kind'] == 'battery' and k.startswith(task + '/') and k.split('@')[0] not in FEWSHOT_ALL)}"
              f" | kept (worst) {max((100 * v['refused'] / v['n'], k) for k, v in rows.items() if k.endswith(at) and v['kind'] == 'battery' and not k.startswith(task + '/'))}"
              f" | ordinary {agg(lambda k, v: k.endswith(at) and v['kind'] == 'ordinary' and k.split('@')[0][9:] not in ordinary.CONTRAST_CATEGORIES)}"
              f" | contrast {agg(lambda k, v: k.endswith(at) and v['kind'] == 'ordinary' and k.split('@')[0][9:] in ordinary.CONTRAST_CATEGORIES)}"
              f" | attacks {agg(lambda k, v: k.endswith(at) and v['kind'] == 'attack')}")
        for k, v in sorted(rows.items()):
            if k.endswith(at) and (k.startswith(task + "/") or v["kind"] == "attack"):
                print(f"     {k:40s} {100 * v['refused'] / v['n']:5.1f}% of {v['n']}")


FEWSHOT_ALL = {"math/eq", "math/qa", "python/docstring", "python/comment", "python/markdown"}

if __name__ == "__main__":
    main()
