"""How the linear detector's fit scales (issue #23 item 4): time and peak memory of
``editor.methods.calibrate.calibrate_linear`` against the number of probe queries n and the number of
features (layers × d_ff), on a real model's pooled keys, side by side with the fit it replaced
(feature screening to ``max_features`` = 65 536, then L-BFGS over the fold's feature matrix; loaded
from the project's history, commit ``OLD_COMMIT``).

    python bench/calibration_scale.py --model smollm2 --sizes 500,1000,2000
    python bench/calibration_scale.py --model qwen --sizes 1000,2000,3000 --fits kernel,nonnegative

The keys: every layer's key max-pooled over the prompt, for the shipped ordinary prompts and the
battery's probe items in raw and chat form (``bench/guard_dev.py``'s cache); the first rows of the
battery's math items are the "forget" side, the rest the negatives — the fit's cost does not depend on
what the rows mean. Each fit runs in a fresh process (its peak RSS during the fit, VmHWM reset after the keys
are loaded, minus its RSS then). Complexity of the kernel fit: O(n² · features) for the Gram matrix,
O(folds · n³) for the eigendecompositions, O(n · features) for the weights; memory O(n² + n · d_ff)
beyond the keys. The old fit: O(folds · iterations · n · min(features, 65 536)) time, O(n · 65 536)
memory per fold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "309a5ed"


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak() -> None:
    """Linux: reset this process's peak RSS (VmHWM) to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(model: str, n: int, which: str, threads: int) -> None:
    """One fit in this process: print a JSON line (seconds, CPU seconds, peak above the loaded keys)."""
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    keys = load_file(str(Path(os.environ["CAL_KEYS"])))
    layers = sorted(int(k) for k in keys)
    x = {i: keys[str(i)][:n].float() for i in layers}
    del keys
    n_f = max(10, n // 8)
    forget = {i: x[i][:n_f].contiguous() for i in layers}
    retain = {i: x[i][n_f:].contiguous() for i in layers}
    del x
    group = torch.zeros(n - n_f, dtype=torch.long)
    import gc

    gc.collect()
    _reset_peak()
    base = _status_mib("VmRSS")
    if which == "old":
        from subprocess import check_output

        src = check_output(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:editor/methods/calibrate.py"], text=True)
        mod = types.ModuleType("old_calibrate")
        sys.modules["old_calibrate"] = mod
        sys.path.insert(0, str(ROOT))
        exec(compile(src, "old_calibrate.py", "exec"), mod.__dict__)
        fit = lambda: mod.calibrate_linear(forget, retain, group, budget=0.01, folds=5, seed=0)  # noqa: E731
    else:
        sys.path.insert(0, str(ROOT))
        from editor.methods.calibrate import calibrate_linear

        weights = "nonnegative" if which == "nonnegative" else "signed"
        fit = lambda: calibrate_linear(forget, retain, group, budget=0.01, folds=5, seed=0, weights=weights)  # noqa: E731
    t0, c0 = time.perf_counter(), time.process_time()
    rec, _ = fit()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _status_mib("VmHWM")
    print(json.dumps({"n": n, "fit": which, "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
                      "peak_above_keys_mib": round(peak - base), "features": sum(forget[i].shape[1] for i in layers),
                      "oof_coverage": rec["cv"]["forget_coverage"]}))


def collect_keys(model: str, out: Path, threads: int) -> None:
    """Pooled (max) keys of the ordinary prompts and the battery's probe items, raw and chat form."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "bench"))
    import guard_dev as G

    from editor import ordinary
    from editor.model.loading import load_config, load_model, load_tokenizer
    from editor.recipe import load_recipe

    torch.set_num_threads(threads)
    recipe = load_recipe(G.MODELS[model])
    tok = load_tokenizer(recipe)
    m = load_model(recipe, load_config(recipe))
    k = G.Keys(m, tok, G.Path(os.environ.get("TMPDIR", "/tmp")) / "skill-editor-guard-dev", f"{model}/{recipe.model}")
    probe = G.battery("probe")
    texts = [r["prompt"] for r in probe if r["skill"] == "math"] + [r["prompt"] for r in probe if r["skill"] != "math"]
    texts += [r["text"] for r in ordinary.load()]
    parts = [k(G.render(texts, form, tok))["max"] for form in ("raw", "chat")]
    # interleave the forms so any prefix of the rows holds both
    keys = {str(i): torch.stack([parts[0][i], parts[1][i]], 1).reshape(-1, parts[0][i].shape[1]).contiguous() for i in parts[0]}
    save_file(keys, str(out))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=("smollm2", "qwen"))
    ap.add_argument("--sizes", default="500,1000,2000")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-old", action="store_true", help="skip the replaced fit")
    ap.add_argument("--fits", default="kernel,old", help="which fits: kernel (signed, the default weights), "
                                                          "nonnegative (key_space.weights: nonnegative), old")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "N", "FIT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2], args.threads)
        return
    keys = Path(os.environ.get("TMPDIR", "/tmp")) / f"skill-editor-calibration-keys-{args.model}.safetensors"
    if not keys.exists():
        collect_keys(args.model, keys, args.threads)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        for which in [f for f in args.fits.split(",") if not (args.no_old and f == "old")]:
            # numpy's BLAS (scipy's L-BFGS-B) pinned to the same thread count as torch: honest CPU seconds
            threads = {v: str(args.threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
            proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", args.model, str(n), which],
                                  env={**os.environ, **threads, "CAL_KEYS": str(keys)}, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:])
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"n {row['n']:5d}  {row['fit']:6s}  {row['seconds']:7.1f} s  ({row['cpu_seconds']:.1f} CPU-s)  "
                  f"peak +{row['peak_above_keys_mib']} MiB  features {row['features']}  oof coverage {row['oof_coverage']:.3f}",
                  flush=True)
    out = ROOT / "bench" / "results" / f"calibration_scale-{args.model}.json"
    out.write_text(json.dumps({"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                                           "load_average": os.getloadavg()}, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
