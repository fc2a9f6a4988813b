"""Quality on the real model: SmolLM2-135M-Instruct, the project's battery and ordinary prompts.

For each forget task (math, Python) and each guard setting, the whole job in process — profile on
the battery's ``probe`` items (+ the shipped background's calibration part), edit, then score the
edited model on held-out items and count the ordinary prompts it refuses:

    python bench/real_model.py                       # the README's table: --split eval
    python bench/real_model.py --split dev           # where designs are compared (never eval)
    python bench/real_model.py --tasks math --settings linear,linear-nobg

Settings (the recipes in recipes/smollm2/ are ``paper`` and ``linear``):

- ``paper``: the paper's setting — Neuron Adjust 3 % (sample) + the KSD box, last layer, α = 2,
  checked at every call;
- ``box``: the paper's KSD box alone, α = 2, decided on the prompt;
- ``calibrated``: the calibrated box (layer(s), dims, α by cross-validation), 1 % budget, with the
  default background negatives;
- ``linear-nobg``: the pooled linear detector calibrated on the retain sets alone
  (``background: none``) — the setting the issue found refusing most ordinary text;
- ``linear``: the pooled linear detector with the default background negatives (the recipes).

``--split eval`` reads ``editor/battery/data/eval.jsonl`` and the ordinary prompts' ``evaluation``
part; ``--split dev`` the ``dev`` items and the ``development`` part. Neither is read by any fit.
Results go to ``bench/results/real_model-<split>.json`` (one entry per task × setting, written as
each finishes) and a table is printed. The base model's scores are computed once per task.
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
from editor.eval.scorecard import score, scorecard  # noqa: E402
from editor.model.loading import load_model, load_tokenizer  # noqa: E402
from editor.pipeline import edit_model, prepare, profile_job  # noqa: E402
from editor.recipe import parse_recipe  # noqa: E402

RECIPES = ROOT / "recipes" / "smollm2"
TASKS = {"math": "math/eq", "python": "python/docstring"}
SETTINGS = ("paper", "box", "calibrated", "linear-nobg", "linear")


def recipe_for(task: str, setting: str, split: str) -> dict:
    base = "paper-" if setting == "paper" else ""
    obj = yaml.safe_load((RECIPES / f"{base}forget-{task}.yaml").read_text())
    obj["data"]["scorecard"]["path"] = f"../../editor/battery/data/{split}.jsonl"
    obj["evaluate"]["ordinary"] = "none"  # counted below on the split's ordinary part
    ks = obj["key_space"]
    if setting == "box":
        obj["key_space"] = {"forget": ks["forget"], "layer": -1, "scale": 2.0, "check": "prompt"}
    elif setting == "calibrated":
        obj["key_space"] = {"forget": ks["forget"], "retain": ks["retain"], "false_positive_budget": 0.01, "check": "prompt"}
    elif setting == "linear-nobg":
        obj["key_space"] = dict(ks, background="none")
    return obj


def summarize(card: dict, task: str) -> dict:
    """Forget drop on the probed phrasing and on the unseen ones, the worst kept skill, refusals."""
    ph_b, ph_a = card["phrasings"]["before"], card["phrasings"]["after"]

    def drop(names):
        b = sum(ph_b[n]["exact_match"] * ph_b[n]["n"] for n in names)
        a = sum(ph_a[n]["exact_match"] * ph_a[n]["n"] for n in names)
        return 1 - a / b if b else 0.0

    probed = TASKS[task]
    unseen = [n for n, p in ph_b.items() if p["skill"] == task and n != probed]
    kept = {s: d for s, d in card["drop"].items() if s != task}
    worst = max(kept, key=kept.get)
    o = card.get("ordinary") or {}
    return {"forget_probed": drop([probed]), "forget_unseen": drop(unseen), "unseen_phrasings": unseen,
            "abstained_probed": ph_a[probed]["abstained"],
            "abstained_unseen": sum(ph_a[n]["abstained"] * ph_a[n]["n"] for n in unseen) / sum(ph_a[n]["n"] for n in unseen),
            "worst_kept": worst, "worst_kept_drop": kept[worst], "kept_drop": kept,
            "kept_abstained_max": max(card["after"][s]["abstained"] for s in kept),
            "ordinary_refused": o.get("rate"), "ordinary_n": o.get("n"),
            "code_other_refused": (o.get("categories") or {}).get("code_other", {}).get("rate"),
            "ordinary_by_category": {c: d["refused"] for c, d in (o.get("categories") or {}).items() if d["refused"]}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", choices=["dev", "eval"], default="eval")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or ROOT / "bench" / "results" / f"real_model-{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    part = {"dev": "development", "eval": "evaluation"}[args.split]
    ordinary = ordinary_set(part, f"@ordinary-{part}")
    results["_machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "threads": torch.get_num_threads(), "torch": torch.__version__}
    before_cache: dict[str, dict] = {}
    for task in args.tasks.split(","):
        for setting in args.settings.split(","):
            t0 = time.time()
            r = parse_recipe(recipe_for(task, setting, args.split), base_dir=RECIPES)
            job = prepare(r)
            tok = load_tokenizer(r)
            model = load_model(r, job.config)
            records = job.sets["scorecard"].records
            if task not in before_cache:
                before_cache[task] = score(model, tok, records, batch_size=r.evaluate.batch_size)
            stats = profile_job(job, model, tok, progress=False)
            ed = edit_model(job, stats, model=model, tokenizer=tok)
            card = scorecard(None, ed.wrapped, tok, records, batch_size=r.evaluate.batch_size,
                             before=before_cache[task], ordinary=ordinary)
            res = summarize(card, task)
            res["seconds"] = round(time.time() - t0, 1)
            res["plan"] = ed.plans.summary().get("key_space", {}).get("cv")
            results[f"{task}/{setting}"] = res
            out.write_text(json.dumps(results, indent=1, sort_keys=True))
            print(f"{task:7s} {setting:12s} forget {res['forget_probed']:6.1%} / unseen {res['forget_unseen']:6.1%}  "
                  f"worst kept {res['worst_kept']} {res['worst_kept_drop']:6.1%}  ordinary refused "
                  f"{res['ordinary_refused']:5.1%} (code_other {res['code_other_refused'] or 0:5.1%})  {res['seconds']:.0f}s",
                  flush=True)
            del model, ed
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
