"""``skill-editor inspect`` on an ONNX export directory (model.onnx + external data, tokenizer
files, skill_editor.json, no config.json): what was edited, and the sha256 of every listed file —
one changed byte or a missing file fails with one line, exactly as for HF checkpoints."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from editor.cli import main  # noqa: E402
from tests.helpers import cli  # noqa: E402

pytestmark = [pytest.mark.xdist_group("inspect_onnx"), pytest.mark.slow]  # one worker builds the export once

FILES = ["README.md", "generation_config.json", "model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def onnx_export(make_project) -> Path:
    """`skill-editor run` of a recipe with NA + calibrated KSD + scorecard, exported as ONNX only."""
    recipe = make_project("inspect-onnx", """\
        neuron_adjust: {forget: forget, retain: retain, top_percent: 10, mode: expected, seed: 0}
        key_space: {forget: forget, retain: retain, folds: 3, seed: 0, false_positive_budget: 0.05, refusal: "No."}
        evaluate: {data: scorecard}
        """, sets={"forget": "{path: forget.jsonl}", "retain": "{path: retain.jsonl}",
                   "scorecard": '{path: eval.jsonl, text: "{prompt}"}'}, export="{out: out, formats: [onnx]}")
    cli("run", recipe, "--quiet")
    out = recipe.parent / "out"
    assert (out / "model.onnx").is_file() and not (out / "config.json").exists()
    return out


def _inspect(path: Path):
    res = CliRunner().invoke(main, ["inspect", str(path)])
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    return res, errors


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def _manifest(path: Path) -> dict:
    return json.loads((path / "skill_editor.json").read_text(encoding="utf-8"))


def test_inspect_reports_an_onnx_export(onnx_export):
    res, errors = _inspect(onnx_export)
    assert res.exit_code == 0, res.output
    assert not errors
    out = res.output
    m = _manifest(onnx_export)
    assert sorted(m["files"]) == FILES  # the files this test expects every export to list
    edit = m["edit"]
    assert out.startswith(f"checkpoint: {onnx_export}\n")
    assert "kind:       ONNX export (model.onnx + model.onnx.data; patched: the edit runs inside the graph" in out
    assert "base model: model (llama, float32)" in out
    assert "recipe:     data forget (forget.jsonl), retain (retain.jsonl), scorecard (eval.jsonl); profile batch 4 × max_length 32" in out
    assert "methods:    neuron_adjust, key_space" in out
    na = edit["neuron_adjust"]
    assert f"neuron adjust: {na['total']} neurons, mode expected, seed 0, score paper, top 10 %, forget forget vs retain retain" in out
    assert "  per layer: " + ", ".join(f"{k}:{v}" for k, v in sorted(na["counts"].items(), key=lambda kv: int(kv[0]))) in out
    ks = edit["key_space"]
    for layer in ks["layers"]:
        assert f"key space:  layer {layer}, " in out and f"{ks['dims'][str(layer)]} guarded dims" in out
    assert "  plan: calibrated on retain (false-positive budget 0.05, 3 folds, seed 0): held-out forget coverage" in out
    assert "  refusal: 'No.'" in out
    assert f"patch digest: {edit['patch_digest']}" in out
    assert f"onnx:       opset {m['onnx']['opset']}, float32, 3 layers with KV cache; validated with ONNX Runtime" in out
    assert "  score math: exact match" in out and "  score other: exact match" in out
    assert "statistics: model model" in out
    assert out.rstrip().endswith("verification: OK; 6/6 files match their sha256")


@pytest.mark.parametrize("name", ["model.onnx", "model.onnx.data", "tokenizer.json"])
def test_one_changed_byte_fails_with_one_line(onnx_export, tmp_path, name):
    ckpt = _copy(onnx_export, tmp_path / "ckpt")
    data = bytearray((ckpt / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (ckpt / name).write_bytes(bytes(data))
    res, errors = _inspect(ckpt)
    assert res.exit_code == 1, res.output
    assert len(errors) == 1 and errors[0].startswith(f"error: {name}: sha256 mismatch (expected "), errors
    assert "verification: FAILED (1 problem); 5/6 files match their sha256" in res.output


@pytest.mark.parametrize("name", ["model.onnx", "model.onnx.data", "tokenizer_config.json"])
def test_a_missing_file_fails_with_one_line(onnx_export, tmp_path, name):
    ckpt = _copy(onnx_export, tmp_path / "ckpt")
    (ckpt / name).unlink()
    res, errors = _inspect(ckpt)
    assert res.exit_code == 1, res.output
    assert errors == [f"error: {name}: missing"]


def test_unlisted_file_and_unlisted_graph(onnx_export, tmp_path):
    ckpt = _copy(onnx_export, tmp_path / "ckpt")
    (ckpt / "extra.onnx").write_bytes(b"\x00")
    res, errors = _inspect(ckpt)
    assert res.exit_code == 1 and errors == ["error: extra.onnx: not listed in skill_editor.json"]
    # the graph's external data dropped from the listing AND from the disk: still caught
    ckpt2 = _copy(onnx_export, tmp_path / "ckpt2")
    m = _manifest(ckpt2)
    del m["files"]["model.onnx.data"]
    (ckpt2 / "skill_editor.json").write_text(json.dumps(m), encoding="utf-8")
    (ckpt2 / "model.onnx.data").unlink()
    res, errors = _inspect(ckpt2)
    assert res.exit_code == 1 and errors == ["error: model.onnx.data: missing"]


def test_manifest_edit_must_match_the_graph(onnx_export, tmp_path):
    """The files' digests hold, but skill_editor.json describes another patch: the graph's own
    metadata disagrees (the analogue of the HF config.json / manifest digest check)."""
    from editor.checkpoint import verify

    ckpt = _copy(onnx_export, tmp_path / "ckpt")
    m = _manifest(ckpt)
    m["edit"]["patch_digest"] = "0" * 64
    (ckpt / "skill_editor.json").write_text(json.dumps(m), encoding="utf-8")
    res, errors = _inspect(ckpt)
    assert res.exit_code == 1
    assert errors == ["error: skill_editor.json and model.onnx record different patch digests (expected 000000000000…, "
                      f"got {_manifest(onnx_export)['edit']['patch_digest'][:12]}…)"]
    del m["edit"]
    (ckpt / "skill_editor.json").write_text(json.dumps(m), encoding="utf-8")
    rep = verify(ckpt)
    assert rep.format == "onnx" and not rep.patched
    assert rep.problems == [f"model.onnx carries an edit (patch digest {_manifest(onnx_export)['edit']['patch_digest'][:12]}…) "
                            "that skill_editor.json does not record"]


def test_missing_manifest_or_onnx_section(onnx_export, tmp_path):
    ckpt = _copy(onnx_export, tmp_path / "ckpt")
    (ckpt / "skill_editor.json").unlink()
    res, errors = _inspect(ckpt)
    assert res.exit_code == 1
    assert errors == ["error: missing skill_editor.json: not a skill-editor ONNX export (nothing to verify against)"]
    ckpt2 = _copy(onnx_export, tmp_path / "ckpt2")
    m = _manifest(ckpt2)
    del m["onnx"]
    (ckpt2 / "skill_editor.json").write_text(json.dumps(m), encoding="utf-8")
    res, errors = _inspect(ckpt2)
    assert res.exit_code == 1 and errors == ["error: skill_editor.json has no onnx section: not a skill-editor ONNX export"]


def test_without_the_onnx_package_the_files_are_still_verified(onnx_export, tmp_path, monkeypatch):
    """inspect needs no onnx install: the sha256 checks run, the graph comparison is noted as skipped."""
    from editor.checkpoint import describe, verify

    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    rep = verify(onnx_export)
    assert rep.ok and rep.checked == 6
    assert "note: the edit recorded in model.onnx was not compared (the onnx package is not installed)" in describe(rep)
    ckpt = _copy(onnx_export, tmp_path / "ckpt")
    data = bytearray((ckpt / "model.onnx.data").read_bytes())
    data[0] ^= 0x80
    (ckpt / "model.onnx.data").write_bytes(bytes(data))
    assert [p.split(" (")[0] for p in verify(ckpt).problems] == ["model.onnx.data: sha256 mismatch"]


def test_onnx_export_has_its_model_card(onnx_export, tmp_path):
    """The pipeline's ONNX export carries a model card for the Hub (ONNX front-matter, how to run
    the graph and read ``abstained``, the scorecard), listed and verified like every other file."""
    from editor.hub import upload_for

    card = (onnx_export / "README.md").read_text(encoding="utf-8")
    front = card.split("---")[1]
    assert "library_name: onnx" in front and "- onnx" in front and "pipeline_tag: text-generation" in front
    assert "model-index" in front  # the scorecard's results
    assert "## How to load (ONNX)" in card and "ort.InferenceSession" in card
    assert "`abstained`" in card and "check: every_call" in card
    assert "trust_remote_code" not in card
    assert "README.md" in _manifest(onnx_export)["files"]
    upload = upload_for(onnx_export, "me/tiny-onnx")
    assert upload.card == card and "README.md" in [f for f, _ in upload.files]


def test_plain_onnx_export(tmp_path):
    """A base model exported directly (no edit, no pipeline manifest): verified, reported as plain."""
    from editor.export.onnx import export_onnx
    from tests.tiny import char_tokenizer, tiny_model

    out = tmp_path / "plain"
    export_onnx(tiny_model("gpt2", n_layer=1), char_tokenizer(), out, prompts=["Hi there"], steps=2)
    res, errors = _inspect(out)
    assert res.exit_code == 0, res.output
    assert "kind:       ONNX export (model.onnx + model.onnx.data; plain: no edit inside the graph" in res.output
    assert "methods:    none" in res.output and "patch digest" not in res.output
    assert "verification: OK; 5/5 files match their sha256" in res.output


def test_restore_refuses_an_onnx_export(onnx_export, tmp_path):
    res = CliRunner().invoke(main, ["restore", str(onnx_export), "--out", str(tmp_path / "base")])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [f"error: restore: {onnx_export} is an ONNX export; restore works on HF "
                                               "checkpoints (the graph does not keep the neuron permutation): restore "
                                               "the HF export of the same recipe"]
    assert not (tmp_path / "base").exists()


def test_detection_uses_the_exporters_names(onnx_export, tmp_path):
    from editor import checkpoint, manifest, onnx_runtime
    from editor.export import onnx

    for module in (checkpoint, onnx, onnx_runtime):  # one definition, in editor.manifest
        assert module.ONNX_MODEL is manifest.ONNX_MODEL
    for module in (checkpoint, onnx):
        assert (module.ONNX_DATA, module.ONNX_FORMAT) == (manifest.ONNX_DATA, manifest.ONNX_FORMAT)
    assert checkpoint.is_onnx_export(onnx_export)
    ckpt = _copy(onnx_export, tmp_path / "ckpt")
    (ckpt / "config.json").write_text("{}", encoding="utf-8")  # with a config.json it is read as an HF checkpoint
    assert not checkpoint.is_onnx_export(ckpt)
