"""Engines that cannot run the edit refuse the checkpoint (issue #17, docs/SERVING.md) — the
parts that need no vLLM: the exported config names no base class a converter could fall back to,
and the shipped runtime refuses an engine's Transformers backend and TGI's decode loop."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import yaml
from click.testing import CliRunner

from editor.cli import main
from tests.tiny import save_tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    save_tiny("llama", root / "model")
    forget = [f"{a} + {b} = {a + b}" for a, b in [(3, 4), (12, 7), (25, 31), (8, 9), (40, 2), (17, 6)]]
    retain = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "she reads a long book",
              "rain falls on the roof", "we walk by the river"]
    (root / "forget.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in forget))
    (root / "retain.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in retain))
    (root / "recipe.yaml").write_text(yaml.safe_dump({
        "model": "model", "dtype": "float32", "device": "cpu",
        "data": {"forget": {"path": "forget.jsonl"}, "retain": {"path": "retain.jsonl"}},
        "profile": {"batch_size": 4, "max_length": 32},
        "neuron_adjust": {"forget": "forget", "retain": "retain", "top_percent": 10, "mode": "expected"},
        "key_space": {"forget": "forget", "layer": -1, "scale": 2.0, "check": "prompt", "refusal": "No."},
        "export": {"out": "out"},
    }))
    res = CliRunner().invoke(main, ["run", str(root / "recipe.yaml"), "--overwrite"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return root / "out"


def test_config_names_no_base_class_outside_the_edit(ckpt):
    """GGUF converters (llama.cpp) take text_config.architectures over the top-level name: it must
    not be there, or the permuted base weights convert as a plain model without the edit."""
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["SkillEditorForCausalLM"]
    assert cfg["base_model_config"].get("architectures") is None  # present as null: the converters test "is not None"
    assert cfg["skill_editor"]["base_architectures"] == ["LlamaForCausalLM"]


def test_restore_puts_the_base_class_back(ckpt, tmp_path):
    res = CliRunner().invoke(main, ["restore", str(ckpt), "--out", str(tmp_path / "base")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "base" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


ENGINES = textwrap.dedent("""
    import sys, types
    from transformers import AutoModelForCausalLM
    ckpt, case = sys.argv[1], sys.argv[2]
    try:
        if case == "backend":  # what vLLM's Transformers backend asks before running the class
            cls = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True).__class__
            cls.is_backend_compatible()
        else:  # TGI's AutoModel fallback: loaded inside its server process
            sys.modules["text_generation_server"] = types.ModuleType("text_generation_server")
            AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)
        print("LOADED")
    except Exception as e:
        print("REFUSED", type(e).__name__, e)
""")


@pytest.mark.parametrize("case", ["backend", "tgi"])
def test_runtime_refuses_engines_that_skip_generate(ckpt, tmp_path, case):
    script = tmp_path / "engines.py"
    script.write_text(ENGINES)
    out = subprocess.run([sys.executable, str(script), str(ckpt), case], capture_output=True, text=True,
                         timeout=300).stdout
    assert out.startswith("REFUSED IntegrityError"), out
    assert "outside transformers' generate" in out and "pip install 'skill-editor[vllm]'" in out
