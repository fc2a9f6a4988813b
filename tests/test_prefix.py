"""Shared-prefix forwards (``editor.profile.prefix``): the grouping against an exhaustive search, the
pooled keys against one-prompt forwards on every supported architecture, and the scorecard's guard
decisions against the checkpoint class's own forward."""

from __future__ import annotations

import random

import pytest
import torch

from editor.profile import collect, prefix
from tests.reference import reference_pooled_keys
from tests.tiny import ALL_ARCHS, char_tokenizer, tiny_model

SYSTEM = "system: you are a helpful assistant. user: "
TEXTS = [SYSTEM + s for s in ("3 + 4 = ", "the cat sat on the long mat", "a", "12 + 19 = 31 and more",
                              "what is 7 times 8?", "the cat sat", "Q: 2+2? A: 4. Q: 3+5? A:", "Q: 2+2? A: 4. Q: 9+1? A:")]
TEXTS += ["hello there", "x", SYSTEM, SYSTEM + "the cat sat"]  # the prefix alone; a duplicate
TEXTS += ["sys: be brief. " + s for s in ("name a colour", "name a fruit", "2 + 2 =", "say hi")]  # another group


def _saving(ids, groups, call):
    return sum((len(m) - 1) * p - call for p, m in groups if p > 0)


def _best_partition(ids, call):
    """Exhaustive: the best saving over every partition of the sorted order into contiguous runs."""
    import itertools

    order = sorted(range(len(ids)), key=lambda i: (ids[i], i))
    best = 0
    for cuts in itertools.product([False, True], repeat=max(0, len(order) - 1)):
        runs, run = [], [order[0]]
        for k, cut in enumerate(cuts, start=1):
            if cut:
                runs.append(run)
                run = []
            run.append(order[k])
        runs.append(run)
        total = 0
        for r in runs:
            if len(r) > 1:
                p = min(min(_lcp(ids[r[0]], ids[x]) for x in r), min(len(ids[x]) for x in r) - 1)
                total += max(0, (len(r) - 1) * p - call) if p > 0 else 0
        best = max(best, total)
    return best


def _lcp(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_prefix_groups_are_a_best_partition_and_share_their_prefix():
    rng = random.Random(0)
    for trial in range(60):
        stems = [[rng.randrange(3) for _ in range(rng.randrange(0, 9))] for _ in range(rng.randrange(1, 4))]
        ids = [rng.choice(stems) + [rng.randrange(3) for _ in range(rng.randrange(1, 5))] for _ in range(rng.randrange(1, 10))]
        call = rng.choice([0, 2, 5])
        groups = prefix.prefix_groups(ids, call)
        members = sorted(i for _, m in groups for i in m)
        assert members == list(range(len(ids))), (trial, groups)
        for p, m in groups:
            assert all(ids[i][:p] == ids[m[0]][:p] and len(ids[i]) > p for i in m), (trial, ids, groups)
            assert p == 0 or (len(m) - 1) * p > call
        assert _saving(ids, groups, call) == _best_partition(ids, call), (trial, ids, groups)
    assert prefix.prefix_groups([]) == []


@pytest.mark.parametrize("arch, window", [(a, None) for a in ALL_ARCHS] + [("gemma2", 8), ("mistral", 8)])
def test_pooled_keys_by_prefix_are_each_prompts_own(arch, window, monkeypatch):
    """Every key max-pooled over a prompt's tokens, from forwards that read shared beginnings once,
    equals the one-prompt forward's (float32), on every supported architecture — and with a sliding
    attention window shorter than the prompts."""
    from editor.model.arch import backbone, spec_for

    model = tiny_model(arch, **({"sliding_window": window} if window else {})).eval()
    tok = char_tokenizer()
    spec = spec_for(model.config)
    monkeypatch.setattr(prefix, "PREFIX_CALL_TOKENS", 4)
    calls: list[tuple[int, int]] = []
    handle = backbone(model).register_forward_pre_hook(
        lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        got = collect.pooled_keys(model, tok, spec, TEXTS, batch_size=3)
    finally:
        handle.remove()
    groups = [p for p, _ in prefix.prefix_groups(collect.tokenize(tok, TEXTS, 512)[0], 4) if p]
    assert len(groups) >= 2 and len(tok(SYSTEM)["input_ids"]) - 1 in groups  # SYSTEM alone is a prompt: one token short
    assert (len(groups), max(groups)) in calls, calls  # the groups' prefixes: one call, left-padded
    assert sum(b * t for b, t in calls) < sum(len(tok(t)["input_ids"]) for t in TEXTS) * 0.6
    want = reference_pooled_keys(model, [tok(t)["input_ids"] for t in TEXTS])
    assert set(want) == set(got)
    for i in want:
        torch.testing.assert_close(got[i], want[i], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_guard_flags_of_the_linear_detector_are_the_checkpoints_own(arch, monkeypatch):
    """The scorecard's decisions (shared-prefix forwards, ``pooled_guard_flags``) are the checkpoint
    class's own ``abstained`` from a forward over each prompt alone, with the same scores."""
    import editor.eval.scorecard as scorecard
    from editor.methods.key_space import LinearShare
    from editor.model.arch import d_ff, decoder_layers, spec_for
    from editor.patch import apply_key_space, wrap

    model, tok = tiny_model(arch).eval(), char_tokenizer()
    spec = spec_for(model.config)
    n, width = len(decoder_layers(model, spec)), d_ff(model, spec)
    g = torch.Generator().manual_seed(3)
    shares = {i: LinearShare(torch.randn(width, generator=g), float(torch.randn((), generator=g))) for i in range(n)}
    apply_key_space(model, spec, model.config.model_type, shares)
    from editor.runtime.modeling_skill_editor import FORMAT

    edited = wrap(model, {"format": FORMAT, "arch": model.config.model_type, "key_space": {"detector": "linear", "check": "prompt", "layers": list(range(n)),
                                                          "refusal": "No."}})
    assert scorecard.decides_on_prompt(edited) and scorecard.linear_guards(edited) is not None
    keys = reference_pooled_keys(model, [tok(t)["input_ids"] for t in TEXTS])
    scores = [sum(float(keys[i][q] @ shares[i].weight) + shares[i].bias for i in range(n))  # the literal sum of the shares
              for q in range(len(TEXTS))]
    # a bias that puts the threshold between the prompts' scores: some abstain, some do not
    shift = -sorted(scores)[len(scores) // 2] + 1e-3
    for i in range(n):
        edited.model.get_submodule(spec.layers)[i].get_submodule(spec.down).key_space.bias += shift / n
    want = [s + shift > 0 for s in scores]
    assert any(want) and not all(want)
    got_runtime = [bool(edited(**tok(t, return_tensors="pt")).abstained[0]) for t in TEXTS]
    assert got_runtime == want
    monkeypatch.setattr(prefix, "PREFIX_CALL_TOKENS", 4)
    assert scorecard.guard_flags(edited, tok, TEXTS, batch_size=3) == want
    assert all(g.enabled for g in scorecard.linear_guards(edited).values())
