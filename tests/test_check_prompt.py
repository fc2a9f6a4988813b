"""``key_space.check``: which forward calls of ``generate`` decide (every call vs the prompt only).

The reference is a literal greedy loop on the unpatched model (one text at a time, no cache, no
padding) that records the guarded layer's key at the last token of every call; the expected
decision of each rule is computed from those keys by the literal hypercube test, then compared
with the patched model's batched, cached, left-padded ``generate``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from editor.model.arch import arch_spec
from editor.methods.key_space import KSDBounds
from editor.patch import apply_key_space, build_edit, wrap
from editor.plan import Plans
from tests import reference_methods as ref
from tests.helpers import pad, random_rows
from tests.tiny import tiny_model

REFUSAL_IDS = [40, 41, 42, 2]
NEW = 6


@torch.no_grad()
def literal_keys(base, rows, layer):
    """Per row: the greedy continuation (no EOS stop needed: checked below) and the key of the
    last token of every call — the prompt, then each generated token fed back."""
    out = []
    for r in rows:
        seq, keys = list(r), []
        with ref.literal_edit(base, ksd_layer=layer) as rec:
            for _ in range(NEW):
                logits = base(input_ids=torch.tensor([seq])).logits
                keys.append(rec[-1].reshape(len(seq), -1)[-1].double())
                seq.append(int(logits[0, -1].argmax()))
        out.append((seq[len(r):], keys))
    return out


def box_around(key: torch.Tensor, width: float = 1e-3) -> KSDBounds:
    half = width * (key.abs() + 1)
    return KSDBounds(lower=(key - half).float(), upper=(key + half).float(), k=1.0, scale=1.0, dims=key.numel())


def literal_inside(bounds: KSDBounds, key: torch.Tensor) -> bool:
    return bool(((key >= bounds.lower.double()) & (key <= bounds.upper.double())).all())


def expected(rule, bounds, keys_per_row):
    """Abstention per row under ``rule`` from the literal keys (the decision of the first call
    only, or of any call) — the runtime stops a row at its first abstaining call."""
    if rule == "prompt":
        return [literal_inside(bounds, keys[0]) for _, keys in keys_per_row]
    return [any(literal_inside(bounds, k) for k in keys) for _, keys in keys_per_row]


def edited(base, layer, bounds, check):
    arch = base.config.model_type
    patched = copy.deepcopy(base)
    apply_key_space(patched, arch_spec(arch), arch, {layer: bounds})
    edit = build_edit(arch, patched, Plans(key_space={layer: bounds}), refusal="no", refusal_ids=REFUSAL_IDS, check=check).config()
    return wrap(patched, edit)


@pytest.fixture(scope="module")
def setup():
    base = tiny_model("llama", seed=3)
    layer = len(ref.layers_of(base)) - 1
    rows = random_rows(7, 3, lo=5, hi=9)
    lit = literal_keys(base, rows, layer)
    for cont, _ in lit:
        assert 2 not in cont[:3], "the boxes below sit on calls before any EOS"
    return base, layer, rows, lit


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("check", ["every_call", "prompt"])
@pytest.mark.parametrize("target", ["generated", "prompt"])
def test_check_rule_matches_literal(setup, check, target, use_cache):
    base, layer, rows, lit = setup
    # a box around one key: row 0's third call (a generated token fed back) or row 1's prompt
    key = lit[0][1][2] if target == "generated" else lit[1][1][0]
    bounds = box_around(key)
    want = expected(check, bounds, lit)
    assert want == ([check == "every_call", False, False] if target == "generated" else [False, True, False])
    model = edited(base, layer, bounds, check)
    ids, mask = pad(rows, "left")
    width = ids.shape[1]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                         eos_token_id=None, return_dict_in_generate=True, use_cache=use_cache)
    assert out.abstained.tolist() == want
    for r, (cont, _) in enumerate(lit):
        got = out.sequences[r, width:].tolist()
        if want[r]:
            assert got[: len(REFUSAL_IDS)] == REFUSAL_IDS
        else:
            assert got == cont, (check, target, r)


def test_forward_reports_every_call_in_prompt_mode(setup):
    """``check: prompt`` is a rule of ``generate``: ``forward`` still reports each call's test."""
    base, layer, rows, lit = setup
    model = edited(base, layer, box_around(lit[0][1][2]), "prompt")
    seq = rows[0] + lit[0][0][:2]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([seq]))
    assert out.abstained.tolist() == [True]


def test_default_is_every_call(setup):
    base, layer, rows, lit = setup
    patched = copy.deepcopy(base)
    bounds = box_around(lit[0][1][2])
    apply_key_space(patched, arch_spec("llama"), "llama", {layer: bounds})
    edit = build_edit("llama", patched, Plans(key_space={layer: bounds}), refusal="no", refusal_ids=REFUSAL_IDS).config()
    assert edit["key_space"]["check"] == "every_call"
    edit["key_space"].pop("check")  # a checkpoint written before the option existed
    out = wrap(patched, edit).generate(input_ids=torch.tensor([rows[0]]), max_new_tokens=NEW, do_sample=False,
                                       pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    assert out.abstained.tolist() == [True]


class _Scripted:
    """An ONNX generator whose graph is replaced by a script of per-call ``abstained`` flags."""

    def __init__(self, check, flags):
        from editor.onnx_runtime import OnnxGenerator

        self.gen = OnnxGenerator.__new__(OnnxGenerator)
        self.gen.check = check
        self.gen.pad_token_id = 0
        self.gen.eos_token_ids = {2}
        self.flags = list(flags)
        self.gen.step = self.step

    def step(self, input_ids, attention_mask, position_ids, past):
        ab = np.asarray(self.flags.pop(0), dtype=bool)
        logits = np.zeros((input_ids.shape[0], input_ids.shape[1], 8), dtype=np.float32)
        logits[..., 5] = 1.0
        return logits, past, ab


@pytest.mark.parametrize("check,want", [("every_call", [False, True]), ("prompt", [False, False])])
def test_onnx_generator_follows_check(check, want):
    # row 1's prompt is outside, its second call inside: only every_call refuses it
    s = _Scripted(check, [[False, False], [False, True], [False, False], [False, False]])
    new, abstained = s.gen.generate_ids([[1, 4, 4], [1, 6]], 4)
    assert abstained == want
    assert new[0] == [5, 5, 5, 5]
    assert new[1] == ([5] if want[1] else [5, 5, 5, 5])


def test_onnx_generator_prompt_flag_refuses():
    s = _Scripted("prompt", [[True, False], [False, False], [False, False]])
    new, abstained = s.gen.generate_ids([[1, 4, 4], [1, 6]], 3)
    assert abstained == [True, False] and new[0] == [] and new[1] == [5, 5, 5]
