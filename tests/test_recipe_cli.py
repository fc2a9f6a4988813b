"""Recipe validation, data errors and the `profile` command end to end (offline, tiny model)."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors import safe_open

from editor.cli import main
from tests.helpers import write_jsonl
from tests.tiny import save_tiny


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe")
    save_tiny("llama", d / "model")
    write_jsonl(d / "data.jsonl", [row for i in range(12) for row in (
        {"prompt": f"Q: {i}+{i + 1}=", "answer": str(2 * i + 1), "skill": "math"},
        {"prompt": f"say {chr(97 + i) * 3}", "answer": "ok", "skill": "words"})])
    write_jsonl(d / "one.jsonl", [{"prompt": "only", "answer": "1"}])
    (d / "empty.jsonl").write_text("")
    (d / "bad.jsonl").write_text('{"prompt": "x"}\nnot json\n')
    return d


def base_recipe():
    return {
        "model": "model",
        "data": {
            "m": {"path": "data.jsonl", "text": "{prompt}{answer}", "where": {"skill": "math"}},
            "mq": {"path": "data.jsonl", "text": "{prompt}", "where": {"skill": "math"}},
            "w": {"path": "data.jsonl", "text": "{prompt}{answer}", "where": {"skill": "words"}},
        },
        "profile": {"batch_size": 4, "max_length": 32},
        "neuron_adjust": {"forget": "m", "retain": "w", "top_percent": 5, "mode": "expected"},
        "key_space": {"forget": "mq", "layer": -1, "scale": 1.5},
    }


def write(d, recipe, name="r.yaml"):
    p = d / name
    p.write_text(yaml.safe_dump(recipe))
    return p


def run_profile(d, recipe):
    p = write(d, recipe)
    out = d / "out-bad"
    res = CliRunner().invoke(main, ["profile", str(p), "--out", str(out), "--quiet"])
    return res, out


def mutate(path, value):
    r = base_recipe()
    node = r
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[k]
    if value is KeyError:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return r


BAD = [
    ("unknown top-level key", mutate("colour", "blue"), "colour: unknown key"),
    ("unknown nested key", mutate("neuron_adjust.topp", 3), "neuron_adjust.topp: unknown key"),
    ("wrong type", mutate("profile.batch_size", "eight"), "profile.batch_size"),
    ("top_percent zero", mutate("neuron_adjust.top_percent", 0), "neuron_adjust.top_percent"),
    ("top_percent above 100", mutate("neuron_adjust.top_percent", 101), "neuron_adjust.top_percent"),
    ("undefined data set", mutate("neuron_adjust.retain", "nope"), "neuron_adjust.retain: data set 'nope'"),
    ("ksd layer out of range", mutate("key_space.layer", 7), "key_space.layer: layer 7 is out of range"),
    ("ksd negative layer out of range", mutate("key_space.layer", -4), "key_space.layer"),
    ("bad scale", mutate("key_space.scale", -1), "key_space.scale"),
    ("bad check", mutate("key_space.check", "sometimes"), "key_space.check"),
    ("bad device", mutate("device", "gpu0"), "device"),
    ("missing field", mutate("data.m.text", "{question}"), "data.m.text: data.jsonl line 1 has no field 'question'"),
    # numbered by the file's lines, also after `where` kept every other record
    ("missing field after where", mutate("data.w.text", "{question}"), "data.w.text: data.jsonl line 2 has no field 'question'"),
    ("missing file", mutate("data.m.path", "nope.jsonl"), "data.m: file not found"),
    ("empty set", mutate("data.m.path", "empty.jsonl"), "data.m: the set is empty"),
    ("one-sample set", mutate("data.m", {"path": "one.jsonl", "text": "{prompt}"}), "at least 2 are needed"),
    ("invalid json", mutate("data.m", {"path": "bad.jsonl", "text": "{prompt}"}), "line 2 is not valid JSON"),
    ("filter on absent field", mutate("data.m.where", {"lang": "fr"}), "data.m.where"),
    ("missing model", mutate("model", "does-not-exist-locally"), "model:"),
]


@pytest.mark.parametrize("label,recipe,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_one_line_and_nothing_created(workdir, label, recipe, needle):
    res, out = run_profile(workdir, recipe)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert lines[0].startswith("error: ")
    assert needle in lines[0], lines[0]
    assert not out.exists()


def test_unsupported_architecture(tmp_path, workdir):
    from transformers import AutoConfig

    AutoConfig.for_model("bert", vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32).save_pretrained(tmp_path / "bert")
    r = base_recipe()
    r["model"] = str(tmp_path / "bert")
    for s in r["data"].values():
        s["path"] = str(workdir / "data.jsonl")
    res, out = run_profile(tmp_path, r)
    assert res.exit_code == 2
    assert "unsupported architecture 'bert'; supported:" in res.output and "llama" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_yaml_syntax_error(workdir):
    p = workdir / "broken.yaml"
    p.write_text("model: [unclosed\n")
    res = CliRunner().invoke(main, ["profile", str(p), "--out", str(workdir / "o2")])
    assert res.exit_code == 2 and "not valid YAML" in res.output


def test_profile_writes_stats_file(workdir):
    p = write(workdir, base_recipe(), "good.yaml")
    out = workdir / "stats-out"
    env_code = (
        "import os, sys; os.environ['HF_HUB_OFFLINE']='1'; from editor.cli import main; "
        f"sys.argv=['skill-editor','profile',{str(p)!r},'--out',{str(out)!r},'--quiet']; main()"
    )
    res = subprocess.run([sys.executable, "-c", env_code], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    f = out / "stats.safetensors"
    with safe_open(str(f), framework="pt") as st:
        meta = st.metadata()
        keys = set(st.keys())
        assert meta["format"] == "skill-editor/stats"
        assert meta["model"] == "model"
        sets = json.loads(meta["sets"])
        assert set(sets) == {"m", "mq", "w", "mq@neuron_adjust"}
        for name in ("m", "mq", "w"):
            info = sets[name]
            assert {"source", "split", "template", "texts", "tokens", "fingerprint"} <= set(info)
            assert info["texts"] == 12
        for s in ("m", "w"):
            for layer in range(3):
                for kind in ("pre", "key"):
                    c = st.get_tensor(f"{s}.layers.{layer}.{kind}.count")
                    assert c.dtype == torch.int64 and c.shape == ()
                    for stat in ("mean", "std", "min", "max"):
                        t = st.get_tensor(f"{s}.layers.{layer}.{kind}.{stat}")
                        assert t.dtype == torch.float32 and t.shape == (48,)
        assert int(st.get_tensor("m.layers.0.key.count")) == 12
        assert f"m.layers.2.pre.mean" in keys
    # refuses to overwrite without --overwrite
    res2 = CliRunner().invoke(main, ["profile", str(p), "--out", str(out), "--quiet"])
    assert res2.exit_code == 2 and "--overwrite" in res2.output


def test_nan_activation_names_layer(tmp_path):
    model = save_tiny("llama", tmp_path / "model")
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "model")
    write_jsonl(tmp_path / "data.jsonl", [{"prompt": f"p{i}", "answer": "a", "skill": "math" if i % 2 else "words"}
                                          for i in range(4)])
    r = {"model": "model", "data": {"a": {"path": "data.jsonl", "text": "{prompt}"}}}
    res, out = run_profile(tmp_path, r)
    assert res.exit_code == 2
    assert "layer 1" in res.output and "NaN" in res.output
    assert not out.exists()


def test_relative_paths_resolve_against_recipe(workdir, tmp_path, monkeypatch):
    from editor.recipe import load_recipe

    p = write(workdir, base_recipe(), "rel.yaml")
    monkeypatch.chdir(tmp_path)
    r = load_recipe(p)
    assert r.resolve("data.jsonl") == workdir / "data.jsonl"
    from editor.model.loading import model_source

    assert model_source(r).ref == str(workdir / "model")


def test_help_on_each_command():
    runner = CliRunner()
    res = runner.invoke(main, ["--help"])
    assert res.exit_code == 0
    for cmd in main.commands:
        r = runner.invoke(main, [cmd, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output


def test_statistics_and_export_identical_in_another_checkout(workdir, tmp_path):
    """Provenance records data paths as the recipe wrote them: the same project profiled and
    exported from two directories gives byte-identical statistics and checkpoints."""
    import shutil

    from editor.pipeline import export_recipe, profile_recipe

    outs = []
    for name in ("a", "b"):
        d = tmp_path / name / "project"
        d.mkdir(parents=True)
        shutil.copytree(workdir / "model", d / "model")
        shutil.copy(workdir / "data.jsonl", d / "data.jsonl")
        p = write(d, base_recipe(), "r.yaml")
        profile_recipe(p, d / "stats", progress=False)
        export_recipe(p, d / "stats", d / "ckpt")
        outs.append(d)
    a, b = outs
    # the statistics: same metadata and tensors (safetensors orders the metadata map itself)
    got = []
    for d in outs:
        with safe_open(str(d / "stats" / "stats.safetensors"), framework="pt") as st:
            got.append((st.metadata(), {k: st.get_tensor(k) for k in st.keys()}))
    assert got[0][0] == got[1][0]
    assert json.loads(got[0][0]["sets"])["m"]["source"] == "data.jsonl"
    assert got[0][1].keys() == got[1][1].keys() and all(torch.equal(got[0][1][k], got[1][1][k]) for k in got[0][1])
    files = sorted(f.name for f in (a / "ckpt").iterdir())
    assert files == sorted(f.name for f in (b / "ckpt").iterdir())
    for f in files:
        assert (a / "ckpt" / f).read_bytes() == (b / "ckpt" / f).read_bytes(), f


def test_accelerator_load_goes_straight_to_the_device(workdir, monkeypatch):
    """On an accelerator the weights load with a one-device ``device_map`` (no host copy, no
    ``.to()`` afterwards); on the CPU nothing changes. No GPU here: ``from_pretrained`` is wrapped
    to record its arguments and load on the CPU (a ``.to("cuda:1")`` would fail on this machine)."""
    from transformers import AutoModelForCausalLM

    from editor.model.loading import load_model
    from editor.pipeline import prepare

    job = prepare(write(workdir, base_recipe(), "device.yaml"))
    calls = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def fake(cls, path, **kw):
        calls.append(dict(kw))
        kw.pop("device_map", None)
        return real(cls, path, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(fake))
    model = load_model(job.recipe, job.config, device="cuda:1")
    assert calls[-1]["device_map"] == {"": "cuda:1"}
    assert next(model.parameters()).device.type == "cpu"
    load_model(job.recipe, job.config, device="cpu")
    assert "device_map" not in calls[-1]
