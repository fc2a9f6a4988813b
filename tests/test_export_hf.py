"""The exported HF checkpoint (DESIGN §4): loads with only torch + transformers, offline, in a
process where ``editor`` cannot be imported; fails closed; deterministic; atomic; inspect /
restore.

Checkpoints of four architectures are built once per module (profile → export through the CLI).
Everything that must run without ``editor`` runs in ONE clean subprocess (a throw-away venv whose
site-packages points at this venv's, without its editable install of ``editor``), driven by a
JSON list of cases; the tests then compare its results with the in-process patched model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from editor.cli import main
from tests.helpers import cli, tiny_project

pytestmark = pytest.mark.slow  # the module's checkpoints are built end to end and loaded in a clean process

# arch -> (dtype, NA mode): every mode and dtype somewhere
ARCH_CASES = {
    "llama": ("float32", "sample"),
    "qwen2": ("bfloat16", "expected"),
    "gpt2": ("float32", "hard"),
    "phi3": ("float16", "expected"),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROMPTS = ["12 + 7 = 19", "the cat sat on"]


def _inputs(tok) -> dict:
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# ---------------------------------------------------------------------------------------------
# the clean loader process
# ---------------------------------------------------------------------------------------------

LOADER = r'''
import json, sys, traceback
results = {}
try:
    import editor  # noqa: F401
    results["editor_importable"] = True
except ImportError:
    results["editor_importable"] = False
import torch
torch.set_num_threads(1)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, pipeline

cases = json.load(open(sys.argv[1]))
inputs = load_file(sys.argv[2])

def forward(model):
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return out

for case in cases:
    name, d = case["name"], case["dir"]
    r = results[name] = {}
    try:
        model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=case.get("trust", False)).eval()
    except Exception as e:  # noqa: BLE001
        r["error"] = type(e).__name__ + ": " + str(e).splitlines()[0] if str(e) else type(e).__name__
        continue
    r["class"] = type(model).__name__
    r["dtype"] = str(model.dtype)
    out = forward(model)
    tensors = {"logits": out.logits.float().contiguous()}
    if getattr(out, "abstained", None) is not None:
        tensors["abstained"] = out.abstained.to(torch.uint8)
    save_file(tensors, case["save"])
    if case.get("roundtrip"):
        model.save_pretrained(case["roundtrip"])
        again = AutoModelForCausalLM.from_pretrained(case["roundtrip"], trust_remote_code=True).eval()
        if hasattr(model, "reset_neuron_adjust_rng"):
            model.reset_neuron_adjust_rng()
        a, b = forward(model), forward(again)
        r["roundtrip_equal"] = bool(torch.equal(a.logits, b.logits))
        r["roundtrip_class"] = type(again).__name__
    if case.get("pipeline"):
        gen = pipeline("text-generation", model=d, trust_remote_code=True)
        got = gen(["12 + 7 =", "the cat"], max_new_tokens=4, do_sample=False)
        r["pipeline"] = [g[0]["generated_text"] for g in got]
json.dump(results, open(sys.argv[3], "w"))
'''


def _clean_python(root: Path) -> Path:
    """A venv whose site-packages reaches this venv's packages through a plain path entry — so
    torch and transformers import, but the editable install of ``editor`` (a .pth hook) does not."""
    venv = root / "clean-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "parent_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


def run_clean(root: Path, cases: list[dict], inputs: dict) -> dict:
    py = _clean_python(root)
    script = root / "loader.py"
    script.write_text(LOADER)
    (root / "cases.json").write_text(json.dumps(cases))
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(root / "inputs.safetensors"))
    work = root / "cwd"
    work.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root / "home"), "HF_HOME": str(root / "hf"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([str(py), "-I", str(script), str(root / "cases.json"), str(root / "inputs.safetensors"),
                           str(root / "results.json")], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((root / "results.json").read_text())


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


def _na_ksd_body(mode: str) -> str:
    return f"""\
        neuron_adjust: {{forget: forget, retain: retain, top_percent: 10, mode: {mode}, seed: 3}}
        key_space: {{forget: forget, layer: -1, scale: 2.0, refusal: "No."}}
        """


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Per arch: base model dir, stats, exported checkpoint, the in-process expected outputs."""
    from editor.pipeline import edit_model, prepare
    from editor.profile.stats import load_stats

    root = tmp_path_factory.mktemp("export")
    out = {"root": root, "archs": {}}
    inputs = None
    for arch, (dtype, mode) in ARCH_CASES.items():
        d = root / arch
        recipe = tiny_project(d, _na_ksd_body(mode), arch=arch, dtype=dtype)
        cli("profile", recipe, "--out", d / "stats", "--quiet")
        cli("export", recipe, "--stats", d / "stats", "--out", d / "ckpt")
        job = prepare(recipe)
        ed = edit_model(job, load_stats(d / "stats"))
        wrapped = ed.wrapped.eval()
        if inputs is None:
            inputs = _inputs(ed.tokenizer)
        with torch.no_grad():
            res = wrapped(**inputs)
        out["archs"][arch] = {"dir": d, "recipe": recipe, "ckpt": d / "ckpt", "logits": res.logits.float(),
                              "abstained": res.abstained, "edited": ed}
    # prune baseline (plain checkpoint)
    d = root / "prune"
    recipe = tiny_project(d, "prune: {forget: forget, retain: retain, top_percent: 10}\n")
    cli("profile", recipe, "--out", d / "stats", "--quiet")
    cli("export", recipe, "--stats", d / "stats")  # --out defaults to export.out, relative to the recipe
    job = prepare(recipe)
    ed = edit_model(job, load_stats(d / "stats"))
    with torch.no_grad():
        out["prune"] = {"dir": d, "ckpt": d / "out", "logits": ed.model(**inputs).logits.float(), "edited": ed}
    out["inputs"] = inputs
    return out


@pytest.fixture(scope="module")
def variants(built):
    """Tampered copies of the llama checkpoint, a sharded export and the restored base models."""
    from editor.checkpoint import restore
    from editor.pipeline import export_recipe

    root = built["root"] / "variants"
    root.mkdir()
    src = built["archs"]["llama"]["ckpt"]
    v = {}

    def copy(name):
        dst = root / name
        shutil.copytree(src, dst)
        return dst

    missing = copy("missing")
    t = load_file(str(missing / "model.safetensors"))
    del t["model.model.layers.2.mlp.down_proj.key_space.lower"]
    save_file(t, str(missing / "model.safetensors"), metadata={"format": "pt"})
    v["missing"] = missing

    value = copy("value")
    t = load_file(str(value / "model.safetensors"))
    t["model.model.layers.0.mlp.gate_proj.neuron_adjust.a"][0] += 0.5
    save_file(t, str(value / "model.safetensors"), metadata={"format": "pt"})
    v["value"] = value

    digest = copy("digest")
    cfg = json.loads((digest / "config.json").read_text())
    cfg["skill_editor"]["patch_digest"] = "0" * 64
    (digest / "config.json").write_text(json.dumps(cfg, indent=2))
    v["digest"] = digest

    a = built["archs"]["llama"]
    v["sharded"] = export_recipe(a["recipe"], a["dir"] / "stats", root / "sharded", max_shard_size="40KB")
    v["restored"] = {arch: restore(info["ckpt"], root / f"restored-{arch}") for arch, info in built["archs"].items()}
    return v


@pytest.fixture(scope="module")
def clean(built, variants):
    """Run every load case in one clean process (no ``editor``)."""
    root = built["root"] / "clean"
    root.mkdir()
    cases = []
    for arch, info in built["archs"].items():
        cases.append({"name": arch, "dir": str(info["ckpt"]), "trust": True, "save": str(root / f"{arch}.safetensors"),
                      "roundtrip": str(root / f"rt-{arch}"), "pipeline": arch == "llama"})
        cases.append({"name": f"{arch}-notrust", "dir": str(info["ckpt"]), "trust": False, "save": str(root / "x.safetensors")})
        cases.append({"name": f"{arch}-restored", "dir": str(variants["restored"][arch]), "trust": False,
                      "save": str(root / f"{arch}-restored.safetensors")})
        cases.append({"name": f"{arch}-base", "dir": str(info["dir"] / "model"), "trust": False,
                      "save": str(root / f"{arch}-base.safetensors")})
    for name in ("missing", "value", "digest"):
        cases.append({"name": name, "dir": str(variants[name]), "trust": True, "save": str(root / "x.safetensors")})
    cases.append({"name": "sharded", "dir": str(variants["sharded"]), "trust": True, "save": str(root / "sharded.safetensors")})
    cases.append({"name": "prune", "dir": str(built["prune"]["ckpt"]), "trust": False, "save": str(root / "prune.safetensors")})
    results = run_clean(root, cases, built["inputs"])
    results["_root"] = root
    return results


def _saved(clean, name):
    return load_file(str(Path(clean["_root"]) / f"{name}.safetensors"))


# ---------------------------------------------------------------------------------------------
# loading contract
# ---------------------------------------------------------------------------------------------


def test_clean_process_cannot_import_editor(clean):
    assert clean["editor_importable"] is False


@pytest.mark.parametrize("arch", sorted(ARCH_CASES))
def test_checkpoint_logits_match_in_process_model(built, clean, arch):
    r = clean[arch]
    assert "error" not in r, r
    assert r["class"] == "SkillEditorForCausalLM"
    assert r["dtype"] == f"torch.{ARCH_CASES[arch][0]}"
    got = _saved(clean, arch)
    want = built["archs"][arch]
    assert torch.equal(got["logits"], want["logits"]), (got["logits"] - want["logits"]).abs().max()
    assert torch.equal(got["abstained"].bool(), want["abstained"])


@pytest.mark.parametrize("arch", sorted(ARCH_CASES))
def test_loading_without_trust_remote_code_fails(clean, arch):
    err = clean[f"{arch}-notrust"].get("error", "")
    assert err, "loaded without trust_remote_code"
    assert "trust_remote_code" in err or "custom code" in err


@pytest.mark.parametrize("arch", sorted(ARCH_CASES))
def test_save_pretrained_round_trip(clean, arch):
    assert clean[arch]["roundtrip_equal"] is True
    assert clean[arch]["roundtrip_class"] == "SkillEditorForCausalLM"


def test_text_generation_pipeline(clean):
    texts = clean["llama"]["pipeline"]
    assert len(texts) == 2 and texts[0].startswith("12 + 7 =") and texts[1].startswith("the cat")


def test_missing_patch_tensor_refuses_to_load(clean):
    err = clean["missing"].get("error", "")
    assert "IntegrityError" in err and "missing patch tensors" in err and "key_space.lower" in err


@pytest.mark.parametrize("case", ["value", "digest"])
def test_patch_digest_mismatch_refuses_to_load(clean, case):
    err = clean[case].get("error", "")
    assert "IntegrityError" in err and "digest" in err


def test_sharded_export_loads(built, clean, variants):
    names = sorted(p.name for p in Path(variants["sharded"]).iterdir())
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) > 1
    assert torch.equal(_saved(clean, "sharded")["logits"], built["archs"]["llama"]["logits"])


def test_prune_export_is_a_plain_checkpoint(built, clean):
    ckpt = built["prune"]["ckpt"]
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg
    assert not list(ckpt.glob("*.py"))
    assert "error" not in clean["prune"], clean["prune"]
    assert clean["prune"]["class"] == "LlamaForCausalLM"
    assert torch.equal(_saved(clean, "prune")["logits"], built["prune"]["logits"])
    manifest = json.loads((ckpt / "skill_editor.json").read_text())
    assert manifest["kind"] == "plain" and manifest["edit"]["prune"]["total"] > 0


# ---------------------------------------------------------------------------------------------
# layout, manifest, card
# ---------------------------------------------------------------------------------------------


def test_checkpoint_layout_and_manifest(built):
    from editor.io import sha256_file

    ckpt = built["archs"]["llama"]["ckpt"]
    names = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "configuration_skill_editor.py", "modeling_skill_editor.py", "model.safetensors",
            "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md", "skill_editor.json"} <= names
    runtime = Path(__file__).resolve().parents[1] / "editor" / "runtime"
    for f in ("configuration_skill_editor.py", "modeling_skill_editor.py"):
        assert (ckpt / f).read_bytes() == (runtime / f).read_bytes()
    cfg = json.loads((ckpt / "config.json").read_text())
    # the base architecture's model_type at the top level (the tokenizer loads with no custom code),
    # a weights "file name" that no class but the checkpoint's own accepts, the checkpoint's classes
    from editor.runtime.configuration_skill_editor import LOAD_WITH_REMOTE_CODE

    assert cfg["model_type"] == "llama" and cfg["transformers_weights"] == LOAD_WITH_REMOTE_CODE
    assert cfg["architectures"] == ["SkillEditorForCausalLM"]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_skill_editor.SkillEditorForCausalLM"
    assert cfg["auto_map"]["AutoConfig"] == "configuration_skill_editor.SkillEditorConfig"
    assert cfg["base_model_config"]["model_type"] == "llama"
    for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "rope_parameters"):
        assert cfg[k] == cfg["base_model_config"][k], k  # AutoConfig without trust_remote_code gives the real base config
    # no key a plain loader would take for a sub-configuration: its get_text_config() is the base config itself
    assert "text_config" not in cfg
    from transformers import AutoConfig

    plain = AutoConfig.from_pretrained(str(ckpt))
    assert plain.model_type == "llama" and plain.get_text_config() is plain and plain.num_hidden_layers == cfg["num_hidden_layers"]
    m = json.loads((ckpt / "skill_editor.json").read_text())
    assert m["recipe"]["neuron_adjust"]["forget"] == "forget"
    assert m["tool_version"]
    assert m["statistics"]["model"] == "model" and "forget" in m["statistics"]["sets"]
    assert m["statistics"]["digest"] == _stats_digest(built["archs"]["llama"]["dir"] / "stats" / "stats.safetensors")
    edit = m["edit"]
    assert edit["methods"] == ["neuron_adjust", "key_space"]
    assert sum(edit["neuron_adjust"]["counts"].values()) == edit["neuron_adjust"]["total"] > 0
    assert edit["key_space"]["layer"] == 2 and edit["key_space"]["refusal"] == "No."
    assert edit["key_space"]["k"]["2"] > 0 and edit["key_space"]["scale"]["2"] == 2.0
    assert edit["patch_digest"] == cfg["skill_editor"]["patch_digest"]
    assert set(m["files"]) == names - {"skill_editor.json"}
    for rel, digest in m["files"].items():
        assert sha256_file(ckpt / rel) == digest
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.model.layers.0.mlp.gate_proj.weight").dtype == torch.float32
    assert "model.model.layers.2.mlp.down_proj.key_space.upper" in keys
    assert "model.model.layers.0.mlp.gate_proj.neuron_adjust.permutation" in keys


def test_dtype_preserved_in_weights(built):
    from safetensors import safe_open

    for arch, (dtype, _) in ARCH_CASES.items():
        ckpt = built["archs"][arch]["ckpt"]
        cfg = json.loads((ckpt / "config.json").read_text())
        assert cfg["dtype"] == dtype
        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            emb = [k for k in f.keys() if "emb" in k or "wte" in k][0]
            assert f.get_tensor(emb).dtype == DTYPES[dtype]


def test_model_card(built):
    from huggingface_hub import ModelCard

    card = ModelCard.load(built["archs"]["llama"]["ckpt"] / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert "skill-editor" in data["tags"] and "unlearning" in data["tags"]
    assert "base_model" not in data  # a local base directory is not a Hub id
    text = card.text
    assert "trust_remote_code=True" in text
    assert "base weights are still present" in text
    assert "stochastic" in text  # sample mode
    assert "Effective Skill Unlearning through Intervention and Abstention" in text


# ---------------------------------------------------------------------------------------------
# determinism, atomicity, destination
# ---------------------------------------------------------------------------------------------


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_export_is_byte_identical(built, tmp_path):
    a = built["archs"]["llama"]
    cli("export", a["recipe"], "--stats", a["dir"] / "stats", "--out", tmp_path / "again")
    assert _tree(tmp_path / "again") == _tree(a["ckpt"])


def test_export_is_atomic(built, tmp_path, monkeypatch):
    import editor.export.hf as ex
    from editor.manifest import build_manifest
    from editor.pipeline import prepare

    a = built["archs"]["gpt2"]
    ed = a["edited"]
    job = prepare(a["recipe"])
    manifest = build_manifest(job.recipe, model_type=job.model_type, dtype="float32", edit=ed.edit, statistics=None)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "_save_tokenizer", boom)  # after the weights were written
    dest = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="disk full"):
        ex.export_hf(ed.model, ed.tokenizer, ed.edit, manifest, dest)
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []  # no temp dir left behind
    # an existing checkpoint survives a failed --overwrite
    dest.mkdir()
    (dest / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        ex.export_hf(ed.model, ed.tokenizer, ed.edit, manifest, dest, overwrite=True)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_non_empty_destination_needs_overwrite(built, tmp_path):
    a = built["archs"]["gpt2"]
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "something").write_text("x")
    res = CliRunner().invoke(main, ["export", str(a["recipe"]), "--stats", str(a["dir"] / "stats"), "--out", str(dest)])
    assert res.exit_code == 2
    assert "not empty" in res.output and "--overwrite" in res.output
    assert [p.name for p in dest.iterdir()] == ["something"]
    cli("export", a["recipe"], "--stats", a["dir"] / "stats", "--out", dest, "--overwrite")
    assert not (dest / "something").exists() and (dest / "skill_editor.json").exists()


# ---------------------------------------------------------------------------------------------
# inspect / restore
# ---------------------------------------------------------------------------------------------


def test_inspect_reports_the_edit(built):
    res = CliRunner().invoke(main, ["inspect", str(built["archs"]["llama"]["ckpt"])])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "neuron_adjust, key_space" in out and "key space:  layer 2" in out and "'No.'" in out
    assert "verification: OK" in out


def test_inspect_catches_a_changed_byte_and_a_missing_file(built, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(built["archs"]["gpt2"]["ckpt"], ckpt)
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-3] ^= 0x01  # a weight byte, not the header
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    (ckpt / "tokenizer_config.json").unlink()
    (ckpt / "extra.py").write_text("print('hi')\n")
    res = CliRunner().invoke(main, ["inspect", str(ckpt)])
    assert res.exit_code == 1
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert any("model.safetensors: sha256 mismatch" in e for e in errors)
    assert any("tokenizer_config.json: missing" in e for e in errors)
    assert any("extra.py: not listed" in e for e in errors)


def test_inspect_catches_patch_tampering_even_with_rehashed_manifest(built, variants, tmp_path):
    from editor.checkpoint import verify
    from editor.manifest import MANIFEST, file_digests

    ckpt = tmp_path / "ckpt"
    shutil.copytree(variants["value"], ckpt)
    m = json.loads((ckpt / MANIFEST).read_text())
    m["files"] = file_digests(ckpt)  # an attacker re-hashes the files
    (ckpt / MANIFEST).write_text(json.dumps(m))
    rep = verify(ckpt)
    assert not rep.ok and any("patch_digest" in p for p in rep.problems)
    assert any("missing" in p for p in verify(variants["missing"]).problems)


@pytest.mark.parametrize("arch", sorted(ARCH_CASES))
def test_restore_is_bit_identical_to_base(built, variants, clean, arch):
    restored = Path(variants["restored"][arch])
    base = load_file(str(built["archs"][arch]["dir"] / "model" / "model.safetensors"))
    got = load_file(str(restored / "model.safetensors"))
    assert set(got) == set(base)
    for k in base:
        assert got[k].dtype == base[k].dtype and torch.equal(got[k], base[k]), k
    cfg = json.loads((restored / "config.json").read_text())
    assert cfg["model_type"] == arch and "auto_map" not in cfg and "skill_editor" not in cfg
    assert not list(restored.glob("*.py")) and (restored / "tokenizer.json").exists()
    assert (restored / "generation_config.json").exists()
    r = clean[f"{arch}-restored"]
    assert "error" not in r, r
    assert torch.equal(_saved(clean, f"{arch}-restored")["logits"], _saved(clean, f"{arch}-base")["logits"])


def test_restore_cli_refuses_a_plain_checkpoint(built, tmp_path):
    res = CliRunner().invoke(main, ["restore", str(built["prune"]["ckpt"]), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "cannot be restored" in res.output
    res = CliRunner().invoke(main, ["restore", str(built["archs"]["gpt2"]["ckpt"]), "--out", str(tmp_path / "y")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "y" / "model.safetensors").exists()


@pytest.mark.parametrize("body", [
    "neuron_adjust: {forget: forget, retain: retain, top_percent: 5, mode: expected}\n",
    "key_space: {forget: forget, layer: 0, scale: 1.5}\n",
], ids=["na-only", "ksd-only"])
def test_single_method_exports(built, tmp_path, body):
    from editor.checkpoint import verify
    from editor.runtime.modeling_skill_editor import SkillEditorForCausalLM

    shutil.copytree(built["archs"]["gpt2"]["dir"] / "model", tmp_path / "model")
    recipe = tiny_project(tmp_path, body)
    cli("profile", recipe, "--out", tmp_path / "stats", "--quiet")
    cli("export", recipe, "--stats", tmp_path / "stats", "--out", tmp_path / "ckpt")
    rep = verify(tmp_path / "ckpt")
    assert rep.ok, rep.problems
    m = rep.manifest["edit"]
    assert ("neuron_adjust" in m) == body.startswith("neuron_adjust") and ("key_space" in m) == body.startswith("key_space")
    loaded = SkillEditorForCausalLM.from_pretrained(str(tmp_path / "ckpt")).eval()
    with torch.no_grad():
        out = loaded(**built["inputs"])
    assert (out.abstained is not None) == body.startswith("key_space")


def _stats_digest(path) -> str:
    """The statistics' content digest, written out literally: sha256 of the sorted metadata JSON,
    then per tensor (sorted by name) [name, dtype, shape] as JSON and the raw bytes."""
    import hashlib

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        h = hashlib.sha256(json.dumps(f.metadata(), sort_keys=True).encode())
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_restore_streams_sharded_in_and_out(built, tmp_path):
    """A sharded checkpoint restored with small output shards: every output shard is written on its
    own (one ``save_file`` per shard, holding only that shard's tensors), the index maps every
    tensor, and the tensors equal the base model's bit for bit."""
    import safetensors.torch as st_torch

    from editor.checkpoint import INDEX, restore
    from editor.pipeline import export_recipe

    arch = "llama"
    d = built["archs"][arch]["dir"]
    sharded = tmp_path / "sharded"
    export_recipe(built["archs"][arch]["recipe"], d / "stats", sharded, max_shard_size="40KB")
    assert (sharded / INDEX).exists(), "the input checkpoint is sharded"
    writes = []
    real = st_torch.save_file

    def spy(tensors, filename, metadata=None):
        writes.append((Path(filename).name, sorted(tensors)))
        return real(tensors, filename, metadata=metadata)

    st_torch.save_file = spy
    try:
        out = restore(sharded, tmp_path / "restored", max_shard_size="30KB")
    finally:
        st_torch.save_file = real
    index = json.loads((out / INDEX).read_text())
    assert len(writes) > 2 and len({w[0] for w in writes}) == len(writes)
    assert {n for _, names in writes for n in names} == set(index["weight_map"])
    for fname, names in writes:
        assert all(index["weight_map"][n] == fname for n in names)
    base = load_file(str(d / "model" / "model.safetensors"))
    got = {}
    for fname, _ in writes:
        got.update(load_file(str(out / fname)))
    assert set(got) == set(base)
    for k in base:
        assert got[k].dtype == base[k].dtype and torch.equal(got[k], base[k]), k
