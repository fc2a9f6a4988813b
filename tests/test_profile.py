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


# ---------------------------------------------------------------------------------------------
# Moments.of: cache-sized chunks, each reduced in float64 and combined exactly (issue #23)
# ---------------------------------------------------------------------------------------------


def _exact(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 mean and M2 by two passes over all the rows at once (the reference)."""
    xd = rows.double()
    mean = xd.sum(0) / rows.shape[0]
    return mean, ((xd - mean) ** 2).sum(0)


@pytest.mark.parametrize("chunk", [1 << 17, 64, 7])  # one chunk, a few rows per chunk, one row (and a part) per chunk
def test_moments_chunks_keep_float64_accuracy(monkeypatch, chunk):
    """A large offset over a small spread: M2 from a float32 reduction, or from float64 sums of squares
    (Σx² − n·mean²), is off by ~1e-4 here; the chunks' two passes and their exact combination keep
    float64 accuracy. The mean of values whose sums are exact in float64 is the exact sum over N,
    bit for bit, as one pass over all the rows gives it; min and max are the rows' own."""
    import editor.profile.stats as stats

    monkeypatch.setattr(stats, "_CPU_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    d = 5
    x = (1e4 + torch.randn(300, d, generator=g) * 1e-2).float()
    x[:, 0] = torch.round(torch.randn(300, generator=g) * 1024) / 1024  # exactly summable in float64
    index = torch.randperm(300, generator=g)[:237]
    m = stats.Moments.of(x, index)
    rows = x[index]
    mean, m2 = _exact(rows)
    assert int(m.count) == 237
    assert m.mean[0] == mean[0]  # bit-identical
    assert torch.allclose(m.mean, mean, rtol=1e-15, atol=0)
    assert torch.allclose(m.m2, m2, rtol=1e-9, atol=0), (m.m2 - m2).abs().max() / m2.abs().max()
    assert torch.equal(m.min, rows.amin(0)) and torch.equal(m.max, rows.amax(0))
    # what a float32 reduction would give is not that close: the test can fail
    x32 = rows - rows.mean(0)
    assert not torch.allclose((x32 * x32).sum(0).double(), m2, rtol=1e-9, atol=0)


def test_moments_scratch_reused_across_shapes_and_dtypes(monkeypatch):
    """One Scratch serves calls of any row count, width and dtype (buffers grow, never leak across):
    every result equals the one without a scratch; ``index`` None takes the rows in order."""
    import editor.profile.stats as stats

    monkeypatch.setattr(stats, "_CPU_CHUNK", 40)
    g = torch.Generator().manual_seed(1)
    sc = stats.Scratch()
    for n, d, dtype in [(3, 8, torch.float32), (50, 8, torch.float32), (50, 4, torch.bfloat16), (9, 4, torch.float16),
                        (120, 8, torch.float32), (1, 3, torch.float64), (33, 3, torch.float64)]:
        x = torch.randn(n + 5, d, generator=g).to(dtype)
        index = torch.arange(2, n + 2)
        a = stats.Moments.of(x, index, sc)
        b = stats.Moments.of(x[2 : n + 2])
        mean, m2 = _exact(x[2 : n + 2])
        for got in (a, b):
            assert int(got.count) == n
            assert torch.allclose(got.mean, mean, rtol=1e-12, atol=1e-14)
            assert torch.allclose(got.m2, m2, rtol=1e-12, atol=1e-14)
            assert got.min.dtype == torch.float32 and torch.equal(got.min, x[2 : n + 2].amin(0).float())
            assert torch.equal(got.max, x[2 : n + 2].amax(0).float())
        assert torch.equal(a.mean, b.mean) and torch.equal(a.m2, b.m2)


def test_moments_of_no_rows_and_non_finite():
    import editor.profile.stats as stats

    empty = stats.Moments.of(torch.randn(4, 3), torch.zeros(0, dtype=torch.long))
    assert int(empty.count) == 0 and torch.isinf(empty.min).all()
    x = torch.randn(6, 3)
    x[4, 1] = float("nan")
    assert not stats.Moments.of(x).finite()
