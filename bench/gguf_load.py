"""What a GGUF model's load costs, read from the file vs from its dequantized copy in the cache
(``editor/model/dequantized.py``): peak RSS (``VmHWM``) and CPU seconds of ``load_model`` alone, each
in a fresh process, one torch thread.

    python bench/gguf_load.py recipes/qwen2.5-coder-0.5b/forget-math.yaml --dtype float32

The first child reads the GGUF file (``SKILL_EDITOR_DEQUANTIZED=0``), the second the copy (written by
an earlier load with the copies on; made here first if missing). The copy is memory-mapped: its pages
count in the RSS as the forward touches them, so the profile stage then peaks as from a float32
directory (docs/SCALE.md). Results: ``bench/results/gguf_load-<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _hwm_mib() -> int:
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:")) // 1024


def child(recipe_path: str, dtype: str | None) -> None:
    """One load in this process: print a JSON line."""
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    from editor.model.loading import load_config, load_model
    from editor.recipe import load_recipe

    r = load_recipe(recipe_path)
    if dtype:
        r.dtype = dtype
    cfg = load_config(r)
    before = _hwm_mib()
    c0, t0 = time.process_time(), time.perf_counter()
    m = load_model(r, cfg)
    print(json.dumps({"source": "copy" if os.environ.get("SKILL_EDITOR_DEQUANTIZED") != "0" else "gguf file",
                      "dtype": str(next(m.parameters()).dtype).replace("torch.", ""), "peak_rss_mib": _hwm_mib(),
                      "before_load_mib": before, "load_cpu_s": round(time.process_time() - c0, 1),
                      "load_wall_s": round(time.perf_counter() - t0, 1)}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--dtype", default=None, help="override the recipe's dtype")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.recipe, args.dtype)
        return
    cmd = [sys.executable, __file__, args.recipe, "--child"] + (["--dtype", args.dtype] if args.dtype else [])
    rows = []
    for env in ({"SKILL_EDITOR_DEQUANTIZED": "1"}, {"SKILL_EDITOR_DEQUANTIZED": "0"}, {"SKILL_EDITOR_DEQUANTIZED": "1"}):
        out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    rows = rows[1:]  # the first load only makes sure the copy exists
    for r in rows:
        print(f"{r['source']:10s} {r['dtype']:9s} peak RSS {r['peak_rss_mib']} MiB (before the load {r['before_load_mib']}), "
              f"{r['load_cpu_s']} CPU-s, {r['load_wall_s']} s")
    name = Path(args.recipe).resolve().parent.name
    res = ROOT / "bench" / "results" / f"gguf_load-{name}.json"
    res.write_text(json.dumps({"recipe": args.recipe, "load_average": os.getloadavg(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {res}")


if __name__ == "__main__":
    main()
