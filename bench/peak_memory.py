#!/usr/bin/env python
"""Peak host memory of ``profile`` and ``export`` as a function of model size (docs/SCALE.md).

    python bench/peak_memory.py                 # tiny → 374M-parameter random Llamas, float32
    python bench/peak_memory.py --max-params 3e7 --json out.json

Each stage runs in a fresh subprocess (``ru_maxrss`` is a process-lifetime peak): a random Llama of
the given shape is saved once (float32 safetensors), then ``profile_recipe`` and
``editor.pipeline.export_recipe`` (NA expected 3 % + KSD) run on it over 64 short texts. Reported per
stage: the peak RSS, the RSS after imports (the floor: torch + transformers), and the peak above
that floor divided by the weights' size on disk. CPU only: device: cpu.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (hidden, layers, intermediate, heads, vocab)
SHAPES = {
    "tests-tiny": (32, 3, 48, 4, 96),
    "testbed-size": (128, 4, 512, 4, 96),
    "llama-58M": (512, 8, 1376, 8, 32000),
    "llama-134M": (768, 12, 2048, 12, 32000),
    "llama-374M": (1024, 24, 2816, 16, 32000),
}


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _stage(stage: str, work: str) -> None:
    """Child process: run one stage, print a JSON line with its memory figures."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from editor.pipeline import export_recipe, profile_recipe  # noqa: F401 - imports count in the floor

    floor = _rss_kb()
    t0 = time.perf_counter()
    w = Path(work)
    if stage == "profile":
        profile_recipe(w / "recipe.yaml", w / "stats", overwrite=True, progress=False)
    else:
        export_recipe(w / "recipe.yaml", w / "stats", w / "ckpt", overwrite=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"floor_kb": floor, "peak_kb": peak, "seconds": round(time.perf_counter() - t0, 2)}))


def _build(name: str, work: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import char_tokenizer

    h, n, ff, heads, vocab = SHAPES[name]
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=n, intermediate_size=ff, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "model")
    char_tokenizer().save_pretrained(work / "model")
    del model
    words = "the quick brown fox jumps over a lazy dog 12 + 30 = 42 def f(x): return x".split()
    for k, (setname, off) in enumerate((("forget", 0), ("retain", 5), ("keys", 9))):
        with open(work / f"{setname}.jsonl", "w") as f:
            for i in range(64):
                f.write(json.dumps({"text": " ".join(words[(off + i + j) % len(words)] for j in range(6 + i % 9))}) + "\n")
    (work / "recipe.yaml").write_text(
        "model: model\ndtype: float32\ndevice: cpu\ndata:\n"
        "  forget: {path: forget.jsonl}\n  retain: {path: retain.jsonl}\n  keys: {path: keys.jsonl}\n"
        "profile: {batch_size: 16, max_length: 64}\n"
        "neuron_adjust: {forget: forget, retain: retain, top_percent: 3.0, mode: expected, seed: 0}\n"
        "key_space: {forget: keys, layer: -1, scale: 2.0}\n"
        "export: {formats: [hf], out: ckpt}\n")
    weights = sum(p.stat().st_size for p in (work / "model").glob("*.safetensors"))
    return {"params": params, "weights_bytes": weights}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-params", type=float, default=5e8)
    ap.add_argument("--json", default=None)
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        _stage(args.stage, args.work)
        return
    rows = []
    for name in SHAPES:
        with tempfile.TemporaryDirectory(prefix="skill-editor-mem-") as d:
            work = Path(d)
            info = _build(name, work)
            if info["params"] > args.max_params:
                break
            row = {"model": name, **info}
            for stage in ("profile", "export"):
                res = subprocess.run([sys.executable, __file__, "--stage", stage, "--work", str(work)],
                                     capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
                if res.returncode:
                    sys.exit(res.stderr[-3000:])
                got = json.loads(res.stdout.strip().splitlines()[-1])
                extra = (got["peak_kb"] - got["floor_kb"]) * 1024
                row[stage] = {"peak_mb": round(got["peak_kb"] / 1024, 1), "floor_mb": round(got["floor_kb"] / 1024, 1),
                              "above_floor_mb": round(extra / 2**20, 1),
                              "above_floor_per_weight_byte": round(extra / info["weights_bytes"], 2),
                              "seconds": got["seconds"]}
            rows.append(row)
            print(f"{name:>13} {info['params'] / 1e6:8.2f}M params {info['weights_bytes'] / 2**20:8.1f} MiB weights | "
                  + " | ".join(f"{s}: peak {row[s]['peak_mb']:7.1f} MiB (floor {row[s]['floor_mb']:6.1f}, "
                               f"+{row[s]['above_floor_mb']:7.1f} = {row[s]['above_floor_per_weight_byte']:.2f}x weights, "
                               f"{row[s]['seconds']}s)" for s in ("profile", "export")), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
