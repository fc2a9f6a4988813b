"""Parity of the patched model with the literal math of DESIGN §3 (issue #4, "Must show").

The patched side is built exactly as the tool builds it (plans from ``editor.methods``, applied by
``editor.patch``, wrapped by ``editor.patch.wrap``); the other side is ``tests.reference_methods``:
forward hooks on the *unpatched, unpermuted* model applying the formulas literally.
"""

from __future__ import annotations

import copy

import pytest
import torch

from editor.model.arch import arch_spec, permute_neurons, resolve_layer
from editor.methods.key_space import KSDBounds, ksd_bounds
from editor.methods.neuron_adjust import Gaussian, plan_neuron_adjust
from editor.patch import apply_key_space, apply_neuron_adjust, build_edit, wrap
from editor.plan import Plans
from tests import reference_methods as ref
from tests.helpers import pad, positions, random_rows
from tests.tiny import ARCHS, VOCAB, tiny_model

REFUSAL_IDS = [40, 41, 42, 2]
ATOL = 1e-5


# ------------------------------------------------------------------------------------------
# fixtures: synthetic statistics, texts, the patched model
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def capture_pre(model, ids):
    """Pre-activations of every layer on ``ids`` (no padding), [tokens, d_ff] per layer."""
    mt = model.config.model_type
    _, pre_path, _, fused, _ = ref.LAYOUT[mt]
    d = ref.d_ff_of(model)
    rows, handles = {}, []
    for i, layer in enumerate(ref.layers_of(model)):
        def hook(m, a, out, i=i):
            rows[i] = (out[..., :d] if fused else out).reshape(-1, d).double()
        handles.append(layer.get_submodule(pre_path).register_forward_hook(hook))
    try:
        model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return rows


def synthetic_stats(model, seed=0):
    """Per-neuron forget/retain (μ, σ) near the model's real activations, float32, with edge cases.

    Layer 0 holds: σf = 0, σr = 0, both σ below the floor, σf = 1e-8, and forget == retain.
    The last layer's neurons all score far below the others (its selection is empty).
    Returns forget, retain ({layer: (mean, std)}) and a top_percent selecting 80 % of the
    other layers' neurons.
    """
    g = torch.Generator().manual_seed(seed)
    pre = capture_pre(model, torch.randint(3, VOCAB, (4, 12), generator=g))
    n_layers, d = len(pre), pre[0].shape[1]
    forget, retain = {}, {}
    for i in range(n_layers):
        mu, sd = pre[i].mean(0), pre[i].std(0).clamp(min=1e-3)
        z = torch.randn(4, d, generator=g, dtype=torch.float64)
        mf, mr = mu + 0.5 * sd * z[0], mu + 0.5 * sd * z[1]
        sf, sr = sd * torch.exp(0.4 * z[2]), sd * torch.exp(0.4 * z[3])
        if i == n_layers - 1:
            mf = mr - 10 * sr - 10
        if i == 0:
            for j in range(4):
                mf[j] = mr[j] + 0.3 * sd[j]
            sf[0] = 0.0
            sr[1] = 0.0
            sf[2], sr[2] = 0.0, 1e-9
            sf[3] = 1e-8
            mf[4], sf[4] = mr[4], sr[4]
        forget[i] = (mf.float(), sf.float())
        retain[i] = (mr.float(), sr.float())
    target = int(0.8 * d * (n_layers - 1))
    return forget, retain, 100.0 * target / (n_layers * d)


def gaussians(stats):
    return {i: Gaussian.of(m, s) for i, (m, s) in stats.items()}


def literal_na_spec(forget, retain, top_percent):
    """{layer: (selected, μf, σf, μr, σr)} selected literally (paper score)."""
    scores = {i: ref.paper_score(forget[i][0], retain[i][0]) for i in forget}
    sel = ref.select(scores, top_percent)
    return {i: (s, forget[i][0][s].double(), forget[i][1][s].double(), retain[i][0][s].double(), retain[i][1][s].double())
            for i, s in sel.items()}


class Edited:
    """A tiny model of ``arch`` edited with NA (synthetic stats) and/or KSD (literal probe keys)."""

    def __init__(self, arch, mode="expected", na=True, ksd=True, scale=1.25, seed=0, dtype=torch.float32):
        self.arch = arch
        self.spec = arch_spec(arch)
        self.base = tiny_model(arch, seed=seed)
        self.n_layers = len(ref.layers_of(self.base))
        self.forget, self.retain, self.top_percent = synthetic_stats(self.base, seed)
        self.na_ref = literal_na_spec(self.forget, self.retain, self.top_percent) if na else None
        self.mode = mode
        self.plan = None
        patched = copy.deepcopy(self.base)
        if na:
            self.plan = plan_neuron_adjust(gaussians(self.forget), gaussians(self.retain), top_percent=self.top_percent,
                                           mode=mode, seed=seed)
            apply_neuron_adjust(patched, self.spec, arch, self.plan)
        self.ksd_layer = self.n_layers - 1
        self.box = None
        bounds = None
        if ksd:
            # forget queries share a suffix; their keys (last token, NA active) are the probes
            self.probes = random_rows(100 + seed, 8, suffix=(7, 8, 9))
            keys = self.reference_keys(self.probes)
            self.box = ref.KSDBox(keys, scale)
            k64 = keys.double()
            b = ksd_bounds(k64.mean(0), k64.std(0), k64.min(0).values, k64.max(0).values, scale)
            bounds = {self.ksd_layer: b}
            apply_key_space(patched, self.spec, arch, bounds)
        self.edit = build_edit(arch, patched, Plans(self.plan, bounds or {}), refusal="no" if ksd else None,
                             refusal_ids=REFUSAL_IDS if ksd else None).config()
        self.patched = patched
        self.model = wrap(patched, self.edit)
        if dtype != torch.float32:
            self.model.to(dtype)

    def literal(self):
        return ref.literal_edit(self.base, na=self.na_ref, mode=self.mode, ksd_layer=self.ksd_layer if self.box else None)

    @torch.no_grad()
    def reference_keys(self, rows):
        """Literal keys: one text at a time, no padding, last token, literal NA active."""
        out = []
        with ref.literal_edit(self.base, na=self.na_ref, mode=self.mode, ksd_layer=self.ksd_layer) as keys:
            for r in rows:
                self.base(input_ids=torch.tensor([r]))
                out.append(keys[-1].reshape(len(r), -1)[-1])
        return torch.stack(out)


# ------------------------------------------------------------------------------------------
# Neuron Adjust: logits parity, every architecture, expected and hard
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_na_logits_match_literal_math(arch):
    for mode in ("expected", "hard"):
        e = Edited(arch, mode=mode, ksd=False)
        # the tool's selection is the literal one (special neurons included, last layer empty)
        for i, lp in e.plan.layers.items():
            assert lp.selected.tolist() == e.na_ref[i][0], (arch, i)
        assert e.plan.counts[e.n_layers - 1] == 0
        assert set(range(5)) <= set(e.na_ref[0][0])
        rows = random_rows(1, 3) + random_rows(2, 1, lo=3, hi=3)
        ids, mask = pad(rows, "left")
        with torch.no_grad():
            got = e.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
            plain = e.base(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
            with e.literal():
                want = e.base(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        assert (plain - want).abs().max() > 1e-2, "the edit must change the logits (test is not vacuous)"
        diff = (got - want).abs().max().item()
        assert diff <= ATOL, f"{arch} {mode}: max |Δlogit| = {diff:.2e}"


# ------------------------------------------------------------------------------------------
# Key Space Detection: abstention parity, padding both sides, with and without KV cache
# ------------------------------------------------------------------------------------------


def _ksd_queries(e):
    """Rows: probes cut 3 tokens short (their last 3 tokens come one at a time), a full probe, and
    other texts; continuations of the same length for every row."""
    g = torch.Generator().manual_seed(7)
    rows, tails = [], []
    for p in e.probes[:3]:
        rows.append(p[:-3])
        tails.append(p[-3:])
    rows.append(e.probes[3])
    tails.append(torch.randint(3, VOCAB, (3,), generator=g).tolist())
    for r in random_rows(55, 3, lo=4, hi=10):
        rows.append(r)
        tails.append(torch.randint(3, VOCAB, (3,), generator=g).tolist())
    return rows, tails


def _check_decisions(e, out, keys, mask, batch, seq, where):
    want, margins = ref.decisions(e.box, keys[-1], mask, batch, seq)
    got = out.abstained.tolist()
    assert got == want, f"{e.arch} {where}: abstained {got} != literal {want} (margins {margins})"
    return want


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_ksd_abstention_matches_literal(arch, side):
    e = Edited(arch, mode="expected")
    rows, tails = _ksd_queries(e)
    ids, mask = pad(rows, side)
    b = len(rows)
    seen = []
    alone, alone_margins = ref.decisions(e.box, e.reference_keys(rows)[:, None, :], None, b, 1)
    with torch.no_grad(), e.literal() as keys:
        # prompt, no cache
        out = e.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
        ref_out = e.base(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
        assert (out.logits - ref_out.logits).abs().max() <= ATOL
        seen += _check_decisions(e, out, keys, mask, b, ids.shape[1], "prompt")
        # the batched decision is the decision of each text alone (the real last token)
        batched = out.abstained.tolist()
        clear = [abs(m) > 1e-4 for m in alone_margins]
        assert [x for x, c in zip(batched, clear) if c] == [x for x, c in zip(alone, clear) if c]
        # prompt, then one token at a time with the KV cache
        out = e.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True)
        ref_out = e.base(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True)
        seen += _check_decisions(e, out, keys, mask, b, ids.shape[1], "prompt (cache)")
        past, ref_past = out.past_key_values, ref_out.past_key_values
        full_ids, full_mask = ids, mask
        for step in range(3):
            tok = torch.tensor([[t[step]] for t in tails])
            full_ids = torch.cat([full_ids, tok], 1)
            full_mask = torch.cat([full_mask, torch.ones(b, 1, dtype=torch.long)], 1)
            pos = positions(full_mask)[:, -1:]
            out = e.model(input_ids=tok, attention_mask=full_mask, position_ids=pos, past_key_values=past, use_cache=True)
            ref_out = e.base(input_ids=tok, attention_mask=full_mask, position_ids=pos, past_key_values=ref_past, use_cache=True)
            assert (out.logits - ref_out.logits).abs().max() <= ATOL, f"step {step}"
            seen += _check_decisions(e, out, keys, full_mask, b, 1, f"cache step {step}")
            past, ref_past = out.past_key_values, ref_out.past_key_values
            # the same step without cache: the whole sequence again
            out = e.model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions(full_mask), use_cache=False)
            e.base(input_ids=full_ids, attention_mask=full_mask, position_ids=positions(full_mask), use_cache=False)
            seen += _check_decisions(e, out, keys, full_mask, b, full_ids.shape[1], f"no-cache step {step}")
    assert any(seen) and not all(seen), "queries must produce both decisions"


def test_ksd_negative_layer_and_rows_without_tokens():
    """``key_space.layer: -1`` is the last layer; a row with no real token in the chunk never abstains."""
    from types import SimpleNamespace

    from editor.plan import plan_key_space
    from editor.profile.stats import ProfiledSets, SetStats
    from editor.recipe import Recipe

    e = Edited("llama", na=False, ksd=False)
    probes = random_rows(100, 6, suffix=(7, 8, 9))
    keys = e.reference_keys(probes).double()
    moments = SimpleNamespace(mean=keys.mean(0), std=keys.std(0), min=keys.min(0).values, max=keys.max(0).values,
                              count=torch.tensor(len(probes)))
    stats = ProfiledSets(f=SetStats({e.n_layers - 1: {"key": moments}}))
    recipe = Recipe(model="tiny", data={"f": {"path": "f.txt"}}, key_space={"forget": "f", "layer": -1, "scale": 1.5})
    bounds, info = plan_key_space(recipe, e.n_layers, stats)
    assert list(bounds) == [e.n_layers - 1] == [resolve_layer(-1, e.n_layers)] and info["layer"] == e.n_layers - 1
    patched = copy.deepcopy(e.base)
    apply_key_space(patched, e.spec, "llama", bounds)
    model = wrap(patched, build_edit("llama", patched, Plans(key_space=bounds), refusal="no", refusal_ids=REFUSAL_IDS).config())
    box = ref.KSDBox(keys, 1.5)
    rows = probes[:2] + random_rows(5, 2)
    ids, mask = pad(rows, "right")
    mask[3] = 0  # a row with no real token at all
    with torch.no_grad(), ref.literal_edit(e.base, ksd_layer=-1) as got_keys:
        out = model(input_ids=ids, attention_mask=mask)
        e.base(input_ids=ids, attention_mask=mask)
    want = ref.decisions(box, got_keys[-1], mask, len(rows), ids.shape[1])[0]
    assert out.abstained.tolist() == want and want[:2] == [True, True] and want[3] is False


# ------------------------------------------------------------------------------------------
# the paper code's defects we do not copy (4) KSD row 0 only, (5) a global abstention flag
# ------------------------------------------------------------------------------------------


def test_ksd_decides_every_row_not_just_row_zero():
    e = Edited("llama")
    other = random_rows(55, 1)[0]
    ids, mask = pad([other, e.probes[0]], "left")
    with torch.no_grad():
        out = e.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
    assert out.abstained.tolist() == [False, True]


def test_ksd_flag_does_not_leak_between_calls_or_models():
    forget_model = Edited("llama")
    other_model = Edited("gpt2")
    probe, other = forget_model.probes[0], random_rows(55, 1)[0]
    with torch.no_grad():
        assert forget_model.model(input_ids=torch.tensor([probe])).abstained.tolist() == [True]
        assert forget_model.model(input_ids=torch.tensor([other])).abstained.tolist() == [False]
        assert forget_model.model(input_ids=torch.tensor([probe])).abstained.tolist() == [True]
        # another model right after an abstention: its own decision only
        assert other_model.model(input_ids=torch.tensor([other])).abstained.tolist() == [False]
    # generate: a retain prompt after a refused one is answered
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    refused = forget_model.model.generate(input_ids=torch.tensor([probe]), **gen)
    assert refused[0, len(probe):len(probe) + len(REFUSAL_IDS)].tolist() == REFUSAL_IDS
    answered = forget_model.model.generate(input_ids=torch.tensor([other]), **gen)
    plain = forget_model.patched.generate(input_ids=torch.tensor([other]), **gen)
    assert answered.tolist() == plain.tolist()


# ------------------------------------------------------------------------------------------
# generate: a mixed batch
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_mixed_batch(arch):
    e = Edited(arch, mode="expected")
    forget_rows = [e.probes[0], e.probes[1]]
    retain_rows = random_rows(55, 2, lo=5, hi=9)
    rows = [retain_rows[0], forget_rows[0], retain_rows[1], forget_rows[1]]
    ids, mask = pad(rows, "left")
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = e.model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **gen)
    assert out.abstained.tolist() == [False, True, False, True]
    width = ids.shape[1]
    seqs = out.sequences
    for r in (1, 3):
        cont = seqs[r, width:].tolist()
        assert cont[: len(REFUSAL_IDS)] == REFUSAL_IDS
        assert all(t == 0 for t in cont[len(REFUSAL_IDS):])
    for r in (0, 2):
        alone = e.model.generate(input_ids=torch.tensor([rows[r]]), **gen)[0, len(rows[r]):].tolist()
        cont = seqs[r, width:].tolist()
        alone += [0] * (len(cont) - len(alone))
        assert cont == alone, (arch, r)
        assert not set(cont) >= set(REFUSAL_IDS[:3])
    # plain tensor output too
    plain = e.model.generate(input_ids=ids, attention_mask=mask, **gen)
    assert torch.equal(plain, seqs)


# ------------------------------------------------------------------------------------------
# sample mode through the model: reproducible with its seed
# ------------------------------------------------------------------------------------------


def test_sample_mode_reproducible_through_model():
    ids, mask = pad(random_rows(1, 3), "right")

    def logits(seed, e=None):
        e = e or Edited("llama", mode="sample", ksd=False, seed=0)
        if seed != 0:
            e.model.reset_neuron_adjust_rng(seed)
        with torch.no_grad():
            return e, e.model(input_ids=ids, attention_mask=mask).logits

    e, first = logits(0)
    _, again = logits(0)
    assert torch.equal(first, again), "same seed, fresh model: same outputs"
    with torch.no_grad():
        second_call = e.model(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(first, second_call), "the generator advances between calls"
    e.model.reset_neuron_adjust_rng(0)
    with torch.no_grad():
        assert torch.equal(first, e.model(input_ids=ids, attention_mask=mask).logits), "reset_rng(seed) replays"
    _, other = logits(1)
    assert not torch.equal(first, other), "another seed: other draws"


# ------------------------------------------------------------------------------------------
# permutation alone is the identity function
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_permutation_alone_keeps_logits(arch):
    base = tiny_model(arch)
    permuted = copy.deepcopy(base)
    spec = arch_spec(arch)
    d = ref.d_ff_of(base)
    g = torch.Generator().manual_seed(3)
    for layer in range(len(ref.layers_of(base))):
        perm = torch.randperm(d, generator=g)
        assert not torch.equal(perm, torch.arange(d))
        permute_neurons(permuted, spec, layer, perm)
    ids, mask = pad(random_rows(1, 3), "left")
    with torch.no_grad():
        a = base(input_ids=ids, attention_mask=mask).logits
        b = permuted(input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs().max() <= ATOL
    # and the weights did move
    pre = ref.LAYOUT[arch][1]
    assert not torch.equal(ref.layers_of(base)[0].get_submodule(pre).weight, ref.layers_of(permuted)[0].get_submodule(pre).weight)


# ------------------------------------------------------------------------------------------
# half precision
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "opt"])
def test_half_precision_close_to_float32(arch, dtype):
    e32 = Edited(arch, mode="hard")
    rows = [e32.probes[0]] + random_rows(55, 2)
    ids, mask = pad(rows, "left")
    with torch.no_grad():
        want = e32.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
    for how in ("built", "cast"):
        if how == "built":
            # patch a model that is already in half precision
            base = tiny_model(arch).to(dtype)
            patched = copy.deepcopy(base)
            apply_neuron_adjust(patched, e32.spec, arch, e32.plan)
            bounds = e32.edit["key_space"]
            layer = bounds["layers"][0]
            src = ref.layers_of(e32.patched)[layer].get_submodule(ref.LAYOUT[arch][2]).key_space
            apply_key_space(patched, e32.spec, arch, {layer: KSDBounds(src.lower.clone(), src.upper.clone(), 1.0, 1.0, 0)})
            model = wrap(patched, e32.edit)
        else:
            # cast a patched float32 model
            model = copy.deepcopy(e32.model).to(dtype)
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
        assert torch.isfinite(got.logits).all(), (how, dtype)
        # the constants keep their precision whatever the model's dtype
        want_dtype = {"a": torch.float64, "b": torch.float64, "c": torch.float64, "slope": torch.float64,
                      "offset": torch.float64, "lower": torch.float32, "upper": torch.float32}
        for name, buf in model.named_buffers():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in want_dtype:
                assert buf.dtype == want_dtype[leaf], f"{how}: NA/KSD constant {name} became {buf.dtype}"
        err = (got.logits.float() - want.logits).abs().mean().item()
        assert err < 0.05 * want.logits.abs().mean().item() + 0.05, (how, dtype, err)
        assert got.abstained.tolist() == want.abstained.tolist()
    assert want.abstained.tolist()[:2] == [True, False]
