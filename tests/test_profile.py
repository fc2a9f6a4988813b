import pytest
import torch

from editor.model.arch import spec_for
from editor.profile.collect import tokenize
from editor.profile.stream import profile_texts
from tests.reference import reference_stats, summarize
from tests.tiny import ARCHS, CharTokenizer, tiny_model

TEXTS = [
    "hello world",
    "a",
    "the quick brown fox jumps over the lazy dog, twice over",
    "1 + 2 = 3",
    "def f(x): return x * x",
    "bonjour le monde",
    "zz",
    "x" * 70,  # longer than max_length below
    "spam and eggs",
]
MAX_LEN = 40


def _close(a, b, what):
    a = a.double()
    b = b.double()
    scale = b.abs().max().clamp(min=1e-3)
    err = (a - b).abs().max() / scale
    assert err < 1e-5, f"{what}: rel err {err:.2e}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side,batch", [("right", 3), ("left", 8), ("left", 1), ("right", 8)])
def test_stats_match_literal_reference(arch, side, batch):
    model = tiny_model(arch)
    tok = CharTokenizer()
    spec = spec_for(model.config)
    got, summary = profile_texts(model, tok, spec, TEXTS, batch_size=batch, max_length=MAX_LEN, padding_side=side, progress=False)
    ids, truncated = tokenize(tok, TEXTS, MAX_LEN)
    assert truncated == 2
    ref = reference_stats(model, ids)
    assert summary["tokens"] == sum(len(i) for i in ids)
    for layer, kinds in ref.items():
        for kind, rows in kinds.items():
            want = summarize(rows)
            m = got[layer][kind]
            assert int(m.count) == want["count"]
            _close(m.mean, want["mean"], f"{arch} L{layer} {kind} mean")
            _close(m.std, want["std"], f"{arch} L{layer} {kind} std")
            _close(m.min, want["min"], f"{arch} L{layer} {kind} min")
            _close(m.max, want["max"], f"{arch} L{layer} {kind} max")
