"""Where the time of ``skill-editor run RECIPE`` goes: wall and process-CPU seconds of every stage
(import, validate, load, base scorecard, profile, calibration keys, calibration fit, plan + patch,
edited scorecard, export; ``editor.progress.stage``), with the thread count, the machine and its load
average (at start, at end, and sampled every 10 s during the run). The README's quoted run times
come from this script.

    python bench/stages.py recipes/smollm2/forget-math.yaml --threads 1 --json bench/results/stages-smollm2.json

The run writes its checkpoint into a temporary directory (removed afterwards) unless ``--out``.
With one thread, a stage's CPU seconds are what its wall time would be on an idle core; the wall
seconds include the waits of a shared machine (compare them with the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


class LoadSampler(threading.Thread):
    """The 1-minute load average every ``every`` seconds while the run lasts."""

    def __init__(self, every: float = 10.0):
        super().__init__(daemon=True)
        self.every, self.samples, self.done = every, [], threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.samples.append(round(os.getloadavg()[0], 2))


def _status_mib(field: str) -> int:
    """A size line of /proc/self/status (``VmRSS``, ``VmHWM``), in MiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) // 1024


def _rss_mib() -> int | None:
    """This process's resident size now (VmRSS, MiB): what a stage leaves to the next one."""
    try:
        return _status_mib("VmRSS")
    except (OSError, StopIteration, ValueError):
        return None


def _peak_mib_and_reset() -> int | None:
    """This process's peak RSS (VmHWM, MiB) since the last call, then the mark reset (``5`` into
    /proc/self/clear_refs) so the next stage's peak is its own; None where /proc has no such file."""
    try:
        peak = _status_mib("VmHWM")
        Path("/proc/self/clear_refs").write_text("5")
        return peak
    except (OSError, StopIteration, ValueError):
        return None


def _dry_run_check(recipe: str, stages: list[dict]) -> dict:
    """Each stage's measured peak RSS beside ``skill-editor run --dry-run``'s estimate for ``run``
    (``DryRun.run_peaks``):
    base scorecard, profile, calibration (its key collection and fit), edited scorecard, export."""
    from editor.dryrun.estimate import estimate

    peaks = estimate(recipe).run_peaks
    by = {s["stage"]: s.get("peak_rss_mib") for s in stages}
    measured = {"profile": by.get("profile"), "export": by.get("export"), "base scorecard": by.get("base scorecard"),
                "edited scorecard": by.get("edited scorecard"),
                "calibration": max((by.get(k) or 0) for k in ("calibration keys", "calibration fit")) or None}
    if "export onnx" in peaks:  # one export stage writes both formats: its peak is the ONNX export's
        measured["export onnx"], measured["export"] = measured["export"], None
    out = {}
    for stage, est in peaks.items():
        m = measured.get(stage)
        if m:
            e = round(est / 2**20)
            out[stage] = {"measured": m, "estimate": e, "error": round(e / m - 1, 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", default=None, help="checkpoint directory (default: a temporary one, removed afterwards)")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args()

    load_start = [round(x, 2) for x in os.getloadavg()]
    sampler = LoadSampler()
    sampler.start()
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    import torch  # timed as part of the import stage

    from editor.pipeline import run_recipe
    from editor.progress import listen
    from editor.threads import set_threads, usable_cpus

    stages: list[dict] = [{"stage": "import", "wall_s": time.perf_counter() - t_wall, "cpu_s": time.process_time() - t_cpu}]
    threads = set_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.quiet:
        hf_logging.disable_progress_bar()

    def record(name: str, wall: float, cpu: float) -> None:
        peak, left = _peak_mib_and_reset(), _rss_mib()
        stages.append({"stage": name, "wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak, "end_rss_mib": left})
        print(f"[stage] {name}: {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {peak} MiB, {left} MiB at its end",
              file=sys.stderr, flush=True)

    _peak_mib_and_reset()  # the import stage's peak is not the run's

    with tempfile.TemporaryDirectory(prefix="skill-editor-stages-") as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "ck"
        with listen(record):
            summary = run_recipe(args.recipe, out, overwrite=True, progress=not args.quiet, echo=lambda s: None)
    total_wall, total_cpu = time.perf_counter() - t_wall, time.process_time() - t_cpu
    sampler.done.set()
    sampler.join()
    stages.append({"stage": "other", "wall_s": total_wall - sum(s["wall_s"] for s in stages),
                   "cpu_s": total_cpu - sum(s["cpu_s"] for s in stages)})
    for s in stages:
        s["wall_s"], s["cpu_s"] = round(s["wall_s"], 2), round(s["cpu_s"], 2)

    report = {
        "recipe": args.recipe,
        "threads": threads,
        "total": {"wall_s": round(total_wall, 2), "cpu_s": round(total_cpu, 2)},
        "stages": stages,
        "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()],
                         "samples_1min": sampler.samples,
                         "mean_1min": round(sum(sampler.samples) / len(sampler.samples), 2) if sampler.samples else None},
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "usable_cpus": usable_cpus(),
                    "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()},
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "scorecard": bool(summary.get("scorecard")),
    }
    report["dry_run_peaks_mib"] = _dry_run_check(args.recipe, stages)
    width = max(len(s["stage"]) for s in stages)
    print(f"{args.recipe}: {threads} thread(s), {report['machine']['cpu']} ({report['machine']['cores']} cores), "
          f"torch {report['machine']['torch']}; 1-min load {load_start[0]} at start, "
          f"{report['load_average']['mean_1min']} mean, {report['load_average']['end'][0]} at end")
    print(f"{'stage':<{width}}  {'wall s':>8}  {'CPU s':>8}")
    for s in stages:
        print(f"{s['stage']:<{width}}  {s['wall_s']:>8.1f}  {s['cpu_s']:>8.1f}")
    print(f"{'total':<{width}}  {total_wall:>8.1f}  {total_cpu:>8.1f}")
    for stage, d in report["dry_run_peaks_mib"].items():
        print(f"peak RSS {stage}: measured {d['measured']} MiB, dry run {d['estimate']} MiB ({d['error']:+.0%})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
