"""The package's layout (docs/DEVELOPING.md): modules import only earlier stages of the pipeline
and the leaves — no upward import, hence no import loop —, the shipped runtime imports nothing
from ``editor``, and the ONNX generator runs without torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "editor"

# every module of the package, in pipeline order: a module may import only modules listed before it
# ("pkg.*": every module of that package, at one rank)
ORDER = [
    "editor", "editor.errors", "editor.hooks", "editor.io", "editor.threads", "editor.progress", "editor.heap",
    "editor.runtime", "editor.runtime.configuration_skill_editor", "editor.runtime.modeling_skill_editor",
    "editor.manifest",
    "editor.recipe", "editor.options", "editor.ordinary", "editor.attacks", "editor.data",
    "editor.model", "editor.model.tokens", "editor.model.arch", "editor.model.identity", "editor.model.packaged",
    "editor.model.dequantized", "editor.model.loading",
    "editor.profile", "editor.profile.stats", "editor.profile.prefix", "editor.profile.collect", "editor.profile.stream",
    "editor.profile.distributed",
    "editor.methods", "editor.methods.neuron_adjust", "editor.methods.key_space", "editor.methods.calibrate",
    "editor.plan", "editor.patch",
    "editor.export", "editor.export.card", "editor.export.hf", "editor.export.onnx",
    "editor.checkpoint.verification", "editor.checkpoint.report", "editor.checkpoint.restoration", "editor.checkpoint",
    "editor.onnx_runtime", "editor.hub",
    "editor.eval", "editor.eval.attacks", "editor.eval.paper", "editor.eval.scorecard", "editor.eval.lmeval",
    "editor.dryrun.estimate", "editor.dryrun.render", "editor.dryrun", "editor.pipeline",
    "editor.serve.*",  # reserved for the serving plugins: any module of the package, imports among them free
    "editor.cli", "editor.__main__",
    # the embedded default model and its training recipe: nothing in the product imports it
    "editor.testbed.tokenizer", "editor.testbed.corpus", "editor.testbed", "editor.testbed.train",
    # the real-model battery (SmolLM2) and its builder: data for recipes, tests and bench/
    "editor.battery", "editor.battery.items", "editor.battery.requests", "editor.battery.build",
]


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every ``editor`` module ``name`` imports, at any depth of the file (lazy imports too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m == "editor" or m.startswith("editor.")}


def _rank(module: str) -> int | None:
    for i, entry in enumerate(ORDER):
        if module == entry or (entry.endswith(".*") and (module + ".").startswith(entry[:-1])):
            return i
    return None


def test_every_module_is_placed():
    assert [m for m in _modules() if _rank(m) is None] == []
    assert all(entry.endswith(".*") or entry in _modules() for entry in ORDER)


def test_no_upward_import():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for imp in sorted(_imports(name, path) & set(modules)):
            if imp != name and _rank(imp) >= _rank(name) and not (_rank(imp) == _rank(name) and ORDER[_rank(name)].endswith(".*")):
                bad.append(f"{name} imports {imp}")
    assert not bad, bad


def test_runtime_imports_nothing_from_the_package():
    modules = _modules()
    for name in ("editor.runtime.configuration_skill_editor", "editor.runtime.modeling_skill_editor"):
        path = modules[name]
        assert _imports(name, path) & set(modules) <= {"editor.runtime", "editor.runtime.configuration_skill_editor"}, name
        text = path.read_text(encoding="utf-8")
        # a checkpoint ships these two files, its config, weights, tokenizer, README.md (the card) and
        # skill_editor.json: they cite nothing else (no design document, repository file or issue)
        for other in ("DESIGN", "docs/", "GENERALIZATION", "DEVELOPING", "bench/", "tests/", "recipes/", "editor/",
                      "issue #", "../"):
            assert not re.search(r"(?<![\w-])" + re.escape(other), text), (name, other)  # "skill-editor/patch" is a name


def test_onnx_generator_needs_no_torch():
    code = "import sys; sys.modules['torch'] = None; from editor.onnx_runtime import OnnxGenerator; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def _vllm_table() -> dict[str, dict]:
    """``VLLM_ARCHITECTURES`` of editor/serve/vllm_model.py, read from its source (the module
    imports vLLM, which this environment need not have)."""
    tree = ast.parse((PACKAGE / "serve" / "vllm_model.py").read_text(encoding="utf-8"))
    names: dict = {"VllmSpec": dict}
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id in ("_GATED", "VLLM_ARCHITECTURES"):
            names[target.id] = eval(compile(ast.Expression(node.value), "vllm_model.py", "eval"), names)  # noqa: S307
    return names["VLLM_ARCHITECTURES"]


# runtime architectures vLLM does not serve (docs/SERVING.md): placing a new one is a decision
NOT_SERVED_BY_VLLM = {"olmo", "olmo2", "phi", "gpt_neox"}


def test_vllm_architecture_table_agrees_with_the_runtime():
    """Every vLLM entry is a runtime architecture with the same decoder-layer list and down
    projection (the key's module), and a pre module that is the runtime's — or, for a gated MLP,
    vLLM's merged [gate | up] projection, whose first half is the runtime's gate."""
    from editor.runtime.modeling_skill_editor import ARCHITECTURES

    vllm = _vllm_table()
    assert set(vllm) | NOT_SERVED_BY_VLLM == set(ARCHITECTURES) and not set(vllm) & NOT_SERVED_BY_VLLM
    for model_type, v in vllm.items():
        spec = ARCHITECTURES[model_type]
        assert v["layers"] == spec.layers and v["down"] == spec.down, model_type
        want_pre = "mlp.gate_up_proj" if spec.gated else spec.pre
        assert v["pre"] == want_pre, model_type
