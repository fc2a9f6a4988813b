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
