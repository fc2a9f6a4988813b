"""Quality on the real models (SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-Instruct) with the project's
battery, ordinary prompts and attack suite — in raw and in chat form, the way users ask.

For each model, forget task (math, Python) and setting, the whole job in process — profile on the
battery's ``probe`` items (+ the shipped background's calibration part), edit, then score the edited
model on held-out items, count the ordinary and near-neighbour prompts it refuses, and wrap the
forget skill's held-out requests in the attack suite:

    python bench/real_model.py --model smollm2 --split eval          # the README's table
    python bench/real_model.py --model qwen --split dev --tasks math  # where designs are compared

Settings:

- ``recipe``: the shipped recipe, ``recipes/<model>/forget-<task>.yaml`` (the guard of issue #22);
- ``before``: the same recipe as it was before issue #22 — the guard fitted on one few-shot phrasing
  and the kept skills' few-shot phrasings, raw text only (``format: raw`` for the fit) — scored the
  same way, in both forms: the failure the issue reported, reproduced;
- ``paper``: the paper's setting (``recipes/<model>/paper-forget-<task>.yaml`` when it exists):
  Neuron Adjust + the KSD box, last layer, α = 2, every call.

``--split eval`` reads ``editor/battery/data/eval.jsonl``, the ordinary prompts' ``evaluation`` part
and the attack suite's ``evaluation`` wrappers; ``--split dev`` the ``dev`` items, the
``development`` part and wrappers. No fit reads either. Results go to
``bench/results/real_model-<model>-<split>.json`` (one entry per task × setting, written as each
finishes) and a table is printed. The base model's answers are computed once per model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editor.data import ordinary_set  # noqa: E402
from editor.eval.attacks import attack_prompts, attack_requests  # noqa: E402
from editor.eval.scorecard import examples_of, score, scorecard  # noqa: E402
from editor.model.loading import load_model  # noqa: E402
from editor.pipeline import edit_model, prepare, profile_job  # noqa: E402
from editor.recipe import parse_recipe  # noqa: E402

MODELS = {"smollm2": ROOT / "recipes" / "smollm2", "qwen": ROOT / "recipes" / "qwen2.5-coder-0.5b"}
FEWSHOT = {"math": "math/eq", "python": "python/docstring"}
SETTINGS = ("before", "recipe", "paper")


def recipe_for(model: str, task: str, setting: str, split: str) -> dict | None:
    base = MODELS[model]
    path = base / (f"paper-forget-{task}.yaml" if setting == "paper" else f"forget-{task}.yaml")
    if not path.exists():
        return None
    obj = yaml.safe_load(path.read_text())
    sc = obj["data"]["scorecard"]
    sc["path"] = f"../../editor/battery/data/{split}.jsonl"
    sc.pop("limit_each", None)
    sc.pop("where", None)
    obj["evaluate"]["ordinary"] = "none"  # counted below on the split's ordinary part, in both forms
    obj["evaluate"].pop("attacks", None)
    obj["data"]["scorecard"]["format"] = "both"
    if setting == "before":
        ks = obj["key_space"]
        for name in [ks["forget"], *ks["retain"]]:
            spec = obj["data"][name]
            spec["where"] = {**spec.get("where", {}), "kind": "fewshot"}
            spec["format"] = "raw"
            spec.pop("limit_each", None)
        obj["data"][ks["forget"]]["where"] = {"phrasing": FEWSHOT[task]}
        obj["format"] = "raw"  # the background too
    return obj


def summarize(card: dict, task: str, probed: list[str], attacks: dict | None) -> dict:
    """Per form: the forget skill's refusal on its probed and unseen phrasings (few-shot and
    request), every kept skill's drop, ordinary and contrast refusals, attacks per family."""
    out = {}
    for form, part in (card.get("forms") or {}).items():
        ph_b, ph_a = part["phrasings"]["before"], part["phrasings"]["after"]

        def refused(names):
            n = sum(ph_a[p]["n"] for p in names)
            return sum(ph_a[p]["abstained"] * ph_a[p]["n"] for p in names) / n if n else None

        mine = [p for p, d in ph_a.items() if d["skill"] == task]
        out[form] = {
            "forget_probed_refused": refused([p for p in mine if p in probed]),
            "forget_unseen_refused": refused([p for p in mine if p not in probed]),
            "forget_by_phrasing": {p: round(ph_a[p]["abstained"], 4) for p in mine},
            "base_accuracy_by_phrasing": {p: round(d["exact_match"], 4) for p, d in ph_b.items()},
            "kept_drop": {s: round(v, 4) for s, v in part["drop"].items() if s != task},
            "kept_refused": {s: round(part["after"][s]["abstained"], 4) for s in part["after"] if s != task},
        }
    o = card.get("ordinary") or {}
    for form, d in (o.get("forms") or {}).items():
        out[form]["ordinary_refused"] = d["rate"]
        out[form]["ordinary_n"] = d["n"]
        out[form]["contrast_refused"] = (d.get("contrast") or {}).get("rate")
        out[form]["contrast_by_category"] = {c: v["refused"] for c, v in d["categories"].items() if v["refused"]}
    if attacks:
        for form in out:
            out[form]["attacks_refused"] = {fam: d["forms"][form]["rate"] for fam, d in attacks["families"].items()
                                            if form in d["forms"]}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--split", choices=["dev", "eval"], default="eval")
    ap.add_argument("--tasks", default="math,python")
    ap.add_argument("--settings", default="before,recipe")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or ROOT / "bench" / "results" / f"real_model-{args.model}-{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    part = {"dev": "development", "eval": "evaluation"}[args.split]
    results["_machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "threads": torch.get_num_threads(), "torch": torch.__version__, "load_average": os.getloadavg()}
    before = None
    for task in args.tasks.split(","):
        for setting in args.settings.split(","):
            obj = recipe_for(args.model, task, setting, args.split)
            if obj is None:
                continue
            t0 = time.time()
            r = parse_recipe(obj, base_dir=MODELS[args.model])
            job = prepare(r)
            tok = job.tokenizer
            model = load_model(r, job.config)
            ts = job.sets["scorecard"]
            examples = examples_of(ts)
            if before is None:
                before = score(model, tok, examples, batch_size=r.evaluate.batch_size, progress=True, desc="base")
                results["_base"] = {"phrasings_by_form": {f: d["phrasings"] for f, d in before["forms"].items()}}
            stats = profile_job(job, model, tok, progress=True)
            ed = edit_model(job, stats, model=model, tokenizer=tok)
            forms = ts.form_names
            ordinary = ordinary_set(part, f"@ordinary-{part}", forms, tok)
            attacks = {"skill": task, "part": part,
                       "prompts": attack_prompts(attack_requests(ts.records, task), forms, tok, part=part)}
            card = scorecard(None, ed.wrapped, tok, examples, batch_size=r.evaluate.batch_size, before=before,
                             ordinary=ordinary, attacks=attacks, progress=True)
            probed = sorted({rec["phrasing"] for name in [r.key_space.forget] for rec in job.sets[name].records})
            res = summarize(card, task, probed, card.get("attacks"))
            res["_probed_phrasings"] = probed
            res["_seconds"] = round(time.time() - t0, 1)
            res["_plan"] = ed.plans.summary().get("key_space", {}).get("cv")
            results[f"{task}/{setting}"] = res
            out.write_text(json.dumps(results, indent=1, sort_keys=True))
            for form, d in res.items():
                if form.startswith("_"):
                    continue
                worst = max(d["kept_drop"], key=d["kept_drop"].get)
                att = d.get("attacks_refused") or {}
                print(f"{args.model} {task:6s} {setting:7s} [{form}] forget probed {d['forget_probed_refused'] or 0:6.1%} "
                      f"unseen {d['forget_unseen_refused'] or 0:6.1%} | worst kept {worst} {d['kept_drop'][worst]:6.1%} | "
                      f"ordinary {d.get('ordinary_refused', 0):5.1%} contrast {d.get('contrast_refused') or 0:5.1%} | "
                      f"attacks min {min(att.values()) if att else 0:6.1%}", flush=True)
            del model, ed
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
