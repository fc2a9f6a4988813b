"""Thread counts on a (possibly busy) machine: the testbed's greedy scorecard (the longest phase of
the demo) and a forward of a 60 M-parameter random Llama, at each thread count given, alternating,
median of the repetitions; the 1-minute load average is printed with each run.

    python bench/threads.py [--threads 1,2,auto] [--reps 3] [--records 240]

``auto`` is what the long commands use by default (``editor.threads.default_threads``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editor.eval.scorecard import score  # noqa: E402
from editor.threads import default_threads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2,auto")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--records", type=int, default=240)
    args = ap.parse_args()
    counts = [default_threads() if t == "auto" else int(t) for t in args.threads.split(",")]
    labels = args.threads.split(",")

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = ROOT / "editor" / "testbed" / "model"
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    testbed = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    lines = (ROOT / "editor" / "testbed" / "data" / "eval.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(x) for x in lines[: args.records]]
    cfg = AutoConfig.for_model("llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                               num_attention_heads=8, num_key_value_heads=8, vocab_size=32000)
    torch.manual_seed(0)
    big = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 32000, (8, 128))

    def scorecard():
        score(testbed, tok, records, batch_size=32)

    def forward():
        with torch.no_grad():
            big(input_ids=ids)

    print(f"cores {os.cpu_count()}, auto = {default_threads()} thread(s), torch {torch.__version__}")
    for name, fn in (("testbed scorecard", scorecard), ("60M Llama forward 8x128", forward)):
        times: dict[str, list[float]] = {lab: [] for lab in labels}
        for rep in range(args.reps):
            for lab, n in zip(labels, counts):
                torch.set_num_threads(n)
                t = time.perf_counter()
                fn()
                times[lab].append(time.perf_counter() - t)
                print(f"  {name}: rep {rep} threads {lab} ({n}): {times[lab][-1]:.2f} s, load {os.getloadavg()[0]:.2f}",
                      flush=True)
        print(f"{name}: median " + ", ".join(f"{lab}: {statistics.median(v):.2f} s" for lab, v in times.items()))


if __name__ == "__main__":
    main()
