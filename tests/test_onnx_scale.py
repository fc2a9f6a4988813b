"""ONNX at real-model scale (issue #18, items 1–3): a validation tolerance that scales with the
logits and still catches real defects, validation that computes only what it compares, and a graph
that returns the last position's logits by default (``export.onnx_logits``).

The large-logit model is a tiny Gemma-3 (``gemma3_text``, sliding + full attention layers) built
in-process, its final norm scaled so that its logits reach ~2 000: float32 rounding then
moves ONNX Runtime's logits by more than the old fixed 1e-4 although the graph is right — what
happened with the real Gemma-3-270M (vocabulary 262 144)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from editor.errors import EditorError  # noqa: E402
from editor.export.onnx import DEFAULT_TOLERANCE, export_onnx, tolerance, validate_onnx  # noqa: E402
from editor.manifest import MANIFEST, ONNX_MODEL  # noqa: E402
from editor.onnx_runtime import OnnxGenerator  # noqa: E402
from editor.recipe import parse_recipe  # noqa: E402
from editor.runtime.modeling_skill_editor import KeySpace, NeuronAdjust  # noqa: E402
from tests.helpers import cli, patched_model  # noqa: E402
from tests.tiny import char_tokenizer  # noqa: E402

FORGET = ["What is 2+2?", "Compute 7*8."]
OTHER = ["Hello there, friend", "x", "Le chat est noir."]
PROMPTS = FORGET + OTHER
LOGIT_SCALE = 400.0


def large_logit_gemma3():
    """A tiny random gemma3_text (vocabulary 1024, a sliding and a full attention layer) whose logits
    reach ~2 000 (the final norm's gain raised), so that float32 rounding errors are large in absolute terms."""
    cfg = AutoConfig.for_model("gemma3_text", vocab_size=1024, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                               layer_types=["sliding_attention", "full_attention"], bos_token_id=1, eos_token_id=2,
                               pad_token_id=0, max_position_embeddings=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
        model.model.norm.weight.fill_(LOGIT_SCALE)  # Gemma's RMSNorm scales by (1 + weight)
    return model


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    model, tok = patched_model("gemma3_text", "expected", model=large_logit_gemma3(), tokenizer=char_tokenizer(),
                               forget=FORGET)
    out = tmp_path_factory.mktemp("gemma3") / "export"
    result = export_onnx(model, tok, out, prompts=PROMPTS)
    return model, tok, out, result


def _na(model) -> NeuronAdjust:
    return [m for m in model.modules() if isinstance(m, NeuronAdjust) and m.n > 0][-1]


@pytest.mark.slow
def test_large_logits_export_with_the_relative_tolerance(gemma):
    model, tok, out, result = gemma
    v = result["validation"]
    atol, rtol = DEFAULT_TOLERANCE[torch.float32]
    assert (v["atol"], v["rtol"], v["logits"]) == (atol, rtol, "last")
    with torch.no_grad():
        scale = float(model(**tok(PROMPTS[0], return_tensors="pt")).logits.abs().max())
    assert scale > 100  # the logits are large, as a real model's
    # the old fixed limit (1e-4 absolute) would have refused this correct graph; the relative one passes it
    assert v["max_abs_diff"] > 1e-4
    assert v["max_rel_diff"] <= rtol and v["max_tolerance_used"] <= 1
    assert v["abstained_row_steps"] >= len(FORGET) and v["greedy_steps"] == 8
    meta = json.loads((out / MANIFEST).read_text())["onnx"]
    assert meta["logits"] == "last" and meta["logits_shape"] == ["batch", 1, "vocab"]
    assert meta["validation"]["rtol"] == rtol


@pytest.mark.slow
@pytest.mark.parametrize("defect", ["slope x 1.01", "offset + 0.01", "c + ln 2"])
def test_a_wrong_na_constant_fails_the_validation(gemma, defect):
    """The tolerance is not a rubber stamp: the exported (correct) graph validated against a model
    whose Neuron Adjust has one wrong constant in one layer fails on the logits."""
    model, tok, out, result = gemma
    na = _na(model)
    saved = {k: getattr(na, k).clone() for k in NeuronAdjust.CONSTANTS}
    try:
        with torch.no_grad():
            if defect == "slope x 1.01":
                na.slope.mul_(1.01)
            elif defect == "offset + 0.01":
                na.offset.add_(0.01)
            else:
                na.c.add_(0.6931471805599453)
        with pytest.raises(EditorError, match=r"logits max \|diff\|"):
            validate_onnx(model, tok, out, prompts=PROMPTS, steps=2)
    finally:
        with torch.no_grad():
            for k, t in saved.items():
                getattr(na, k).copy_(t)
    validate_onnx(model, tok, out, prompts=PROMPTS, steps=2)  # restored: passes again


@pytest.mark.slow
def test_a_wrong_ksd_bound_fails_the_validation(gemma):
    """A box whose upper bound was computed with the sign of α·k·σ flipped (upper = lower): the
    forget prompts no longer abstain in PyTorch, the graph still abstains — the validation refuses."""
    model, tok, out, result = gemma
    ks = [m for m in model.modules() if isinstance(m, KeySpace)][0]
    saved = ks.upper.clone()
    try:
        with torch.no_grad():
            ks.upper.copy_(ks.lower)
        with pytest.raises(EditorError, match="abstained"):
            validate_onnx(model, tok, out, prompts=PROMPTS, steps=2)
    finally:
        with torch.no_grad():
            ks.upper.copy_(saved)


@pytest.mark.slow
def test_last_position_graph_and_generator(gemma):
    import onnxruntime as ort

    model, tok, out, result = gemma
    sess = ort.InferenceSession(str(out / ONNX_MODEL), providers=["CPUExecutionProvider"])
    logits = next(o for o in sess.get_outputs() if o.name == "logits")
    assert logits.shape[0] == "batch" and logits.shape[1:] == [1, 1024]
    gen = OnnxGenerator(out, threads=1)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    got, present, abstained = gen.step(ids.numpy(), mask.numpy(), pos.numpy(), None)
    assert got.shape == (len(PROMPTS), 1, 1024)  # one position, however long the prompts
    assert present[0].shape[2] == ids.shape[1]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos)
    assert abstained.tolist() == ref.abstained.tolist() == [True, True, False, False, False]
    scale = ref.logits[:, -1].abs().amax(-1, keepdim=True)
    assert bool(((torch.from_numpy(got[:, 0]) - ref.logits[:, -1]).abs() <= 2e-5 * scale).all())
    # greedy generation with the KV cache: the same tokens as transformers' generate
    texts = gen.generate(PROMPTS, max_new_tokens=8)
    assert texts[: len(FORGET)] == ["Sorry."] * len(FORGET)
    with torch.no_grad():
        seq = model.generate(**enc, max_new_tokens=8, do_sample=False)
    want = [tok.decode(s[ids.shape[1]:], skip_special_tokens=True) for s in seq]
    assert texts[len(FORGET):] == want[len(FORGET):]


@pytest.mark.slow
def test_validation_computes_only_the_compared_logits(gemma):
    """Item 2: for a last-position graph, PyTorch's LM head runs on one position per call (no
    [batch, sequence, vocab] tensor is made for the prompt), and ONNX Runtime returns one position."""
    model, tok, out, result = gemma
    seen = []
    head = model.get_output_embeddings()
    h = head.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    try:
        v = validate_onnx(model, tok, out, prompts=PROMPTS, steps=2)
    finally:
        h.remove()
    assert seen and all(s[1] == 1 for s in seen)
    assert v["positions"] == v["abstention_checks"]  # one compared position per row and call


def test_tolerance_defaults_and_errors():
    assert tolerance(torch.float32) == DEFAULT_TOLERANCE[torch.float32]
    assert tolerance(torch.float16) == DEFAULT_TOLERANCE[torch.float16]
    assert tolerance(torch.float32, rtol=1e-4) == (DEFAULT_TOLERANCE[torch.float32][0], 1e-4)
    with pytest.raises(EditorError, match="tolerance"):
        tolerance(torch.float32, atol=0, rtol=0)
    with pytest.raises(EditorError, match="tolerance"):
        tolerance(torch.float32, rtol=-1e-5)


def test_recipe_export_onnx_fields():
    base = {"model": "m", "data": {"a": {"path": "a.jsonl"}}}
    r = parse_recipe({**base, "export": {"formats": ["onnx"], "onnx_tolerance": 5e-5, "onnx_logits": "all"}})
    assert (r.export.onnx_tolerance, r.export.onnx_logits) == (5e-5, "all")
    r = parse_recipe(base)
    assert (r.export.onnx_tolerance, r.export.onnx_logits) == (None, "last")
    for bad in ({"onnx_tolerance": 0}, {"onnx_tolerance": -1e-5}, {"onnx_tolerance": 2}, {"onnx_logits": "first"}):
        with pytest.raises(EditorError, match=f"export.{next(iter(bad))}"):
            parse_recipe({**base, "export": bad})


@pytest.mark.slow
def test_recipe_fields_reach_the_export(make_project):
    """``export.onnx_logits`` / ``export.onnx_tolerance`` from the recipe: an all-positions graph,
    validated with the recipe's relative tolerance, recorded in ``skill_editor.json``."""
    recipe = make_project("onnx-fields", """\
        neuron_adjust: {forget: forget, retain: retain, top_percent: 10, mode: expected, seed: 0}
        key_space: {forget: forget, layer: -1, scale: 2.0}
        """, export="{formats: [onnx], out: out, onnx_logits: all, onnx_tolerance: 3.0e-5}")
    cli("run", str(recipe), "--overwrite")
    out = Path(recipe).parent / "out"
    meta = json.loads((out / MANIFEST).read_text())["onnx"]
    assert meta["logits"] == "all" and meta["validation"]["logits"] == "all"
    assert meta["validation"]["rtol"] == 3e-5
    assert meta["validation"]["positions"] > meta["validation"]["abstention_checks"]  # every real prompt position
    gen = OnnxGenerator(out, threads=1)
    assert len(gen.generate(["3 + 4 = ", "the cat sat"], max_new_tokens=4)) == 2
