"""The KV cache's name (issue #18, item 6): transformers 5.24 renamed ``past_key_values`` to ``cache``
and keeps the old name as a deprecated alias until 5.40. The shipped runtime (and the ONNX exporter,
``tests/test_onnx_scale.py``) must use the name the installed release supports, so that exported
checkpoints keep loading and generating on the later releases of the declared range.

The alias announces itself in two ways: ``deprecate_kwarg`` warns (FutureWarning) when a ``forward``
gets ``past_key_values=``, and ``ModelOutput`` logs through ``transformers.utils.generic.logger``
when an output is built with, read by or asked for ``past_key_values``. Both are recorded here
(the logger's ``warning_once`` would say it only once per process, so it is replaced)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from editor.runtime.modeling_skill_editor import CACHE_KEY
from tests.helpers import patched_model


@pytest.fixture
def alias_uses(monkeypatch):
    """Every use of the deprecated cache alias while the test runs: a list of messages."""
    from transformers.utils import generic

    seen: list[str] = []
    logger = generic.logger

    def record(msg, *args, **kwargs):
        if "past_key_values" in str(msg):
            seen.append(str(msg))

    monkeypatch.setattr(logger, "warning_once", record)
    monkeypatch.setattr(logger, "warning", record)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield seen
    seen += [str(w.message) for w in caught if "past_key_values" in str(w.message)]


def test_the_recorder_sees_the_alias(alias_uses):
    """The fixture is not blind: on a release with the rename, the alias is reported."""
    if CACHE_KEY != "cache":
        pytest.skip("this transformers release has no cache alias")
    out = CausalLMOutputWithPast(logits=torch.zeros(1), past_key_values=None)
    out.get("past_key_values")
    assert alias_uses


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_runtime_forward_and_generate_use_the_supported_name(alias_uses, arch):
    model, tok = patched_model(arch, "expected")
    enc = tok(["What is 2+2?", "Hello there"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**enc, use_cache=True)
        cache = out[CACHE_KEY]
        assert cache is not None and out.abstained is not None
        # a cached step the way generate makes it: the cache under the supported name
        mask = torch.cat([enc["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
        step = model(input_ids=out.logits[:, -1].argmax(-1)[:, None], attention_mask=mask, use_cache=True,
                     **{CACHE_KEY: cache})
        assert step.logits.shape[1] == 1
        gen = model.generate(**enc, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert gen.sequences.shape[0] == 2
    assert alias_uses == []


def test_cached_generation_equals_uncached(arch="llama"):
    """The cache really travels under its new name: greedy with the KV cache equals recomputing the
    whole sequence at every step."""
    model, tok = patched_model(arch, "expected", ksd=False)
    enc = tok(["Hello there"], return_tensors="pt")
    with torch.no_grad():
        cached = model.generate(**enc, max_new_tokens=6, do_sample=False)
        plain = model.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_onnx_export_module_uses_the_supported_name(alias_uses):
    """The exporter's traced function (and the validation's PyTorch calls, through the same
    ``forward_kwargs``) passes the cache under the supported name and reads it back by it."""
    from editor.export.onnx import OnnxExportModule, _example_inputs, _past_shapes

    model, tok = patched_model("llama", "expected")
    cpu = torch.device("cpu")
    n, shapes, dtype = _past_shapes(model.model, cpu)
    ids, mask, pos, past = _example_inputs(model.model, shapes, dtype, cpu)
    with torch.no_grad():
        out = OnnxExportModule(model, n).eval()(ids, mask, pos, past)
    assert len(out) == 1 + 2 * n + 1
    assert out[0].shape == (ids.shape[0], 1, model.config.text_config.vocab_size)  # logits of the last position
    assert out[1].shape[2] == mask.shape[1]  # the present cache holds past + new positions
    assert alias_uses == []


def test_model_card_states_the_tested_releases_and_the_logits_shape():
    import transformers

    from editor.export.card import build_card

    manifest = {"kind": "patched", "tool_version": "0", "base_model": {"model": "m", "model_type": "llama"},
                "edit": {"methods": ["key_space"], "key_space": {"forget": "f", "layers": [1], "refusal": "No."}}}
    want = f"Tested with: transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}"
    hf = str(build_card(manifest))
    assert want in hf and "`cache` from 5.24" in hf and "5.40" in hf
    onnx = str(build_card(manifest, fmt="onnx"))
    assert want in onnx and "ONNX Runtime only" in onnx
    assert "`[batch, 1, vocab]`: the last position only" in onnx
    assert "`[batch, sequence, vocab]`" in str(build_card({**manifest, "onnx": {"logits": "all"}}, fmt="onnx"))
