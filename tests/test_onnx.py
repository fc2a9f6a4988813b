"""ONNX export (DESIGN §4): KV cache, NA (expected / hard) and KSD inside the graph, validated by
ONNX Runtime; the ORT greedy generator. Optional extra: skipped without onnx / onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import numpy as np  # noqa: E402

from editor.errors import EditorError  # noqa: E402
from editor.export.onnx import export_onnx, io_names, validate_onnx  # noqa: E402
from editor.manifest import MANIFEST, ONNX_DATA, ONNX_MODEL  # noqa: E402
from editor.onnx_runtime import OnnxGenerator  # noqa: E402
from editor.runtime.modeling_skill_editor import CACHE_KEY  # noqa: E402
from tests.helpers import patched_model  # noqa: E402
from tests.tiny import VOCAB, char_tokenizer, tiny_model  # noqa: E402

FORGET = ["What is 2+2?", "Compute 7*8."]
OTHER = ["Hello there, friend", "x", "Le chat est noir."]
REFUSAL = "Sorry."
MAX_NEW = 10


def build(arch: str, mode: str, *, ksd: bool = True, seed: int = 0):
    """A tiny model with a synthetic NA plan and a KSD box fitted on the keys of FORGET
    (``tests.helpers.patched_model``)."""
    return patched_model(arch, mode, ksd=ksd, forget=tuple(FORGET), refusal=REFUSAL, seed=seed)


def torch_greedy(model, tok, prompts, max_new=MAX_NEW) -> list[str]:
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=False)
    width = enc["input_ids"].shape[1]
    return [tok.decode(o[width:], skip_special_tokens=True) for o in out]


# (arch, NA mode, which logits the graph returns: the last position — the default — or all)
CASES = [("llama", "expected", "last"), ("qwen2", "hard", "all"), ("gpt2", "expected", "all"), ("gpt2", "hard", "last")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{m}-{k}" for a, m, k in CASES])
def exported(request, tmp_path_factory):
    arch, mode, logits = request.param
    model, tok = build(arch, mode)
    out = tmp_path_factory.mktemp(f"onnx-{arch}-{mode}") / "export"
    result = export_onnx(model, tok, out, prompts=FORGET + OTHER, logits=logits)
    assert result["validation"]["logits"] == logits
    return arch, mode, model, tok, out, result


@pytest.mark.slow
def test_export_files_and_validation(exported):
    arch, mode, model, tok, out, result = exported
    assert Path(result) == out and str(result) == str(out)  # path-like for callers that only want the path
    for name in (ONNX_MODEL, ONNX_DATA, MANIFEST, "tokenizer.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert not (out / "config.json").exists()  # it would change how AutoTokenizer reloads the tokenizer
    v = result["validation"]
    assert v["agree"] and v["max_abs_diff"] <= 1e-4 and v["greedy_steps"] >= 8
    assert v["abstained_row_steps"] >= len(FORGET)  # the forget prompts abstained (in both runtimes)
    assert result["export_seconds"] > 0 and result["files"][ONNX_DATA] > 0
    meta = json.loads((out / MANIFEST).read_text())
    assert meta["edit"]["neuron_adjust"]["mode"] == mode
    assert meta["edit"]["patch_digest"] == model.config.skill_editor["patch_digest"]
    assert meta["onnx"]["refusal"] == REFUSAL and meta["onnx"]["validation"]["agree"]
    from editor.io import sha256_file

    assert meta["files"] == {p.name: sha256_file(p) for p in out.iterdir() if p.name != MANIFEST}


@pytest.mark.slow
def test_graph_io(exported):
    import onnxruntime as ort

    arch, mode, model, tok, out, result = exported
    sess = ort.InferenceSession(str(out / ONNX_MODEL), providers=["CPUExecutionProvider"])
    n = model.model.config.num_hidden_layers
    want_in, want_out = io_names(n)
    assert [i.name for i in sess.get_inputs()] == want_in
    assert [o.name for o in sess.get_outputs()] == want_out
    shapes = {v.name: v.shape for v in list(sess.get_inputs()) + list(sess.get_outputs())}
    assert shapes["input_ids"] == ["batch", "sequence"]
    assert shapes["attention_mask"] == ["batch", "total_sequence"]
    assert shapes["past_key_values.0.key"][0] == "batch" and shapes["past_key_values.0.key"][2] == "past_sequence"
    assert shapes["present.0.value"][2] == "total_sequence"
    assert shapes["abstained"] == ["batch"]
    want_logits = ["batch", 1 if result["validation"]["logits"] == "last" else "sequence", VOCAB]
    assert shapes["logits"] == want_logits
    assert sess.get_outputs()[-1].type == "tensor(bool)"
    assert json.loads(sess.get_modelmeta().custom_metadata_map["skill_editor"])["patch_digest"] == model.config.skill_editor["patch_digest"]


@pytest.mark.slow
def test_ort_logits_and_abstention_match(exported):
    """Independent of the built-in validation: a left-padded batch mixing forget and other prompts,
    then two cached steps; logits within 1e-4 at every real position (an ``all`` graph) or at the
    last one (a ``last`` graph, which returns only that position), abstention per row identical."""
    arch, mode, model, tok, out, result = exported
    gen = OnnxGenerator(out, threads=1)
    prompts = [FORGET[0], OTHER[0], FORGET[1], OTHER[1]]
    enc = tok(prompts, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    logits, past, ab = gen.step(ids.numpy(), mask.numpy(), pos.numpy(), None)
    if result["validation"]["logits"] == "last":
        assert logits.shape == (len(prompts), 1, VOCAB)
        assert np.abs(logits[:, 0] - ref.logits[:, -1].numpy()).max() <= 1e-4
    else:
        real = mask.bool().numpy()
        assert logits.shape == tuple(ref.logits.shape)
        assert np.abs(logits - ref.logits.numpy())[real].max() <= 1e-4
    assert ab.tolist() == ref.abstained.tolist() == [True, False, True, False]
    cache = ref[CACHE_KEY]
    nxt = ref.logits[:, -1].argmax(-1)
    for _ in range(2):
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
        pos = pos[:, -1:] + 1
        with torch.no_grad():
            ref = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True, **{CACHE_KEY: cache})
        logits, past, ab = gen.step(nxt[:, None].numpy(), mask.numpy(), pos.numpy(), past)
        assert logits.shape == tuple(ref.logits.shape) == (len(prompts), 1, VOCAB)
        assert np.abs(logits - ref.logits.numpy()).max() <= 1e-4
        assert ab.tolist() == ref.abstained.tolist()
        assert past[0].shape[2] == mask.shape[1]
        cache, nxt = ref[CACHE_KEY], ref.logits[:, -1].argmax(-1)


@pytest.mark.slow
def test_generator_matches_torch_greedy(exported):
    arch, mode, model, tok, out, result = exported
    prompts = FORGET + OTHER
    got = OnnxGenerator(out, threads=1).generate(prompts, max_new_tokens=MAX_NEW)
    assert got[: len(FORGET)] == [REFUSAL] * len(FORGET)
    assert got == torch_greedy(model, tok, prompts)


def test_existing_destination_refused_before_export(tmp_path):
    model, tok = build("llama", "expected")
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(EditorError, match="not empty"):
        export_onnx(model, tok, tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_sample_mode_refused(tmp_path):
    model, tok = build("llama", "sample", ksd=False)
    with pytest.raises(EditorError, match="expected' or 'hard'"):
        export_onnx(model, tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bfloat16_refused_before_export(tmp_path):
    model, tok = build("llama", "expected", ksd=False)
    with pytest.raises(EditorError, match="bfloat16"):
        export_onnx(model.to(torch.bfloat16), tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_float16_export(tmp_path):
    """16-bit graphs validate with the 16-bit tolerance (5e-2 on the logits)."""
    model = tiny_model("gpt2", n_layer=1, dtype=torch.float16)
    tok = char_tokenizer()
    result = export_onnx(model, tok, tmp_path / "fp16", prompts=OTHER)
    assert result["validation"]["atol"] == 5e-2 and result["validation"]["max_abs_diff"] <= 5e-2
    assert json.loads((tmp_path / "fp16" / MANIFEST).read_text())["onnx"]["dtype"] == "float16"


@pytest.mark.slow
def test_plain_model_exports_without_abstention(tmp_path):
    """A base model (no edit): the same graph I/O, ``abstained`` all False."""
    model = tiny_model("llama", num_hidden_layers=1)
    tok = char_tokenizer()
    result = export_onnx(model, tok, tmp_path / "plain", prompts=OTHER, steps=8)
    # same model (and tokenizer state), same bytes (DESIGN §8), validation figures included
    export_onnx(model, tok, tmp_path / "again", prompts=OTHER, steps=8)
    from editor.io import sha256_file

    digests = [{p.name: sha256_file(p) for p in sorted((tmp_path / d).iterdir())} for d in ("plain", "again")]
    assert digests[0] == digests[1]
    assert result["validation"]["abstained_row_steps"] == 0
    meta = json.loads((tmp_path / "plain" / MANIFEST).read_text())
    assert "edit" not in meta and meta["onnx"]["num_layers"] == 1
    gen = OnnxGenerator(tmp_path / "plain", threads=1)
    assert gen.generate(OTHER, max_new_tokens=MAX_NEW) == torch_greedy(model, tok, OTHER)
    # the validation is not a rubber stamp: another model's weights fail it
    other = tiny_model("llama", seed=1, num_hidden_layers=1)
    with pytest.raises(EditorError, match="ONNX validation failed"):
        validate_onnx(other, tok, tmp_path / "plain", prompts=OTHER, steps=2)


# ---------------------------------------------------------------------------------------------
# the embedded testbed model (editor/testbed, committed)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_testbed_model_export(tmp_path):
    import yaml

    from editor import pipeline
    from editor.model.loading import load_model, load_tokenizer
    from editor.recipe import parse_recipe
    from editor.testbed import load_examples

    recipe_path = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
    raw = yaml.safe_load(recipe_path.read_text())
    raw["neuron_adjust"]["mode"] = "expected"
    raw.pop("evaluate", None)
    for spec in raw["data"].values():
        spec.setdefault("limit", 64)
    job = pipeline.prepare(parse_recipe(raw, base_dir=recipe_path.parent))
    tok = load_tokenizer(job.recipe)
    model = load_model(job.recipe, job.config)
    stats = pipeline.profile_job(job, model, tok, progress=False)
    ed = pipeline.edit_model(job, stats, model=model, tokenizer=tok)  # keeps the NA profile_job applied
    wrapped = ed.wrapped

    evals = load_examples("eval")
    math = [e["prompt"] for e in evals if e["skill"] == "math"][:3]
    other = [e["prompt"] for e in evals if e["skill"] != "math"][:3]
    result = export_onnx(wrapped, tok, tmp_path / "testbed", prompts=math + other)
    assert result["validation"]["agree"] and result["validation"]["max_abs_diff"] <= 1e-4
    print("testbed ONNX:", result["export_seconds"], "s,", result["files"])
    gen = OnnxGenerator(tmp_path / "testbed", threads=1)
    got = gen.generate(math + other, max_new_tokens=16)
    assert got == torch_greedy(wrapped, tok, math + other, max_new=16)
