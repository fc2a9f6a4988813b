"""The offline dry run of every paper recipe against config-only model directories (no weights,
no network, nothing written), and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from editor.dryrun import KNOWN_DATASETS, dry_run, model_shape, parameter_count
from editor.errors import EditorError
from editor.recipe import load_recipe
from tests.helpers import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "recipes" / "paper"
CONFIGS = Path(__file__).resolve().parent / "configs"
HUB_TO_DIR = {
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b",
    "meta-llama/Llama-2-7b-hf": "llama-2-7b",
    "google/gemma-2b": "gemma-2b",
}
RECIPES = sorted(PAPER.glob("*.yaml"))

# what the published configs give: layers, d_ff, total neurons, parameters (billions)
SHAPES = {
    "llama-3-8b": (32, 14336, 458752, "8.03"),
    "llama-2-7b": (32, 11008, 352256, "6.74"),
    "gemma-2b": (18, 16384, 294912, "2.51"),
}
# n = max(1, round(p·N/100))
NEURONS = {
    ("llama-3-8b", 3.0): 13763,
    ("llama-2-7b", 3.0): 10568,
    ("gemma-2b", 3.0): 8847,
    ("llama-3-8b", 0.5): 2294,
}


def _local_copy(recipe: Path, tmp_path: Path) -> tuple[Path, str]:
    """The recipe with ``model:`` pointing at the config-only directory; data stay Hub ids."""
    obj = yaml.safe_load(recipe.read_text())
    short = HUB_TO_DIR[obj["model"]]
    obj["model"] = str(CONFIGS / short)
    out = tmp_path / recipe.name
    out.write_text(yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))
    return out, short


def _tree(p: Path) -> list[str]:
    return sorted(str(x.relative_to(p)) for x in p.rglob("*"))


def test_paper_recipe_set_is_complete():
    names = {p.stem for p in RECIPES}
    for model in ("llama-3-8b", "llama-2-7b", "gemma-2b"):
        for forget in ("gsm8k", "mbpp"):
            for method in ("na", "ksd"):
                assert f"{model}-forget-{forget}-{method}" in names
    for lang in ("en", "de", "es", "ar", "hi", "vi", "zh"):
        assert f"llama-3-8b-forget-mlqa-{lang}-na" in names and f"llama-3-8b-forget-mlqa-{lang}-ksd" in names
    assert len(RECIPES) == 26


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_paper_recipe_settings(recipe):
    r = load_recipe(recipe)
    assert r.model in HUB_TO_DIR and r.dtype == "bfloat16"
    assert r.export.out.startswith("../../outputs/paper/")
    for spec in r.data.values():
        assert spec.path in ("openai/gsm8k", "google-research-datasets/mbpp", "facebook/mlqa")
        want_split = "validation" if spec.path == "facebook/mlqa" else "train"  # probe splits; tests are for scoring
        assert spec.split == want_split
        assert spec.name == {"openai/gsm8k": "main", "google-research-datasets/mbpp": "full"}.get(spec.path, spec.name)
    stem = recipe.stem
    if stem.endswith("-na"):
        assert r.neuron_adjust and not r.key_space
        assert r.neuron_adjust.top_percent == (0.5 if "mlqa" in stem else 3.0)
        forget = r.data[r.neuron_adjust.forget]
        if "forget-gsm8k" in stem:
            assert forget.text == "{answer}" and r.data[r.neuron_adjust.retain].text == "{code}"
        if "forget-mbpp" in stem:
            assert forget.text == "{code}" and r.data[r.neuron_adjust.retain].text == "{answer}"
        if "mlqa" in stem:
            lang = stem.split("-")[-2]
            assert forget.name == f"mlqa.{lang}.{lang}" and len(r.neuron_adjust.retain_sets) == 6
    else:
        assert r.key_space and not r.neuron_adjust and r.key_space.layer == -1
        assert r.key_space.scale == (1.4 if "forget-mbpp" in stem else 2.0)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_dry_run_every_paper_recipe_offline(recipe, tmp_path):
    local, short = _local_copy(recipe, tmp_path)
    before = _tree(tmp_path)
    plan = dry_run(local)
    assert _tree(tmp_path) == before  # nothing written
    assert not load_recipe(local).out_dir().exists()  # no export directory either
    layers, d_ff, total, params = SHAPES[short]
    assert f"{layers} layers × d_ff {d_ff} = {total} FFL neurons" in plan
    assert f"≈ {params} B parameters" in plan
    r = load_recipe(recipe)
    if r.neuron_adjust:
        n = NEURONS[(short, r.neuron_adjust.top_percent)]
        assert f"of {total} neurons → {n} neurons" in plan
    if r.key_space:
        assert f"layer -1 → {layers - 1} (of 0..{layers - 1})" in plan
        assert f"({d_ff} dims)" in plan
    for name in r.data:
        assert f"  {name}: Hub " in plan
    assert "fields checked against the known schema" in plan
    assert "stats.safetensors ≈" in plan and "bfloat16 →" in plan


def test_llama3_gsm8k_na_plan_details(tmp_path):
    plan = dry_run(PAPER / "llama-3-8b-forget-gsm8k-na.yaml", model=CONFIGS / "llama-3-8b")
    assert "13763" in plan
    assert "top 3 % of 458752 neurons → 13763 neurons" in plan
    assert "gsm8k_answers: Hub openai/gsm8k (main), split train, limit 1000 → 1000 texts of 7473 rows" in plan
    assert "mbpp_code: Hub google-research-datasets/mbpp (full), split train → 374 texts of 374 rows" in plan
    assert "meta-llama/Meta-Llama-3-8B" in plan  # the recipe's model is still named
    assert "14.96 GiB" in plan  # 8.03 B parameters in bfloat16
    # 2 sets × 32 layers × 2 kinds × 14336 × 24 B of accumulators = 42 MiB
    assert "42.00 MiB of accumulators" in plan


def test_parameter_counts_match_published_sizes():
    from transformers import AutoConfig

    for short, (_, _, _, params) in SHAPES.items():
        cfg = AutoConfig.from_pretrained(CONFIGS / short)
        assert f"{parameter_count(cfg, gated=True) / 1e9:.2f}" == params
    s = model_shape(AutoConfig.from_pretrained(CONFIGS / "gemma-2b"))
    assert s["tied"] and s["kv_heads"] == 1 and s["head_dim"] == 256
    assert json.loads((CONFIGS / "llama-3-8b" / "config.json").read_text())["vocab_size"] == 128256


# ---------------------------------------------------------------------------------------------
# errors, and local data
# ---------------------------------------------------------------------------------------------


def _write(tmp_path: Path, obj: dict, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(obj, sort_keys=False))
    return p


def _base(**over) -> dict:
    obj = {
        "model": str(CONFIGS / "llama-3-8b"),
        "dtype": "bfloat16",
        "data": {
            "f": {"path": "openai/gsm8k", "name": "main", "split": "train", "text": "{answer}"},
            "r": {"path": "google-research-datasets/mbpp", "name": "full", "split": "train", "text": "{code}"},
        },
        "neuron_adjust": {"forget": "f", "retain": "r", "top_percent": 3.0},
    }
    obj.update(over)
    return obj


@pytest.mark.parametrize(
    "change,msg",
    [
        (lambda o: o["data"]["f"].update(text="Q: {questoin}"), "no field 'questoin'"),
        (lambda o: o["data"]["f"].update(split="validation"), "no split 'validation'"),
        (lambda o: o["data"]["f"].pop("name"), "needs a configuration name"),
        (lambda o: o["data"]["f"].update(name="mian"), "no configuration 'mian'"),
        (lambda o: o["data"]["r"].update(where={"lang": "py"}), "where: .* no field 'lang'"),
        (lambda o: o.update(key_space={"forget": "f", "layer": 32}), "layer 32 is out of range"),
        (lambda o: o["neuron_adjust"].update(top_percent=0), "top_percent"),
    ],
)
def test_dry_run_errors(tmp_path, change, msg):
    obj = _base()
    change(obj)
    with pytest.raises(EditorError, match=msg):
        dry_run(_write(tmp_path, obj))


def test_dry_run_unsupported_architecture(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
                                               "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100}))
    with pytest.raises(EditorError, match="unsupported architecture 'bert'; supported: .*llama"):
        dry_run(_write(tmp_path, _base(model=str(d))))


def test_dry_run_missing_config_says_what_it_needs(tmp_path):
    with pytest.raises(EditorError, match="reads only config.json and never downloads"):
        dry_run(_write(tmp_path, _base(model=str(tmp_path / "nowhere" / "model"))))
    with pytest.raises(EditorError, match="neither a local directory nor in the Hub cache"):
        dry_run(_write(tmp_path, _base(model="no-such-org/no-such-model-xyz")))


def test_dry_run_reads_a_hub_id_from_the_cache(tmp_path, monkeypatch):
    import huggingface_hub

    snap = tmp_path / "snapshot"
    snap.mkdir()
    (snap / "config.json").write_text((CONFIGS / "gemma-2b" / "config.json").read_text())
    calls = []

    def fake(repo_id, filename, revision=None, **kw):
        calls.append((repo_id, filename, revision))
        return str(snap / filename)

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", fake)
    plan = dry_run(PAPER / "gemma-2b-forget-mbpp-ksd.yaml")
    assert calls == [("google/gemma-2b", "config.json", None)]
    assert "18 layers × d_ff 16384 = 294912 FFL neurons" in plan and "layer -1 → 17" in plan


def test_dry_run_unknown_hub_dataset_is_reported_not_fetched(tmp_path):
    obj = _base()
    obj["data"]["r"] = {"path": "someone/private-code", "split": "train", "text": "{src}", "limit": 50}
    plan = dry_run(_write(tmp_path, obj))
    assert "r: Hub someone/private-code, split train, limit 50 → 50 texts" in plan
    assert "checked at run time" in plan


def test_dry_run_local_data(tmp_path):
    write_jsonl(tmp_path / "f.jsonl", [{"q": f"question {i}", "a": str(i)} for i in range(5)])
    (tmp_path / "r.csv").write_text("src,lang\nprint(1),py\nprint(2),py\nx=1,py\n")
    obj = _base()
    obj["data"] = {
        "f": {"path": "f.jsonl", "text": "{q} {a}"},
        "r": {"path": "r.csv", "text": "{src}"},
    }
    before = _tree(tmp_path)
    plan = dry_run(_write(tmp_path, obj))
    after = _tree(tmp_path)
    assert [x for x in after if x not in before] == ["r.yaml"]  # only the recipe this test wrote
    assert f"f: local {tmp_path / 'f.jsonl'}, split train → 5 texts" in plan and "read and rendered" in plan
    assert "r: local" in plan and "→ 3 texts" in plan and "header checked" in plan
    obj["data"]["f"]["text"] = "{q} {missing}"
    with pytest.raises(EditorError, match="f.jsonl line 1 has no field 'missing'"):
        dry_run(_write(tmp_path, obj))
    obj["data"]["f"]["text"] = "{q}"
    obj["data"]["r"]["text"] = "{code}"
    with pytest.raises(EditorError, match="r.csv has no field 'code'"):
        dry_run(_write(tmp_path, obj))
    obj["data"]["r"] = {"path": "missing.jsonl"}
    with pytest.raises(EditorError, match="file not found"):
        dry_run(_write(tmp_path, obj))


def test_dry_run_combined_methods_counts_the_na_pass(tmp_path):
    obj = _base()
    obj["data"]["q"] = {"path": "openai/gsm8k", "name": "main", "split": "train", "text": "Q: {question}\nA:", "limit": 10}
    obj["key_space"] = {"forget": "q", "layer": -2, "scale": 2.0}
    plan = dry_run(_write(tmp_path, obj))
    assert "layer -2 → 30" in plan
    assert "keys profiled again with Neuron Adjust active" in plan
    assert "statistics: 4 set(s)" in plan  # f, r, q and q with NA on


def test_known_schemas_cover_the_paper_benchmarks():
    assert set(KNOWN_DATASETS) >= {"openai/gsm8k", "google-research-datasets/mbpp", "facebook/mlqa", "cais/mmlu"}
    assert KNOWN_DATASETS["facebook/mlqa"]["configs"]["mlqa.en.en"]["splits"] == {"test": 11590, "validation": 1148}
    assert "train" not in KNOWN_DATASETS["facebook/mlqa"]["configs"]["mlqa.zh.zh"]["splits"]
