"""``key_space.detector: linear`` — the pooled linear detector (runtime ``KeyScore``).

Every expected decision comes from a literal reference written straight from the formula, on the
*unpatched* model: a forward pre-hook on each guarded layer's down projection records its input;
per row, the key is max-pooled over the positions where the attention mask is 1, dotted with the
layer's weight, the layer's bias added, summed over the guarded layers; the row abstains when the
sum is > 0 (a row without a real token never abstains). Nothing here reads the code under test to
compute an expectation.

The weights are random; the biases are set from the reference scores of the prompts *alone* (no
padding) so that half the prompts abstain and half do not, with a margin, spread over the guarded
layers (the runtime must sum them).
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from editor.model.arch import arch_spec
from editor.methods.key_space import LinearShare
from editor.patch import apply_key_space, build_edit, refusal_token_ids, wrap
from editor.plan import Plans
from tests import reference_methods as ref
from tests.helpers import pad, positions, random_rows, tiny_project
from tests.tiny import char_tokenizer, tiny_model

REFUSAL = "No."
REFUSAL_IDS = [40, 41, 42, 2]
NEW = 6
ARCHS = ["llama", "gpt2", "opt", "qwen2", "phi3"]  # gated, Conv1D, flat [B*S, d], gated, fused gate|up
MIN_MARGIN = 1e-3  # |reference score| of every prompt alone: no decision sits on the threshold


# ------------------------------------------------------------------------------------------------
# the literal reference
# ------------------------------------------------------------------------------------------------


def down_of(model, layer):
    _, _, down_path, _, _ = ref.LAYOUT[model.config.model_type]
    return ref.layers_of(model)[layer].get_submodule(down_path)


@contextmanager
def recorded_keys(model, layers):
    """{layer: [input of the down projection, one entry per forward call]} (float64 copies)."""
    rec = {layer: [] for layer in layers}
    handles = [down_of(model, layer).register_forward_pre_hook(
        lambda m, args, layer=layer: rec[layer].append(args[0].detach().double().clone())) for layer in layers]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def literal_scores(keys, mask, batch, seq, weights, biases):
    """Per row: Σ_layers (max over real positions of the key) · w + b; None for a row with no real
    token. ``keys``: {layer: the down projection's input of ONE call}, any layout ([B, S, d] or the
    flat [B*S, d] of OPT: row-major over batch then sequence); ``mask``: the call's attention mask
    (past + current columns) or None."""
    out = []
    for r in range(batch):
        real = [t for t in range(seq) if mask is None or int(mask[r, mask.shape[1] - seq + t]) == 1]
        if not real:
            out.append(None)
            continue
        total = 0.0
        for layer, k in keys.items():
            k = k.reshape(batch, seq, -1)[r]
            pooled = torch.stack([k[t] for t in real]).max(dim=0).values
            total += float(pooled @ weights[layer].double()) + float(biases[layer])
        out.append(total)
    return out


def literal_decisions(scores):
    return [s is not None and s > 0 for s in scores]


@torch.no_grad()
def literal_alone(base, rows, weights, biases):
    """Reference scores of each prompt alone: one text, no padding, no mask."""
    out = []
    for r in rows:
        with recorded_keys(base, list(weights)) as rec:
            base(input_ids=torch.tensor([r]))
        out += literal_scores({layer: v[-1] for layer, v in rec.items()}, None, 1, len(r), weights, biases)
    return out


def balanced_biases(base, rows, weights):
    """Biases (one per guarded layer, unequal, summing to -threshold) that put the threshold halfway
    between the two middle reference scores (zero bias) of ``rows``: half abstain, half do not."""
    zero = {layer: 0.0 for layer in weights}
    s = sorted(literal_alone(base, rows, weights, zero))
    mid = len(s) // 2
    threshold = 0.5 * (s[mid - 1] + s[mid])
    assert s[mid] - s[mid - 1] > 2 * MIN_MARGIN, f"reference scores too close to split: {s}"
    layers = sorted(weights)
    shares = torch.linspace(1.0, 2.0, len(layers))
    shares = shares / shares.sum()
    return {layer: float(-threshold * shares[j]) for j, layer in enumerate(layers)}


def random_weights(model, layers, seed):
    g = torch.Generator().manual_seed(seed)
    d = ref.d_ff_of(model)
    return {layer: (torch.randn(d, generator=g) / d**0.5).float() for layer in layers}


def edited(base, weights, biases, check="prompt"):
    """The tool's in-process edit: ``apply_key_space`` with ``LinearShare``s, wrapped."""
    arch = base.config.model_type
    patched = copy.deepcopy(base)
    shares = {layer: LinearShare(weights[layer].clone(), biases[layer]) for layer in weights}
    apply_key_space(patched, arch_spec(arch), arch, shares)
    edit = build_edit(arch, patched, Plans(key_space=shares), refusal=REFUSAL, refusal_ids=REFUSAL_IDS, check=check)
    return wrap(patched, edit.config()), shares


# ------------------------------------------------------------------------------------------------
# per-architecture setup (built once per process)
# ------------------------------------------------------------------------------------------------


class Case:
    def __init__(self, arch):
        self.arch = arch
        self.base = tiny_model(arch, seed=11)
        n = len(ref.layers_of(self.base))
        # several guarded layers; llama (3 layers) skips its middle one
        self.layers = [0, 2] if n == 3 else list(range(n))
        self.weights = random_weights(self.base, self.layers, seed=5)
        self.rows = random_rows(21, 4, lo=3, hi=11)
        assert len({len(r) for r in self.rows}) > 1, "prompts of different lengths"
        self.biases = balanced_biases(self.base, self.rows, self.weights)
        self.alone = literal_alone(self.base, self.rows, self.weights, self.biases)
        self.want = literal_decisions(self.alone)
        assert sum(self.want) == 2 and min(abs(s) for s in self.alone) > MIN_MARGIN, self.alone
        self.model, self.shares = edited(self.base, self.weights, self.biases)


@functools.lru_cache(maxsize=None)
def case(arch) -> Case:
    return Case(arch)


@torch.no_grad()
def runtime_scores(model, fn):
    """Run ``fn()`` and return the per-row score summed over the guarded layers as the runtime
    computed it (each guard's ``score`` read by a forward hook right after its layer ran)."""
    got = []
    guards = [m for m in model.modules() if hasattr(m, "key_space")]
    handles = [m.register_forward_hook(lambda mod, a, o: got.append(mod.key_space.score.detach().double().clone()))
               for m in guards]
    try:
        out = fn()
    finally:
        for h in handles:
            h.remove()
    assert len(got) == len(guards)
    return out, torch.stack(got).sum(0).tolist()


# ------------------------------------------------------------------------------------------------
# 1. forward: abstained == literal, left and right padding
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_abstained_matches_literal(arch, side):
    c = case(arch)
    ids, mask = pad(c.rows, side)
    b, s = ids.shape
    with torch.no_grad():
        with recorded_keys(c.base, c.layers) as rec:
            plain = c.base(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
        out = c.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
    scores = literal_scores({layer: v[-1] for layer, v in rec.items()}, mask, b, s, c.weights, c.biases)
    want = literal_decisions(scores)
    assert out.abstained.dtype == torch.bool and out.abstained.shape == (b,)
    assert out.abstained.tolist() == want, f"{arch} {side}: {out.abstained.tolist()} != literal {want} ({scores})"
    # the batched literal decision is each prompt's own (padding is not pooled), and it is mixed
    assert want == c.want and any(want) and not all(want)
    # the guard only observes: the logits are the unpatched model's
    assert torch.equal(out.logits, plain.logits)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_row_without_real_token_never_abstains(arch):
    """A positive bias makes every real row abstain; a row whose mask is all 0 still does not."""
    c = case(arch)
    biases = {layer: 50.0 for layer in c.layers}
    model, _ = edited(c.base, c.weights, biases)
    ids, mask = pad(c.rows, "right")
    mask[1] = 0
    with torch.no_grad():
        with recorded_keys(c.base, c.layers) as rec:
            c.base(input_ids=ids, attention_mask=mask)
        out = model(input_ids=ids, attention_mask=mask)
    want = literal_decisions(literal_scores({layer: v[-1] for layer, v in rec.items()}, mask, *ids.shape, c.weights, biases))
    assert want == [True, False, True, True]
    assert out.abstained.tolist() == want


def test_bias_is_summed_over_guarded_layers():
    """The decision is on the SUM over the guarded layers: all of the bias on one layer gives the
    same decisions as the bias spread over them; one guarded layer alone matches its literal."""
    c = case("llama")
    ids, mask = pad(c.rows, "left")
    total = sum(c.biases.values())
    one = {layer: (total if layer == c.layers[-1] else 0.0) for layer in c.layers}
    with torch.no_grad():
        got = edited(c.base, c.weights, one)[0](input_ids=ids, attention_mask=mask).abstained.tolist()
    assert got == c.want
    first = c.layers[0]
    w1, b1 = {first: c.weights[first]}, {first: total}
    want = literal_decisions(literal_alone(c.base, c.rows, w1, b1))
    with torch.no_grad():
        got = edited(c.base, w1, b1)[0](input_ids=ids, attention_mask=mask).abstained.tolist()
    assert got == want


# ------------------------------------------------------------------------------------------------
# 2. generate with check: prompt
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_check_prompt(arch):
    c = case(arch)
    ids, mask = pad(c.rows, "left")
    width = ids.shape[1]
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
              eos_token_id=None, use_cache=True)
    with torch.no_grad():
        with recorded_keys(c.base, c.layers) as rec:
            plain = c.base.generate(**kw)
        out = c.model.generate(**kw, return_dict_in_generate=True)
    # the literal decision on the prompt: generate's first forward call of the unpatched model
    first = {layer: v[0] for layer, v in rec.items()}
    assert all(len(v) == NEW for v in rec.values()), "one call per new token (KV cache)"
    want = literal_decisions(literal_scores(first, mask, ids.shape[0], width, c.weights, c.biases))
    assert want == c.want
    assert out.abstained.tolist() == want
    assert out.sequences.shape == plain.shape == (len(c.rows), width + NEW)
    for r, abstain in enumerate(want):
        got = out.sequences[r].tolist()
        if abstain:
            assert got[:width] == ids[r].tolist()
            assert got[width:width + len(REFUSAL_IDS)] == REFUSAL_IDS
            assert all(t == 0 for t in got[width + len(REFUSAL_IDS):])
        else:
            assert got == plain[r].tolist(), f"{arch} row {r}: not the unpatched greedy output"
    # generate put the guards back: forward decides again afterwards
    with torch.no_grad():
        again = c.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).abstained.tolist()
    assert again == want


# ------------------------------------------------------------------------------------------------
# 3. the pooled score ignores padding
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_score_ignores_padding(arch):
    c = case(arch)
    for r, prompt in enumerate(c.rows):
        alone_ids = torch.tensor([prompt])
        out, (alone,) = runtime_scores(c.model, lambda: c.model(input_ids=alone_ids))
        assert abs(alone - c.alone[r]) <= 1e-5, (alone, c.alone[r])
        assert out.abstained.tolist() == [c.want[r]]
        _, (masked,) = runtime_scores(c.model, lambda: c.model(input_ids=alone_ids, attention_mask=torch.ones_like(alone_ids)))
        assert abs(masked - alone) <= 1e-5
    # inside padded batches: both sides, padding with token 0 and with an arbitrary token
    longest = max(len(x) for x in c.rows)
    for side in ("left", "right"):
        for pad_token in (0, 57):
            rows = c.rows + [c.rows[0][:2]]  # + a 2-token row (the most padding)
            ids, mask = pad(rows, side)
            ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_token))
            ids = torch.cat([ids, torch.full((len(rows), 3), pad_token)], 1) if side == "right" else torch.cat(
                [torch.full((len(rows), 3), pad_token), ids], 1)
            mask = torch.cat([mask, torch.zeros(len(rows), 3, dtype=mask.dtype)], 1) if side == "right" else torch.cat(
                [torch.zeros(len(rows), 3, dtype=mask.dtype), mask], 1)
            assert ids.shape[1] == longest + 3
            out, scores = runtime_scores(c.model, lambda: c.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)))
            for r in range(len(c.rows)):
                assert abs(scores[r] - c.alone[r]) <= 1e-5, f"{arch} {side} pad={pad_token} row {r}: {scores[r]} vs {c.alone[r]}"
            assert out.abstained.tolist()[: len(c.rows)] == c.want
    # not vacuous: were the padding pooled (no mask), the scores would change
    ids, _ = pad(c.rows, "left")
    _, unmasked = runtime_scores(c.model, lambda: c.model(input_ids=torch.where(ids == 0, 57, ids)))
    short = min(range(len(c.rows)), key=lambda i: len(c.rows[i]))
    assert abs(unmasked[short] - c.alone[short]) > 1e-3


def test_half_precision_pooling_is_exact():
    """A bfloat16 model's guard: the score equals the literal one computed from the same bfloat16
    keys, with contiguous rows and with a hole in a row's mask."""
    c = case("llama")
    model = copy.deepcopy(c.model).to(torch.bfloat16)
    base = copy.deepcopy(c.base).to(torch.bfloat16)
    ids, mask = pad(c.rows, "left")
    holed = mask.clone()
    holed[0, -2] = 0
    for m in (mask, holed):
        with torch.no_grad():
            with recorded_keys(base, c.layers) as rec:
                base(input_ids=ids, attention_mask=m, position_ids=positions(m))
            _, scores = runtime_scores(model, lambda: model(input_ids=ids, attention_mask=m, position_ids=positions(m)))
        want = literal_scores({layer: v[-1] for layer, v in rec.items()}, m, *ids.shape, c.weights, c.biases)
        # float32 dot products of the same pooled bfloat16 keys (the literal sums in float64)
        assert all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(scores, want)), (scores, want)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux's peak-RSS reset")
def test_half_precision_pooling_holds_one_key_sized_copy():
    """A half-precision key is pooled in its own dtype and only the pooled row is cast: one guard
    call holds the masked copy of the key (1x its size), not a float32 copy and a masked float32
    copy (4x) — 224 MiB instead of ~900 MiB for one layer of an 8B model's 8 k-token prompt."""
    from editor.heap import release_freed
    from editor.runtime.modeling_skill_editor import KeyScore

    def status(field: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
        return int(line.split()[1]) * 1024

    guard = KeyScore(8192)
    guard.weight.copy_(torch.rand(8192))
    key = torch.randn(1, 2048, 8192).to(torch.bfloat16)  # 32 MiB
    mask = torch.ones(1, 2048, dtype=torch.long)
    mask[0, :5] = 0
    guard.bind(mask, 1, 2048)
    release_freed()
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS:")
    guard.observe(key)
    above = status("VmHWM:") - before
    size = key.numel() * key.element_size()
    assert above < 2 * size, (above / 2**20, size / 2**20)
    want = key.float()[0, 5:].amax(0)
    assert torch.equal(guard.score, want[None] @ guard.weight + guard.bias)  # the padding is not pooled


# ------------------------------------------------------------------------------------------------
# 4. HF export round trip (editor.export.hf), fail-closed loading
# ------------------------------------------------------------------------------------------------

PROMPTS = ["What is 2+2?", "Compute 7*8 now.", "Hello there, friend", "x", "Le chat est noir."]
FORGET = ["1 + 1 = 2", "3 + 4 = 7"]
RETAIN = ["the cat sat", "a dog ran"]


def _enc(tok, prompts):
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory):
    """A tiny llama saved to disk, edited in-process with a linear guard on layers 0 and 2 (biases
    splitting PROMPTS), written by ``editor.export.hf.export_hf`` and read back through
    ``AutoModelForCausalLM.from_pretrained(trust_remote_code=True)``."""
    from transformers import AutoModelForCausalLM

    from editor.export.hf import export_hf
    from editor.manifest import build_manifest
    from editor.pipeline import prepare

    recipe = tiny_project(tmp_path_factory.mktemp("linear-hf"), """\
        key_space: {forget: forget, retain: retain, detector: linear, check: prompt, refusal: "No."}
        """, seed=4, profile=None, files={"forget": FORGET, "retain": RETAIN})
    root = recipe.parent
    base = AutoModelForCausalLM.from_pretrained(str(root / "model")).eval()
    tok = char_tokenizer()
    job = prepare(recipe)
    rows = [list(tok(p)["input_ids"]) for p in PROMPTS]
    weights = random_weights(base, [0, 2], seed=9)
    biases = balanced_biases(base, rows, weights)
    want = literal_decisions(literal_alone(base, rows, weights, biases))
    arch = "llama"
    patched = copy.deepcopy(base)
    shares = {layer: LinearShare(weights[layer], biases[layer]) for layer in weights}
    apply_key_space(patched, arch_spec(arch), arch, shares)
    edit = build_edit(arch, patched, Plans(key_space=shares), refusal=REFUSAL, refusal_ids=refusal_token_ids(tok, REFUSAL),
                    check="prompt")
    manifest = build_manifest(job.recipe, model_type=arch, dtype="float32", edit=edit, statistics=None)
    out = export_hf(patched, tok, edit, manifest, root / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    return {"root": root, "base": base, "tok": tok, "model": wrap(patched, edit.config()).eval(), "loaded": loaded,
            "ckpt": Path(out), "want": want, "weights": weights, "biases": biases}


# the export tests share one module fixture (one worker builds it, as in test_inspect_onnx)
EXPORT_GROUP = pytest.mark.xdist_group("linear_detector_export")
SLOW = pytest.mark.slow


@EXPORT_GROUP
@SLOW
def test_export_round_trip_matches_in_process(hf_export):
    e = hf_export
    loaded, model = e["loaded"], e["model"]
    assert type(loaded).__name__ == "SkillEditorForCausalLM"
    assert type(loaded).__module__.startswith("transformers_modules"), "the checkpoint's own shipped code"
    ks = loaded.config.skill_editor["key_space"]
    assert ks["detector"] == "linear" and ks["check"] == "prompt" and ks["layers"] == [0, 2]
    sd = loaded.state_dict()
    for layer in (0, 2):
        name = f"model.model.layers.{layer}.mlp.down_proj.key_space."
        assert torch.equal(sd[name + "weight"], e["weights"][layer]) and sd[name + "weight"].dtype == torch.float32
        assert sd[name + "bias"].tolist() == [pytest.approx(e["biases"][layer], rel=1e-6)]
    assert not any("layers.1.mlp.down_proj.key_space" in k for k in sd)
    ids, mask = _enc(e["tok"], PROMPTS)
    with torch.no_grad():
        got, mine = loaded(input_ids=ids, attention_mask=mask), model(input_ids=ids, attention_mask=mask)
    assert got.abstained.tolist() == mine.abstained.tolist() == e["want"]
    assert torch.equal(got.logits, mine.logits)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        g1, g2 = loaded.generate(**kw), model.generate(**kw)
    assert g1.abstained.tolist() == g2.abstained.tolist() == e["want"]
    assert torch.equal(g1.sequences, g2.sequences)


def _tampered(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    st = dst / "model.safetensors"
    name = "model.model.layers.2.mlp.down_proj.key_space." + ("bias" if how == "missing-bias" else "weight")
    if how.startswith("missing"):
        from safetensors.torch import load_file, save_file

        t = load_file(str(st))
        del t[name]
        save_file(t, str(st), metadata={"format": "pt"})
    else:  # one byte of the stored weight (its first element's lowest mantissa byte)
        raw = bytearray(st.read_bytes())
        n = struct.unpack("<Q", raw[:8])[0]
        begin = json.loads(raw[8:8 + n])[name]["data_offsets"][0]
        raw[8 + n + begin] ^= 0x01
        st.write_bytes(bytes(raw))
    return dst


@EXPORT_GROUP
@SLOW
@pytest.mark.parametrize("how", ["missing-weight", "missing-bias", "changed-byte"])
def test_tampered_checkpoint_refuses_to_load(hf_export, tmp_path, how):
    from transformers import AutoModelForCausalLM

    bad = _tampered(hf_export["ckpt"], tmp_path / how, how)
    with pytest.raises(Exception) as err:
        AutoModelForCausalLM.from_pretrained(str(bad), trust_remote_code=True)
    assert type(err.value).__name__ == "IntegrityError", repr(err.value)
    assert ("missing patch tensors" if how.startswith("missing") else "do not match the digest") in str(err.value)


# ------------------------------------------------------------------------------------------------
# 5. ONNX: the graph's abstained == PyTorch's == literal
# ------------------------------------------------------------------------------------------------


@EXPORT_GROUP
@SLOW
def test_onnx_abstained_matches_torch(hf_export, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import numpy as np

    from editor.export.onnx import export_onnx
    from editor.onnx_runtime import OnnxGenerator

    e = hf_export
    model, tok, base = e["model"], e["tok"], e["base"]
    result = export_onnx(model, tok, tmp_path / "onnx", prompts=PROMPTS)
    assert result["validation"]["agree"] and result["validation"]["abstained_row_steps"] >= sum(e["want"])
    gen = OnnxGenerator(tmp_path / "onnx", threads=1)
    ids, mask = _enc(tok, PROMPTS)
    pos = positions(mask)
    layers = sorted(e["weights"])
    with torch.no_grad():
        with recorded_keys(base, layers) as rec:
            base(input_ids=ids, attention_mask=mask, position_ids=pos)
        want = literal_decisions(literal_scores({layer: v[-1] for layer, v in rec.items()}, mask, *ids.shape,
                                                e["weights"], e["biases"]))
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    logits, past, ab = gen.step(ids.numpy(), mask.numpy(), pos.numpy(), None)
    assert want == e["want"] and any(want) and not all(want)
    assert ab.dtype == np.bool_ and ab.tolist() == out.abstained.tolist() == want
    # the graph returns the last position's logits (left padding: every row's last real token)
    assert logits.shape == (len(PROMPTS), 1, out.logits.shape[-1])
    assert np.abs(logits[:, -1] - out.logits[:, -1].numpy()).max() <= 1e-4
    # two cached steps: each call pools its own (single) token, in both runtimes
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
    for _ in range(2):
        mask = torch.cat([mask, torch.ones(len(PROMPTS), 1, dtype=mask.dtype)], 1)
        pos = pos[:, -1:] + 1
        with torch.no_grad():
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        logits, past, ab = gen.step(nxt[:, None].numpy(), mask.numpy(), pos.numpy(), past)
        assert ab.tolist() == out.abstained.tolist()
        assert np.abs(logits - out.logits.numpy()).max() <= 1e-4
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
    # the ONNX greedy generator follows check: prompt like torch's generate
    texts_onnx = gen.generate(PROMPTS, max_new_tokens=NEW)
    ids, mask = _enc(tok, PROMPTS)
    with torch.no_grad():
        seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    texts_torch = [tok.decode(s[ids.shape[1]:], skip_special_tokens=True) for s in seq]
    assert texts_onnx == texts_torch
    assert [t == REFUSAL for t in texts_onnx] == want
