"""Byte-identity check for refactors (issue #16): export every recipe of ``recipes/`` (except the
paper's, which need real models) and a set of tiny end-to-end projects like the tests' with one
source tree, again with another, and compare the two trees of exports file by file.

    # the exports of a source tree (default: this checkout) into DIR
    python bench/check_byte_identical.py capture DIR [--src TREE]
    # compare two captures; exit 1 on any difference that is not allowed
    python bench/check_byte_identical.py compare BEFORE AFTER

What is exported (only through the CLI, ``python -m editor``, so any source tree works):

* every testbed recipe with ``run RECIPE --out ...`` (profile → plan → patch → scorecard → export,
  which also writes ``<out>.stats/``), then ``export RECIPE --stats <out>.stats`` in HF format and,
  where Neuron Adjust is deterministic or absent, in ONNX format;
* tiny random models (``tests/tiny.py``) with the tests' kinds of projects: NA (sample / expected /
  hard, float32 / bfloat16 / float16) + KSD over four architectures, NA alone, KSD alone, the prune
  baseline, the calibrated box and the pooled linear detector (``profile`` then ``export`` HF and
  ONNX), and a ``run`` with a scorecard.

Both captures run at the same absolute paths (the source tree is copied to ``STAGE`` first, the
exports and projects are written there and then moved into DIR): an ONNX export records the model
directory's absolute path (``onnx.base_config._name_or_path`` in its manifest).

Allowed differences: the shipped runtime files (``configuration_skill_editor.py``,
``modeling_skill_editor.py``); ``model.onnx`` only in the source locations ``torch.onnx`` records
per node — the stack traces (file names and line numbers of the exporter and of the runtime file)
and the import paths of the package's own classes in the module hierarchy (``editor.export_onnx.
OnnxExportModule`` became ``editor.export.onnx.OnnxExportModule``) —, every node, initializer, input
and output being the same; and, in ``skill_editor.json``, exactly the sha256 entries of those files.
Statistics files are compared by content (metadata map + every tensor): safetensors writes its
metadata map in no fixed order, so two profiles of the same data can differ as files but not in
content. Everything else must be byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = Path("/tmp/skill-editor-byte-check")
RUNTIME_FILES = ("configuration_skill_editor.py", "modeling_skill_editor.py")
MANIFEST = "skill_editor.json"
ONNX_MODEL = "model.onnx"
# what torch.onnx records per node about where the Python code lives: a stack trace (file names,
# line numbers), and the classes of the module hierarchy by their import paths
STACK_TRACE = "pkg.torch.onnx.stack_trace"
CLASS_PATHS = ("namespace", "pkg.torch.onnx.class_hierarchy")
PACKAGE_PATH = re.compile(r"\beditor(?:\.\w+)+?\.(?=[A-Z])")  # editor.export.onnx.OnnxExportModule → editor.OnnxExportModule

RECIPES = [
    "demo.yaml", "forget-french.yaml", "forget-french-linear.yaml",
    "generalize/demo-calibrated.yaml", "generalize/french.yaml", "generalize/french-linear.yaml",
    "generalize/math.yaml", "generalize/math-linear.yaml",
]

FORGET = [f"{a} + {b} = {a + b}" for a, b in [(3, 4), (12, 7), (25, 31), (8, 9), (40, 2), (17, 6), (5, 55), (21, 21),
                                              (9, 90), (33, 3)]]
RETAIN = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "she reads a long book",
          "rain falls on the roof", "we walk by the river", "he paints the old door", "the sun is warm today",
          "they cook rice and beans", "my friend likes green tea"]
EVAL = ([{"prompt": t[: t.index("=") + 1], "answer": t.split("= ")[1], "skill": "math"} for t in FORGET[:4]]
        + [{"prompt": t[:8], "answer": t[8:12], "skill": "other"} for t in RETAIN[:4]])

# name -> (arch, dtype, method lines, formats exported from the statistics)
TINY = {
    "llama-na-sample-ksd": ("llama", "float32", """\
        neuron_adjust: {forget: forget, retain: retain, top_percent: 10, mode: sample, seed: 3}
        key_space: {forget: forget, layer: -1, scale: 2.0, refusal: "No."}
        """, ["hf"]),
    "qwen2-bf16-na-expected-ksd": ("qwen2", "bfloat16", """\
        neuron_adjust: {forget: forget, retain: retain, top_percent: 10, mode: expected, seed: 3}
        key_space: {forget: forget, layer: -1, scale: 2.0, refusal: "No."}
        """, ["hf"]),
    "gpt2-na-hard-ksd": ("gpt2", "float32", """\
        neuron_adjust: {forget: forget, retain: retain, top_percent: 10, mode: hard, seed: 3}
        key_space: {forget: forget, layer: -1, scale: 2.0, refusal: "No."}
        """, ["hf", "onnx"]),
    "phi3-fp16-na-expected-ksd": ("phi3", "float16", """\
        neuron_adjust: {forget: forget, retain: retain, top_percent: 10, mode: expected, seed: 3}
        key_space: {forget: forget, layer: -1, scale: 2.0, refusal: "No."}
        """, ["hf"]),
    "llama-na-only": ("llama", "float32", """\
        neuron_adjust: {forget: forget, retain: retain, top_percent: 10, mode: expected, seed: 0}
        """, ["hf", "onnx"]),
    "opt-ksd-only": ("opt", "float32", """\
        key_space: {forget: forget, layer: 0, scale: 1.5, check: prompt}
        """, ["hf", "onnx"]),
    "llama-prune": ("llama", "float32", """\
        prune: {forget: forget, retain: retain, top_percent: 10}
        """, ["hf", "onnx"]),
    "llama-calibrated": ("llama", "float32", """\
        neuron_adjust: {forget: answers, retain: retain, top_percent: 5, mode: expected, seed: 0}
        key_space: {forget: forget, retain: retain, folds: 3, seed: 0, false_positive_budget: 0.05}
        """, ["hf", "onnx"]),
    "llama-linear": ("llama", "float32", """\
        neuron_adjust: {forget: answers, retain: retain, top_percent: 5, mode: expected, seed: 0}
        key_space: {forget: forget, retain: retain, detector: linear, check: prompt, folds: 3, seed: 0,
                    false_positive_budget: 0.05}
        """, ["hf", "onnx"]),
}
# a `run` (scorecard included) of a tiny project, ONNX and HF in one go
TINY_RUN = ("llama", "float32", """\
    neuron_adjust: {forget: forget, retain: retain, top_percent: 10, mode: expected, seed: 0}
    key_space: {forget: forget, retain: retain, folds: 3, seed: 0, false_positive_budget: 0.05, refusal: "No."}
    evaluate: {data: scorecard}
    """)


def _cli(src: Path, *args, cwd: Path | None = None) -> None:
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "editor", *[str(a) for a in args]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd or src, capture_output=True, text=True)
    print(f"  {time.perf_counter() - t0:6.1f} s  {' '.join(str(a) for a in args[:2])} {Path(str(args[-2])).name if len(args) > 2 else ''}",
          flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _tiny_project(src: Path, root: Path, arch: str, dtype: str, methods: str, formats: list[str]) -> Path:
    """A tiny random model (``tests/tiny.py`` of ``src``), JSONL sets and a recipe in ``root``."""
    root.mkdir(parents=True)
    code = (f"import sys, torch; sys.path.insert(0, {str(src)!r}); from tests.tiny import save_tiny; "
            f"save_tiny({arch!r}, {str(root / 'model')!r}, dtype=getattr(torch, {dtype!r}))")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(src)))
    _jsonl(root / "forget.jsonl", [{"text": t} for t in FORGET])
    _jsonl(root / "retain.jsonl", [{"text": t} for t in RETAIN])
    _jsonl(root / "eval.jsonl", EVAL)
    recipe = root / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        model: model
        dtype: {dtype}
        device: cpu
        data:
          forget: {{path: forget.jsonl}}
          retain: {{path: retain.jsonl}}
          answers: {{path: forget.jsonl, text: "{{text}}1"}}
          scorecard: {{path: eval.jsonl, text: "{{prompt}}"}}
        profile: {{batch_size: 4, max_length: 32}}
        export: {{out: out, formats: [{', '.join(formats)}]}}
        """) + textwrap.dedent(methods), encoding="utf-8")
    return recipe


def capture(out: Path, src: Path) -> None:
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty")
    if STAGE.exists():
        shutil.rmtree(STAGE)
    shutil.copytree(src.resolve(), STAGE / "src", ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "outputs"))
    src = STAGE / "src"
    exports = STAGE / "exports"
    exports.mkdir(parents=True)
    print(f"source tree {src} (a copy of the one given)")
    for rel in RECIPES:
        recipe = src / "recipes" / rel
        name = rel.removesuffix(".yaml").replace("/", "-")
        dest = exports / name
        _cli(src, "run", recipe, "--out", dest, "--overwrite", "--quiet")
        _cli(src, "export", recipe, "--stats", f"{dest}.stats", "--out", exports / f"{name}-export")
        text = recipe.read_text(encoding="utf-8")
        if "neuron_adjust" not in text or "mode: sample" not in text:
            _cli(src, "export", recipe, "--stats", f"{dest}.stats", "--format", "onnx", "--out", exports / f"{name}-onnx")
    projects = STAGE / "projects"
    for name, (arch, dtype, methods, formats) in TINY.items():
        recipe = _tiny_project(src, projects / name, arch, dtype, methods, ["hf"])
        _cli(src, "profile", recipe, "--out", exports / f"tiny-{name}.stats", "--quiet")
        for fmt in formats:
            _cli(src, "export", recipe, "--stats", exports / f"tiny-{name}.stats", "--format", fmt,
                 "--out", exports / f"tiny-{name}-{fmt}")
    arch, dtype, methods = TINY_RUN
    recipe = _tiny_project(src, projects / "run", arch, dtype, methods, ["hf", "onnx"])
    _cli(src, "run", recipe, "--out", exports / "tiny-run", "--quiet")
    out.mkdir(parents=True, exist_ok=True)
    shutil.move(str(exports), str(out / "exports"))
    shutil.move(str(projects), str(out / "projects"))
    shutil.rmtree(STAGE)
    hashes = {rel: digest for rel, digest in sorted(_digests(out / "exports").items())}
    (out / "hashes.json").write_text(json.dumps(hashes, indent=1) + "\n", encoding="utf-8")
    print(f"{len(hashes)} files in {len({r.split('/')[0] for r in hashes})} exports → {out / 'hashes.json'}")


def _stats_digest(path: Path) -> str:
    """sha256 of a statistics file's content: its metadata map (sorted) and every tensor."""
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        h.update(json.dumps(f.metadata(), sort_keys=True).encode())
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "content:" + h.hexdigest()


def _digests(exports: Path) -> dict[str, str]:
    out = {}
    for p in sorted(exports.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(exports).as_posix()
        if p.name == "stats.safetensors":
            out[rel] = _stats_digest(p)
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _manifest_without(path: Path, names) -> dict:
    m = json.loads(path.read_text(encoding="utf-8"))
    files = m.get("files") or {}
    for name in names:
        files.pop(name, None)
    return m


def _graph_without_source_locations(path: Path) -> bytes:
    """``model.onnx`` serialized without the per-node source locations torch.onnx records: the
    stack traces, and the package's own module paths in the class names (a refactor moves them)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def strip(nodes) -> None:
        for node in nodes:
            kept = [(p.key, PACKAGE_PATH.sub("editor.", p.value) if p.key in CLASS_PATHS else p.value)
                    for p in node.metadata_props if p.key != STACK_TRACE]
            del node.metadata_props[:]
            for k, v in kept:
                node.metadata_props.add(key=k, value=v)
            for attr in node.attribute:
                if attr.HasField("g"):
                    strip(attr.g.node)
                for g in attr.graphs:
                    strip(g.node)

    strip(model.graph.node)
    for f in model.functions:
        strip(f.node)
    return model.SerializeToString(deterministic=True)


def compare(before: Path, after: Path) -> int:
    a = json.loads((before / "hashes.json").read_text(encoding="utf-8"))
    b = json.loads((after / "hashes.json").read_text(encoding="utf-8"))
    same, allowed, problems = 0, [], []
    for rel in sorted(set(a) | set(b)):
        if rel not in a or rel not in b:
            problems.append(f"{rel}: only in {'after' if rel in b else 'before'}")
        elif a[rel] == b[rel]:
            same += 1
        elif Path(rel).name in RUNTIME_FILES:
            allowed.append(f"{rel}: the runtime file")
        elif Path(rel).name == ONNX_MODEL and (_graph_without_source_locations(before / "exports" / rel)
                                               == _graph_without_source_locations(after / "exports" / rel)):
            allowed.append(f"{rel}: only the source locations recorded per node")
        elif Path(rel).name == MANIFEST and (_manifest_without(before / "exports" / rel, RUNTIME_FILES + (ONNX_MODEL,))
                                             == _manifest_without(after / "exports" / rel, RUNTIME_FILES + (ONNX_MODEL,))):
            allowed.append(f"{rel}: only the sha256 entries of the files above")
        else:
            problems.append(f"{rel}: differs")
    exports = sorted({r.split("/")[0] for r in a})
    print(f"compared {len(set(a) | set(b))} files of {len(exports)} exports (statistics by content):")
    print(f"  byte-identical: {same}")
    print(f"  allowed differences: {len(allowed)}")
    for line in allowed:
        print(f"    {line}")
    if problems:
        print(f"  PROBLEMS: {len(problems)}")
        for line in problems:
            print(f"    {line}")
        return 1
    print("  OK: every other file is byte-identical")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture", help="export everything with one source tree into DIR")
    c.add_argument("dir", type=Path)
    c.add_argument("--src", type=Path, default=ROOT, help="source tree (default: this checkout)")
    k = sub.add_parser("compare", help="compare two captures")
    k.add_argument("before", type=Path)
    k.add_argument("after", type=Path)
    args = ap.parse_args()
    if args.cmd == "capture":
        capture(args.dir, args.src)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
