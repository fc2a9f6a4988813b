"""``export --stats`` refuses statistics of another model or other data in one line (issue #15,
item 3): the identity recorded in ``stats.safetensors`` (``editor.model.identity``: architecture,
weights' fingerprint, dtype, truncation; the sets' fingerprints) is compared field by field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from editor.cli import main
from editor.profile.stats import check_identity, load_stats
from tests.helpers import FORGET, cli, tiny_project
from tests.tiny import save_tiny

BODY = """\
neuron_adjust: {forget: forget, retain: retain, top_percent: 10, mode: expected, seed: 0}
key_space: {forget: forget, layer: -1, scale: 2.0}
"""


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """Project A profiled; its statistics are what every other recipe is exported against."""
    root = tmp_path_factory.mktemp("prov")
    recipe = tiny_project(root / "a", BODY)
    cli("profile", recipe, "--out", root / "a" / "stats", "--quiet", "--threads", "1")
    return root, recipe, root / "a" / "stats"


def _export(recipe, stats, out):
    return CliRunner().invoke(main, ["export", str(recipe), "--stats", str(stats), "--out", str(out), "--quiet",
                                     "--threads", "1"])


def _refused(res, out: Path, *words):
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and line.startswith("error: --stats"), line
    for w in words:
        assert w in line, line
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_identity_is_recorded(profiled):
    _, _, stats = profiled
    with safe_open(str(stats / "stats.safetensors"), "pt") as f:
        ident = json.loads(f.metadata()["identity"])
    assert ident["model_type"] == "llama" and ident["num_layers"] == 3 and ident["dtype"] == "float32"
    assert ident["max_length"] == 32 and len(ident["weights"]) == 64 and ident["model"] == "model"


def test_same_shape_statistics_of_another_model_are_refused(profiled):
    root, _, stats = profiled
    other = tiny_project(root / "seed1", BODY, seed=1)  # same architecture and sizes, other weights
    _refused(_export(other, stats, root / "seed1" / "ck"), root / "seed1" / "ck", "weights")


def test_statistics_of_another_architecture_are_refused_before_any_weight(profiled, monkeypatch):
    import editor.pipeline as pipeline

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(pipeline, "load_model", no_weights)
    root, _, stats = profiled
    other = tiny_project(root / "gpt2", BODY, arch="gpt2")
    _refused(_export(other, stats, root / "gpt2" / "ck"), root / "gpt2" / "ck", "model_type")
    save_tiny("llama", root / "shallow" / "model", num_hidden_layers=2)  # fewer layers: once a missing-tensor error
    other = tiny_project(root / "shallow", BODY)
    _refused(_export(other, stats, root / "shallow" / "ck"), root / "shallow" / "ck", "num_layers")


def test_other_data_dtype_or_truncation_are_refused(profiled):
    root, recipe, stats = profiled
    model = recipe.parent / "model"
    cases = {
        "data": (dict(files={"forget": FORGET[::-1], "retain": FORGET[:0] + ["x y"] * 4 + ["a b"] * 4}), "data set 'forget' differs"),
        "dtype": (dict(dtype="bfloat16"), "dtype"),
        "trunc": (dict(profile="{batch_size: 4, max_length: 16}"), "max_length"),
        "sets": (dict(sets={"forget": "{path: forget.jsonl}", "retain": "{path: retain.jsonl}",
                            "more": "{path: retain.jsonl}"}), "no data set 'more'"),
    }
    for name, (kw, word) in cases.items():
        d = root / f"case-{name}"
        d.mkdir()
        (d / "model").symlink_to(model)  # the very same model
        body = BODY.replace("retain: retain,", "retain: [retain, more],") if name == "sets" else BODY
        r = tiny_project(d, body, **kw)
        _refused(_export(r, stats, d / "ck"), d / "ck", word)


def test_the_same_model_named_differently_is_accepted(profiled, tmp_path):
    root, recipe, stats = profiled
    d = tmp_path / "elsewhere"
    d.mkdir()
    for f in ("forget.jsonl", "retain.jsonl"):
        (d / f).write_bytes((recipe.parent / f).read_bytes())
    text = recipe.read_text().replace("model: model", f"model: {recipe.parent / 'model'}")
    (d / "recipe.yaml").write_text(text)
    res = _export(d / "recipe.yaml", stats, d / "ck")
    assert res.exit_code == 0, res.output


def test_legacy_statistics_without_identity_fall_back_to_the_model_name(profiled):
    _, _, stats = profiled
    st = load_stats(stats)
    st.metadata.pop("identity")
    check_identity(st, {"model": "model", "weights": "x" * 64})
    with pytest.raises(Exception, match="another model"):
        check_identity(st, {"model": "other/model", "weights": "x" * 64})
