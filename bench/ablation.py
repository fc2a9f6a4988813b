#!/usr/bin/env python
"""Issue #9 ablations on the embedded testbed (docs/GENERALIZATION.md): the tables of the README.

    python bench/ablation.py                     # everything (KSD + NA), ~10-20 min on 1 CPU thread
    python bench/ablation.py --part ksd          # (1) KSD: paper vs calibrated box vs pooled linear, one probed phrasing
    python bench/ablation.py --part na           # (2) NA: score Pareto + the demo ablation
    python bench/ablation.py --json out.json     # also every number as JSON
    python bench/ablation.py --model DIR --data DIR   # another testbed build (model dir, data dir)

Every reported number is ``editor.eval.scorecard.score`` (greedy generation, exact match, abstention) on
the testbed's ``eval.jsonl``; the methods (profiling, calibration) only ever see ``probe.jsonl``
through the recipes.

(1) KSD, for each forget case of ``recipes/generalize/`` (math probed in ``math/0``; French facts
    probed in ``facts_fr/0``): abstention on the eval records of the probed phrasing, of the
    unseen phrasings of the same skill, and of every retained skill — the paper's KSD (every
    dimension of the last layer, α = 1 and 2, and α = 4 to show the trade-off) beside the
    calibrated hypercube (retain queries = every other skill's probe prompts, budget 1 %, and 2 %)
    and the pooled linear detector (``key_space.detector: linear``, recipes
    ``generalize/*-linear.yaml``: every layer's key max-pooled over the prompt, one cross-fitted
    logistic score; budget 1 % and 2 %, ``check: prompt``).
(2) NA on the demo setting (``recipes/demo.yaml``: forget math answers, retain the others, all
    phrasings), ``mode: sample``, seed 0: for each selection score, a sweep over ``top_percent``
    (exact match per skill), the Pareto summary (best math drop with every retained skill's
    relative drop ≤ 5 %), and the ablation table: NA alone at 0.5 / 1.5 / 3 %, KSD alone, both.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editor.eval.scorecard import score  # noqa: E402
from editor.recipe import parse_recipe  # noqa: E402

NA_SCORES = ("paper", "standardized", "overlap", "selective")
NA_SWEEP = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0)
PAPER_SCALES = (1.0, 2.0, 4.0)
RETAIN_MAX_DROP = 0.05


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def render(header: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(cells)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [fmt(r) for r in rows])


# ---------------------------------------------------------------------------------------------
# recipes with the model / data directories overridden
# ---------------------------------------------------------------------------------------------


def load(recipe_path: Path, model: Path | None, data_dir: Path | None, **changes):
    obj = yaml.safe_load(recipe_path.read_text())
    base = recipe_path.parent
    for key, value in changes.items():
        if value is None:
            obj.pop(key, None)
        else:
            obj[key] = value
    if model is not None:
        obj["model"] = str(model.resolve())
    if data_dir is not None:
        for spec in obj["data"].values():
            spec["path"] = str((data_dir / Path(spec["path"]).name).resolve())
    return parse_recipe(obj, base_dir=base)


class Bench:
    def __init__(self, model_dir: Path | None, data_dir: Path | None, batch_size: int):
        from editor.testbed import DATA_DIR

        self.model_dir, self.data_dir = model_dir, data_dir
        self.batch_size = batch_size
        with open((data_dir or DATA_DIR) / "eval.jsonl", encoding="utf-8") as f:
            self.eval = [json.loads(line) for line in f if line.strip()]
        self._base = None
        self.tok = None

    def recipe(self, name: str, **changes):
        return load(ROOT / "recipes" / name, self.model_dir, self.data_dir, **changes)

    def base_model(self, job):
        from editor.model.loading import load_model, load_tokenizer

        if self._base is None:
            self.tok = load_tokenizer(job.recipe)
            self._base = load_model(job.recipe, job.config)
        return copy.deepcopy(self._base)

    def score(self, model) -> dict:
        if hasattr(model, "reset_neuron_adjust_rng"):
            model.reset_neuron_adjust_rng()
        t = time.perf_counter()
        res = score(model, self.tok, self.eval, batch_size=self.batch_size)
        res.pop("records")
        res["seconds"] = round(time.perf_counter() - t, 1)
        return res

    def edited(self, job, plans, model=None):
        """``plans`` applied to ``model`` (a fresh copy of the base model unless given; one that
        carries the same NA already, as ``profile_job`` leaves it, keeps it), wrapped."""
        from editor.patch import apply_plans, wrap

        model = model if model is not None else self.base_model(job)
        edit = apply_plans(job.recipe, job.model_type, job.n_layers, model, self.tok, plans)
        return wrap(model, edit.config())


# ---------------------------------------------------------------------------------------------
# (1) KSD
# ---------------------------------------------------------------------------------------------

# (label, hypercube recipe, pooled linear detector recipe, skill, probed phrasing)
KSD_CASES = (("math", "generalize/math.yaml", "generalize/math-linear.yaml", "math", "math/0"),
             ("French facts", "generalize/french.yaml", "generalize/french-linear.yaml", "facts_fr", "facts_fr/0"))
LINEAR_BUDGETS = (0.01, 0.02)


def abstentions(res: dict, skill: str, probed: str) -> dict:
    ph = res["phrasings"]
    n_seen = ph[probed]["n"]
    unseen = [(p["n"], p["abstained"]) for k, p in ph.items() if p["skill"] == skill and k != probed]
    n_un = sum(n for n, _ in unseen)
    out = {"probed": ph[probed]["abstained"], "unseen": sum(n * a for n, a in unseen) / n_un, "n_probed": n_seen, "n_unseen": n_un}
    out["retained"] = {s: r["abstained"] for s, r in res["skills"].items() if s != skill}
    return out


def run_ksd(b: Bench, log) -> dict:
    from editor.pipeline import prepare, profile_job
    from editor.plan import plan_all

    out = {}
    for label, recipe, linear_recipe, skill, probed in KSD_CASES:
        r = b.recipe(recipe)
        ks = r.key_space
        rows = []
        stats = None
        # the paper's KSD (no calibration: one set of streaming statistics serves every α / check)
        for check, scales in (("every_call", PAPER_SCALES), ("prompt", PAPER_SCALES[:2])):
            for scale in scales:
                pj = prepare(b.recipe(recipe, key_space={"forget": ks.forget, "layer": -1, "scale": scale,
                                                         "refusal": ks.refusal, "check": check}))
                if stats is None:
                    stats = profile_job(pj, b.base_model(pj), b.tok, progress=False)
                plans = plan_all(pj.recipe, pj.n_layers, stats)
                res = b.score(b.edited(pj, plans))
                rows.append({"method": f"paper (last layer, all {plans.key_space[max(plans.key_space)].dims} dims, α={scale:g})",
                             "check": check, "plan": plans.key_space_info, **abstentions(res, skill, probed)})
                log(f"[ksd] {label}: {rows[-1]['method']}, check {check}: {res['seconds']}s")
        # calibrated: the default 1 % budget with each check rule, and a 2 % budget with check: prompt
        for check, budget in (("every_call", 0.01), ("prompt", 0.01), ("prompt", 0.02)):
            spec = ks.model_dump(exclude_none=True) | {"check": check, "false_positive_budget": budget}
            job = prepare(b.recipe(recipe, key_space=spec))
            t = time.perf_counter()
            st = profile_job(job, b.base_model(job), b.tok, progress=False)  # streaming stats + calibration
            plans = plan_all(job.recipe, job.n_layers, st)
            info = plans.key_space_info
            res = b.score(b.edited(job, plans))
            rows.append({"method": f"calibrated, budget {budget:.0%} ({_boxes(info)})", "check": check, "plan": info,
                         **abstentions(res, skill, probed)})
            log(f"[ksd] {label}: calibrated, check {check}, budget {budget}: profiled + calibrated + scored in "
                f"{time.perf_counter() - t:.1f}s; cv {info['cv']}")
        # the pooled linear detector (key_space.detector: linear, docs/GENERALIZATION.md §4.3): its recipe
        # (budget 1 %) and the same with a 2 % budget; check: prompt is the only rule it supports
        lks = b.recipe(linear_recipe).key_space
        for budget in LINEAR_BUDGETS:
            spec = lks.model_dump(exclude_none=True) | {"false_positive_budget": budget}
            job = prepare(b.recipe(linear_recipe, key_space=spec))
            t = time.perf_counter()
            st = profile_job(job, b.base_model(job), b.tok, progress=False)  # streaming stats + pooled keys + fit
            plans = plan_all(job.recipe, job.n_layers, st)
            info = plans.key_space_info
            res = b.score(b.edited(job, plans))
            rows.append({"method": f"linear, budget {budget:.0%} (max-pooled keys of L{min(info['layers'])}-"
                                   f"L{max(info['layers'])}, one logistic score)",
                         "check": lks.check, "plan": info, **abstentions(res, skill, probed)})
            log(f"[ksd] {label}: linear, budget {budget}: profiled + fitted + scored in "
                f"{time.perf_counter() - t:.1f}s; cv {info['cv']}")
        out[label] = {"skill": skill, "probed": probed, "rows": rows}
    return out


def _boxes(info: dict) -> str:
    return " OR ".join(f"L{layer}: {n} dims, α={info['scale'][layer]:g}" for layer, n in info["dims"].items())


def ksd_table(res: dict) -> str:
    parts = []
    for label, case in res.items():
        skills = sorted(case["rows"][0]["retained"])
        header = ["KSD", "check", f"probed {case['probed']}", "unseen phrasings"] + skills
        rows = [[r["method"], r["check"], pct(r["probed"]), pct(r["unseen"])] + [pct(r["retained"][s]) for s in skills]
                for r in case["rows"]]
        n = case["rows"][0]
        parts.append(f"Forget {label}: abstention on eval.jsonl (probed phrasing n={n['n_probed']}, unseen n={n['n_unseen']}), "
                     "greedy generation through the checkpoint runtime; check `every_call`: the prompt's last token and "
                     "each generated token decide, `prompt`: the prompt's forward call only (its last token's key for "
                     "the boxes, every real token's key, max-pooled, for `linear`)\n\n" + render(header, rows))
        cvs = []
        for r in case["rows"]:
            if r["plan"].get("method") == "calibrated":
                cv = r["plan"]["cv"]
                cvs.append(f"- check {r['check']}, budget {pct(cv['budget'])}: held-out forget coverage "
                           f"{pct(cv['forget_coverage'])}, held-out retain FPR {pct(cv['retain_fpr'])}, "
                           f"{cv['feasible']} of {cv['candidates']} settings feasible")
            elif r["plan"].get("method") == "linear":
                cv = r["plan"]["cv"]
                by_set = ", ".join(f"{k} {pct(v)}" for k, v in cv["retain_fpr_by_set"].items())
                cvs.append(f"- linear, check {r['check']}, budget {pct(cv['budget'])}: out-of-fold forget coverage "
                           f"{pct(cv['forget_coverage'])}, out-of-fold retain FPR {pct(cv['retain_fpr'])} ({by_set})")
        parts.append(f"Calibration (probe data only, {cv['folds']}-fold CV / cross-fitting, seed {cv['seed']}):\n\n"
                     + "\n".join(cvs))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------
# (2) NA
# ---------------------------------------------------------------------------------------------


def ems(res: dict) -> dict:
    return {s: r["exact_match"] for s, r in res["skills"].items()}


def drops(before: dict, after: dict, forget: str = "math") -> dict:
    d = {s: (1 - after[s] / before[s]) if before[s] > 0 else 0.0 for s in before}
    retained = {s: v for s, v in d.items() if s != forget}
    return {"forget": d[forget], "retain_max": max(retained.values()), "retain_mean": sum(retained.values()) / len(retained), "per_skill": d}


def run_na(b: Bench, log, scores=NA_SCORES, sweep=NA_SWEEP) -> dict:
    from editor.methods.neuron_adjust import plan_neuron_adjust
    from editor.pipeline import prepare, profile_job
    from editor.plan import Plans, forget_retain, plan_all

    demo = b.recipe("demo.yaml")
    job = prepare(demo)
    model = b.base_model(job)
    na = demo.neuron_adjust
    base = b.score(model)
    before = ems(base)
    log(f"[na] base model: {before} ({base['seconds']}s)")
    ks_only = prepare(b.recipe("demo.yaml", neuron_adjust=None))
    stats = profile_job(ks_only, copy.deepcopy(model), b.tok, progress=False)
    f, r = forget_retain(stats, job.n_layers, na.forget, na.retain_sets)

    def na_run(score_name: str, p: float) -> dict:
        plan = plan_neuron_adjust(f, r, top_percent=p, mode=na.mode, seed=na.seed, score=score_name)
        res = b.score(b.edited(job, Plans(neuron_adjust=plan)))
        return {"score": score_name, "top_percent": p, "em": ems(res), **drops(before, ems(res)), "seconds": res["seconds"]}

    sweep_rows = []
    for s in scores:
        for p in sweep:
            sweep_rows.append(na_run(s, p))
            x = sweep_rows[-1]
            log(f"[na] {s:>12} {p:>5}%: math drop {pct(x['forget'])}, worst retain drop {pct(x['retain_max'])} ({x['seconds']}s)")

    # the ablation of the demo setting
    def abstained(res):
        return {s: v["abstained"] for s, v in res["skills"].items()}

    abl = [{"setting": "base model", "em": before, "abstained": abstained(base)}]
    for p in (0.5, 1.5, 3.0):
        x = next((x for x in sweep_rows if x["score"] == "paper" and x["top_percent"] == p), None) or na_run("paper", p)
        abl.append({"setting": f"NA alone, paper score, {p:g} %", "em": x["em"], "abstained": None})
    a = demo.key_space.scale
    checks = [demo.key_space.check] + [c for c in ("every_call", "prompt") if c != demo.key_space.check]
    for check in checks:
        ksd = demo.key_space.model_dump(exclude_none=True) | {"check": check}
        tag = "demo.yaml" if check == demo.key_space.check else "demo.yaml but"
        ks_job = prepare(b.recipe("demo.yaml", neuron_adjust=None, key_space=ksd))
        res = b.score(b.edited(ks_job, plan_all(ks_job.recipe, ks_job.n_layers, stats)))
        abl.append({"setting": f"KSD alone ({tag} check {check}: paper KSD, last layer, α={a:g}, all math phrasings probed)",
                    "em": ems(res), "abstained": abstained(res)})
        both_job = prepare(b.recipe("demo.yaml", key_space=ksd))
        both = copy.deepcopy(model)
        st = profile_job(both_job, both, b.tok, progress=False)  # leaves NA on (KSD keys under NA)
        res = b.score(b.edited(both_job, plan_all(both_job.recipe, both_job.n_layers, st), model=both))
        abl.append({"setting": f"both ({tag} check {check}: NA {na.top_percent:g} % {na.score} + paper KSD α={a:g})",
                    "em": ems(res), "abstained": abstained(res)})
    # the same with a calibrated KSD (recipes/generalize/demo-calibrated.yaml)
    from editor.errors import EditorError

    cal = b.recipe("generalize/demo-calibrated.yaml")
    cal_na = f"NA {cal.neuron_adjust.top_percent:g} % {cal.neuron_adjust.score}" if cal.neuron_adjust else "no NA"
    for label, with_na in ((f"KSD alone, calibrated, check {cal.key_space.check}", False),
                           (f"both: {cal_na} + KSD calibrated, check {cal.key_space.check}", True)):
        job_c = prepare(b.recipe("generalize/demo-calibrated.yaml", **({} if with_na else {"neuron_adjust": None})))
        m = copy.deepcopy(model)
        try:
            plans = plan_all(job_c.recipe, job_c.n_layers, profile_job(job_c, m, b.tok, progress=False))
        except EditorError as e:  # no setting within the budget: say so in the table
            log(f"[na] {label}: {e}")
            abl.append({"setting": f"{label}: no feasible setting within the budget", "em": None, "abstained": None})
            continue
        res = b.score(b.edited(job_c, plans, model=m))
        abl.append({"setting": f"{label} ({_boxes(plans.key_space_info)})", "em": ems(res), "abstained": abstained(res)})
    for a in abl[4:]:
        log(f"[na] {a['setting']}: {a['em']}")
    return {"before": before, "sweep": sweep_rows, "ablation": abl}


def na_tables(res: dict) -> str:
    before = res["before"]
    skills = sorted(before)
    parts = []
    rows = []
    if not res["sweep"]:
        return _ablation_table(res, skills)
    for x in res["sweep"]:
        rows.append([x["score"], f"{x['top_percent']:g} %"] + [pct(x["em"][s]) for s in skills]
                    + [pct(x["forget"]), pct(x["retain_max"])])
    parts.append("NA sweep (demo setting, mode sample, seed 0; exact match on eval.jsonl; base: "
                 + ", ".join(f"{s} {pct(before[s])}" for s in skills) + ")\n\n"
                 + render(["score", "top %"] + skills + ["math drop", "worst retain drop"], rows))
    rows = []
    for s in dict.fromkeys(x["score"] for x in res["sweep"]):
        ok = [x for x in res["sweep"] if x["score"] == s and x["retain_max"] <= RETAIN_MAX_DROP]
        best = max(ok, key=lambda x: (x["forget"], -x["top_percent"]), default=None)
        moved = [x for x in res["sweep"] if x["score"] == s and x["forget"] >= 0.5]
        first = min(moved, key=lambda x: x["top_percent"], default=None)
        rows.append([s, pct(best["forget"]) if best else "—", f"{best['top_percent']:g} %" if best else "—",
                     pct(best["retain_max"]) if best else "—",
                     (f"{first['top_percent']:g} % (worst retain drop {pct(first['retain_max'])})" if first else "not in sweep")])
    parts.append(f"NA Pareto: best math drop with every retained skill's relative drop ≤ {pct(RETAIN_MAX_DROP)}\n\n"
                 + render(["score", "best math drop", "at top %", "worst retain drop", "math drop ≥ 50 % first at"], rows))
    parts.append(_ablation_table(res, skills))
    return "\n\n".join(parts)


def _ablation_table(res: dict, skills: list[str]) -> str:
    rows = []
    for a in res["ablation"]:
        ab = a["abstained"]
        rows.append([a["setting"]] + [pct(a["em"][s]) if a["em"] else "—" for s in skills]
                    + [pct(ab["math"]) if ab else "—", pct(max(v for k, v in ab.items() if k != "math")) if ab else "—"])
    return ("Demo setting ablation (exact match per skill; abstention)\n\n"
            + render(["setting"] + skills + ["math abstained", "max other abstained"], rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["ksd", "na", "all"], default="all")
    ap.add_argument("--model", type=Path, default=None, help="testbed model dir (default: editor/testbed/model)")
    ap.add_argument("--data", type=Path, default=None, help="dir with probe.jsonl / eval.jsonl (default: editor/testbed/data)")
    ap.add_argument("--scores", default=",".join(NA_SCORES))
    ap.add_argument("--sweep", default=",".join(f"{p:g}" for p in NA_SWEEP))
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from editor.cli import _quiet_libraries

    _quiet_libraries()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    b = Bench(args.model, args.data, args.batch_size)
    out = {}
    if args.part in ("ksd", "all"):
        out["ksd"] = run_ksd(b, log)
        print(ksd_table(out["ksd"]), end="\n\n", flush=True)
    if args.part in ("na", "all"):
        out["na"] = run_na(b, log, scores=[x for x in args.scores.split(",") if x],
                           sweep=[float(p) for p in args.sweep.split(",") if p])
        print(na_tables(out["na"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
