"""Throughput of a skill-editor checkpoint vs its base model in vLLM (issue #17, docs/SERVING.md).

    .venv/bin/python bench/bench_vllm.py [--checkpoint DIR] [--prompts 64] [--max-tokens 64] [--reps 3]

Builds (unless --checkpoint) the demo edit of the embedded testbed — NA ``expected`` 1.5 % + the
box guard, ``check: prompt`` — then runs, in the vLLM environment (.venv-vllm), one engine per
model, alternating base / patched for ``--reps`` rounds of ``--calls`` timed calls: the same kept (non-math) prompts, greedy,
``ignore_eos`` so both generate exactly the same number of tokens. Both engines run eagerly
(``enforce_eager``: the plugin runs the edited model without torch.compile / CUDA graphs, so the
base model is measured the same way). Reports generated tokens/s per model (median over the
calls) and the ratio patched / base, with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VPY = ROOT / ".venv-vllm" / "bin" / "python"
DRIVER = ROOT / "tests" / "vllm_driver.py"
TESTBED = ROOT / "editor" / "testbed"


def build_demo(out: Path) -> Path:
    from editor.pipeline import run_recipe

    probe = str(TESTBED / "data" / "probe.jsonl")
    recipe = {
        "model": str(TESTBED / "model"), "dtype": "float32", "device": "cpu",
        "data": {
            "math_answers": {"path": probe, "where": {"skill": "math"}, "text": "{prompt}{answer}"},
            "math_queries": {"path": probe, "where": {"skill": "math"}, "text": "{prompt}"},
            "other_answers": {"path": probe, "where": {"skill": ["python", "facts_en", "facts_fr", "facts_de"]},
                              "text": "{prompt}{answer}"},
        },
        "profile": {"batch_size": 32, "max_length": 128},
        "neuron_adjust": {"forget": "math_answers", "retain": "other_answers", "top_percent": 1.5, "mode": "expected", "seed": 0},
        "key_space": {"forget": "math_queries", "layer": -1, "scale": 1.0, "check": "prompt", "refusal": "Sorry, I can't help with that."},
        "export": {"formats": ["hf"], "out": str(out)},
    }
    path = out.parent / "bench-vllm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(path, out, overwrite=True, progress=False, echo=lambda *a, **k: None)
    return out


def run_engine(model: Path, prompts: list[str], max_tokens: int, calls: int, tmp: Path, max_model_len: int = 256,
               memory: float = 0.1) -> dict:
    """One engine: a warm-up call, then ``calls`` timed generate calls; their median tokens/s."""
    params = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    job = {"model": str(model), "engine": {"max_model_len": max_model_len, "dtype": "float32", "gpu_memory_utilization": memory,
                                           "enforce_eager": True},
           "calls": [{"name": "warmup", "prompts": prompts[:8], "params": params}]
           + [{"name": f"timed{i}", "prompts": prompts, "params": params} for i in range(calls)]}
    (tmp / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([str(VPY), str(DRIVER), str(tmp / "job.json"), str(tmp / "out.json")],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: vLLM run failed on {model}:\n{proc.stderr[-3000:]}")
    out = json.loads((tmp / "out.json").read_text())
    rates = []
    for i in range(calls):
        timed = out["calls"][f"timed{i}"]
        tokens = sum(len(o["token_ids"]) for o in timed["outputs"])
        rates.append(tokens / timed["wall_s"])
    return {"tokens": tokens, "tok_s": statistics.median(rates), "all": rates, "load_s": out["load_s"]}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, {platform.system()} {platform.release()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="an exported checkpoint (default: build the demo edit)")
    ap.add_argument("--base", type=Path, default=TESTBED / "model", help="its base model directory")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--calls", type=int, default=3, help="timed generate calls per engine")
    ap.add_argument("--reps", type=int, default=2, help="engine rounds per model, alternating")
    ap.add_argument("--battery", default=None, metavar="SKILL",
                    help="prompts from the real-model battery's eval items of every skill but SKILL (the checkpoint's "
                         "forgotten one), for a real model's checkpoint; default: the testbed's kept prompts")
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--memory-utilization", type=float, default=0.1,
                    help="vLLM's gpu_memory_utilization: on CPU the share of the host's memory for weights + KV cache "
                         "(0.1 is too little for a 2.4 GB model on a 24 GB host)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if not VPY.exists():
        sys.exit("error: .venv-vllm is absent: bash scripts/setup_vllm.sh")
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        ckpt = args.checkpoint or build_demo(tmp / "demo-forget-math")
        if args.battery:
            kept = [json.loads(l)["prompt"] for l in (ROOT / "editor" / "battery" / "data" / "eval.jsonl").read_text().splitlines()
                    if json.loads(l)["skill"] != args.battery]
        else:
            kept = [json.loads(l)["prompt"] for l in (TESTBED / "data" / "eval.jsonl").read_text().splitlines()
                    if json.loads(l)["skill"] != "math"]
        prompts = (kept * (args.prompts // len(kept) + 1))[: args.prompts]
        runs: dict[str, list[dict]] = {"base": [], "patched": []}
        for rep in range(args.reps):
            for name, model in (("base", args.base), ("patched", ckpt)):
                load0 = os.getloadavg()[0]
                r = run_engine(model, prompts, args.max_tokens, args.calls, tmp, args.max_model_len, args.memory_utilization)
                r["load_avg_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
                runs[name].append(r)
                print(f"round {rep + 1} {name:8s} {r['tokens']} tokens per call: "
                      f"{', '.join(f'{x:.0f}' for x in r['all'])} tok/s (load {r['load_s']:.0f} s)", flush=True)
    base = statistics.median(x for r in runs["base"] for x in r["all"])
    patched = statistics.median(x for r in runs["patched"] for x in r["all"])
    print(f"machine: {machine()}")
    print(f"{args.prompts} prompts x {args.max_tokens} tokens, greedy, eager, median of {args.reps * args.calls} calls: "
          f"base {base:.1f} tok/s, patched {patched:.1f} tok/s, ratio patched/base {patched / base:.3f}")
    if args.json:
        args.json.write_text(json.dumps({
            "checkpoint": str(args.checkpoint or "demo"), "base": str(args.base), "prompts": args.prompts,
            "max_tokens": args.max_tokens, "calls": args.calls, "reps": args.reps, "machine": machine(),
            "tok_s": {"base": round(base, 2), "patched": round(patched, 2)}, "ratio": round(patched / base, 4),
            "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
