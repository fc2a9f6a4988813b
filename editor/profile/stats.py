"""Streaming per-neuron statistics and the ``stats.safetensors`` file (DESIGN §4).

Accumulators keep count / mean / M2 in float64 plus min / max, on the device of the tensor they
see, and merge with Chan's parallel formula (per batch, across ranks, across files). No
activation is stored and nothing is copied to the host until the file is written.

Planning reads statistics through one interface (``Statistics``), answered alike by a profile
run's in-memory sets (``ProfiledSets``) and by a loaded file (``StatsFile``): the in-memory
answers are rounded to float32 exactly as ``save_stats`` writes them, so a plan (its digest, the
checkpoint's bytes) is the same from memory and from the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from editor import __version__
from editor.errors import EditorError
from editor.io import atomic_save_safetensors

STATS_NAME = "stats.safetensors"
STATS_FORMAT = "skill-editor/stats"
STATS_VERSION = "1"
_CPU_CHUNK = 1 << 17  # elements per row chunk in Moments.of on CPU (1 MiB of float64: in L2)


@dataclass
class Moments:
    """count, mean, M2 (float64), min, max of one vector of neurons."""

    count: torch.Tensor  # int64 []
    mean: torch.Tensor  # float64 [d]
    m2: torch.Tensor  # float64 [d]
    min: torch.Tensor  # float32 [d]
    max: torch.Tensor  # float32 [d]

    @classmethod
    def empty(cls, d: int, device) -> "Moments":
        z = torch.zeros(d, dtype=torch.float64, device=device)
        return cls(
            torch.zeros((), dtype=torch.int64, device=device),
            z,
            z.clone(),
            torch.full((d,), float("inf"), dtype=torch.float32, device=device),
            torch.full((d,), float("-inf"), dtype=torch.float32, device=device),
        )

    @classmethod
    def of(cls, x: torch.Tensor, index: torch.Tensor | None = None, scratch: "Scratch | None" = None) -> "Moments":
        """Moments of the rows of ``x`` [N, d] (any float dtype) — of its rows ``index`` when given,
        never gathered all at once — computed in float64.

        On CPU the rows go in cache-sized chunks (~``_CPU_CHUNK`` elements), each read from memory
        once: gathered, copied to float64, summed, then its squared deviations from its own mean
        summed in place, while it is in cache. The total's mean is the sum of the chunks' sums over
        N (as one pass over all the rows would give it); its M2 is the chunks' M2 plus each chunk's
        count × (its mean − the mean)² (exact; float64 rounding only). ``scratch`` keeps those
        temporaries from call to call: fresh ~1 MiB buffers per chunk cost more in page faults than
        the arithmetic (docs/SCALE.md: ~1.4-3× faster than two passes over the gathered rows). Other
        devices: the rows at once. ``amin``/``amax`` rather than ``aminmax(dim=0)`` (~5x slower on CPU).
        """
        n, d = (x.shape[0] if index is None else index.shape[0]), x.shape[1]
        if not n:
            lo = torch.full((d,), float("inf"), device=x.device)
            z = torch.zeros(d, dtype=torch.float64, device=x.device)
            return cls(torch.tensor(0, dtype=torch.int64, device=x.device), z, z.clone(), lo, -lo)
        if x.device.type != "cpu":
            rows = x if index is None else x.index_select(0, index)
            xd = rows.to(torch.float64, copy=True)  # a private copy: the in-place ops never touch x
            mean = xd.mean(0)
            m2 = xd.sub_(mean).square_().sum(0)
            return cls(torch.tensor(n, dtype=torch.int64, device=x.device), mean, m2,
                       rows.amin(0).to(torch.float32), rows.amax(0).to(torch.float32))
        step = max(1, _CPU_CHUNK // max(d, 1))
        chunks = (n + step - 1) // step
        rows, wide, sums, m2s, los, his = (scratch if scratch is not None else Scratch()).buffers(min(step, n), d, x.dtype, chunks)
        for c, i in enumerate(range(0, n, step)):
            k = min(step, n - i)
            chunk = x[i : i + k] if index is None else torch.index_select(x, 0, index[i : i + k], out=rows[:k])
            torch.amin(chunk, 0, out=los[c])
            torch.amax(chunk, 0, out=his[c])
            xd = wide[:k]
            xd.copy_(chunk)
            torch.sum(xd, 0, out=sums[c])
            torch.sum(xd.sub_(sums[c], alpha=1.0 / k).square_(), 0, out=m2s[c])  # around the chunk's own mean
        sums, m2 = sums[:chunks], m2s[:chunks].sum(0)
        mean = sums.sum(0).div_(n)
        if chunks > 1:  # the chunks' means around the total's: sum over chunks of k (mean_c - mean)^2
            sizes = torch.full((chunks,), float(step), dtype=torch.float64)
            sizes[-1] = n - step * (chunks - 1)
            m2 += torch.mv(sums.div_(sizes[:, None]).sub_(mean).square_().T, sizes)
        return cls(torch.tensor(n, dtype=torch.int64), mean, m2, los[:chunks].amin(0).to(torch.float32),
                   his[:chunks].amax(0).to(torch.float32))

    def merge_(self, other: "Moments") -> "Moments":
        """Chan et al. parallel merge, in place (both on the same device)."""
        na = self.count.to(torch.float64)
        nb = other.count.to(torch.float64)
        n = na + nb
        safe_n = torch.clamp(n, min=1.0)
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (nb / safe_n)
        self.m2 = self.m2 + other.m2 + delta * delta * (na * nb / safe_n)
        self.count = self.count + other.count
        self.min = torch.minimum(self.min, other.min)
        self.max = torch.maximum(self.max, other.max)
        return self

    @property
    def std(self) -> torch.Tensor:
        """Sample standard deviation (ddof=1); 0 where count < 2."""
        denom = torch.clamp(self.count.to(torch.float64) - 1.0, min=1.0)
        s = torch.sqrt(torch.clamp(self.m2 / denom, min=0.0))
        return s if int(self.count) >= 2 else torch.zeros_like(s)

    def finite(self) -> bool:
        return bool(torch.isfinite(self.mean).all() and torch.isfinite(self.m2).all()
                    and torch.isfinite(self.min).all() and torch.isfinite(self.max).all())


class Scratch:
    """The reusable CPU temporaries of ``Moments.of``: one chunk of rows (in the activations' dtype and
    in float64) and the chunks' means and sizes; allocated on first use and when they must grow."""

    def __init__(self):
        self._buf: dict = {}  # (what, dtype) -> a buffer

    def _get(self, key, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = self._buf.get((key, dtype))
        if t is None or t.shape[1:] != shape[1:] or t.shape[0] < shape[0]:
            t = self._buf[(key, dtype)] = torch.empty(shape, dtype=dtype)
        return t

    def buffers(self, k: int, d: int, dtype: torch.dtype, chunks: int) -> tuple[torch.Tensor, ...]:
        """(rows [≥ k, d] in ``dtype``, rows [≥ k, d] float64; per chunk [≥ chunks, d]: sums and M2
        (float64), min and max (``dtype``))."""
        return (self._get("rows", (k, d), dtype), self._get("wide", (k, d), torch.float64),
                self._get("sums", (chunks, d), torch.float64), self._get("m2", (chunks, d), torch.float64),
                self._get("min", (chunks, d), dtype), self._get("max", (chunks, d), dtype))


@dataclass
class SetStats:
    """Statistics of one named text set: ``layers[i][kind]`` Moments, plus its description."""

    layers: dict[int, dict[str, Moments]]
    info: dict = field(default_factory=dict)
    # the key_space linear detector's weights, {layer: float32 [d_ff]} (calibration output; saved
    # as ``<set>.detector.<layer>.weight``)
    detector: dict[int, torch.Tensor] = field(default_factory=dict)

    def get(self, layer: int, kind: str) -> Moments:
        return self.layers[layer][kind]


class Statistics(Protocol):
    """What planning asks of statistics, per named set: ``stat`` (count int64 [], the others
    float32 [d_ff], on the CPU), the set's description, the linear detector's weights."""

    def has_set(self, set_name: str) -> bool: ...

    def stat(self, set_name: str, layer: int, kind: str, stat: str) -> torch.Tensor: ...

    def info(self, set_name: str) -> dict: ...

    def detector(self, set_name: str, layer: int) -> torch.Tensor: ...


class ProfiledSets(dict):
    """A profile run's statistics in memory, {set name: SetStats} (what ``save_stats`` writes),
    answering ``Statistics`` with the file's float32 rounding."""

    def has_set(self, set_name: str) -> bool:
        return set_name in self

    def stat(self, set_name: str, layer: int, kind: str, stat: str) -> torch.Tensor:
        if set_name not in self:
            raise EditorError(f"no statistics for data set {set_name!r}")
        m = self[set_name].get(layer, kind)
        if stat == "count":
            return m.count.detach().to("cpu", torch.int64).reshape(())
        return getattr(m, stat).detach().to("cpu", torch.float32)

    def info(self, set_name: str) -> dict:
        return self[set_name].info if set_name in self else {}

    def detector(self, set_name: str, layer: int) -> torch.Tensor:
        return self[set_name].detector[layer]


def _tensor_name(set_name: str, layer: int, kind: str, stat: str) -> str:
    return f"{set_name}.layers.{layer}.{kind}.{stat}"


def detector_tensor_name(set_name: str, layer: int) -> str:
    return f"{set_name}.detector.{layer}.weight"


def save_stats(path, sets: dict[str, SetStats], *, model: str, revision: str | None, extra: dict | None = None) -> None:
    """Write ``stats.safetensors`` atomically (names, dtypes and metadata of DESIGN §4)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, s in sets.items():
        if "." in name:
            raise EditorError(f"data set name {name!r} must not contain '.'")
        for layer, kinds in s.layers.items():
            for kind, m in kinds.items():
                tensors[_tensor_name(name, layer, kind, "count")] = m.count.detach().to("cpu", torch.int64).reshape(())
                tensors[_tensor_name(name, layer, kind, "mean")] = m.mean.detach().to("cpu", torch.float32)
                tensors[_tensor_name(name, layer, kind, "std")] = m.std.detach().to("cpu", torch.float32)
                tensors[_tensor_name(name, layer, kind, "min")] = m.min.detach().to("cpu", torch.float32)
                tensors[_tensor_name(name, layer, kind, "max")] = m.max.detach().to("cpu", torch.float32)
        for layer, w in s.detector.items():
            tensors[detector_tensor_name(name, layer)] = w.detach().to("cpu", torch.float32).contiguous()
    meta = {
        "format": STATS_FORMAT,
        "version": STATS_VERSION,
        "tool_version": __version__,
        "model": str(model),
        "revision": str(revision or ""),
        "sets": json.dumps({k: v.info for k, v in sets.items()}, sort_keys=True),
    }
    if extra:
        meta.update({k: json.dumps(v, sort_keys=True) for k, v in extra.items()})
    atomic_save_safetensors(tensors, path, meta)


@dataclass
class StatsFile:
    """A loaded ``stats.safetensors``: per set, per layer, per kind: count/mean/std/min/max."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def sets(self) -> dict[str, dict]:
        return json.loads(self.metadata.get("sets", "{}"))

    def info(self, set_name: str) -> dict:
        return self.sets.get(set_name, {})

    def layers(self, set_name: str) -> list[int]:
        prefix = f"{set_name}.layers."
        return sorted({int(k[len(prefix):].split(".")[0]) for k in self.tensors if k.startswith(prefix)})

    def stat(self, set_name: str, layer: int, kind: str, stat: str) -> torch.Tensor:
        key = _tensor_name(set_name, layer, kind, stat)
        if key not in self.tensors:
            raise EditorError(f"statistics file has no tensor {key!r} (was set {set_name!r} profiled?)")
        return self.tensors[key]

    def detector(self, set_name: str, layer: int) -> torch.Tensor:
        key = detector_tensor_name(set_name, layer)
        if key not in self.tensors:
            raise EditorError(f"statistics file has no tensor {key!r}: profile again with this recipe")
        return self.tensors[key]

    def has_set(self, set_name: str) -> bool:
        return any(k.startswith(f"{set_name}.layers.") for k in self.tensors)


# identity fields compared only when the weights' fingerprint cannot be (one side lacks it): the
# same model may be named differently by two recipes (editor.model.identity)
NAMES = ("model", "revision")


def recorded_identity(stats: StatsFile) -> dict:
    """The identity a statistics file records (``identity`` metadata); a file written before it
    existed gives what its metadata says (model, revision)."""
    try:
        ident = json.loads(stats.metadata.get("identity", "{}"))
    except ValueError:
        ident = {}
    ident = dict(ident) if isinstance(ident, dict) else {}
    ident.setdefault("model", stats.metadata.get("model"))
    ident.setdefault("revision", stats.metadata.get("revision") or None)
    return ident


def _short(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 24 else text[:16] + "…"


def check_identity(stats: StatsFile, expected: dict, sets: dict[str, str] | None = None) -> None:
    """Refuse statistics of another model or other data, in one line: every field of ``expected``
    (``editor.model.identity``) that the file records too must be equal (``model`` / ``revision``
    only where the weights' fingerprints cannot be compared), and every set of ``sets`` ({name: fingerprint})
    must be in the file with that fingerprint. Fields either side lacks are skipped, so fields can
    be added to the identity later."""
    recorded = recorded_identity(stats)
    # the names are compared only where the weights cannot be: the file lacks their fingerprint, or
    # the loaded model has none (offloaded); an ``expected`` without the field yet (no weights
    # loaded so far) defers to the check after loading
    weights = recorded.get("weights") is not None and expected.get("weights", "later") is not None
    for key, want in expected.items():
        got = recorded.get(key)
        if want is None or got is None or (key in NAMES and weights):
            continue
        if got != want:
            raise EditorError(f"--stats: the statistics were profiled with another {key} ({_short(got)}; this recipe: "
                              f"{_short(want)}): profile again with this recipe")
    have = stats.sets
    for name, fp in (sets or {}).items():
        if name not in have:
            raise EditorError(f"--stats: the statistics have no data set {name!r} (they hold: {', '.join(sorted(have)) or 'none'}): "
                              f"profile again with this recipe")
        got = (have[name] or {}).get("fingerprint")
        if got is not None and got != fp:
            raise EditorError(f"--stats: data set {name!r} differs from the one profiled (fingerprint {got}, now {fp}): "
                              f"profile again with this recipe")


def content_digest(stats: StatsFile) -> str:
    """sha256 of what a statistics file holds — its metadata (keys sorted) and every tensor (name,
    dtype, shape, bytes; names sorted) — independent of the file's byte layout: safetensors writes
    the metadata map in no fixed order, so two profiles of the same data differ as files but not
    here. Recorded as the statistics' provenance in every export."""
    h = hashlib.sha256(json.dumps(stats.metadata, sort_keys=True).encode())
    for name in sorted(stats.tensors):
        t = stats.tensors[name].detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def stats_path(path) -> Path:
    """The statistics file: ``path`` itself, or ``path/stats.safetensors`` for a directory."""
    p = Path(path)
    return p / STATS_NAME if p.is_dir() else p


def provenance(stats: StatsFile, path=None) -> dict:
    """What the statistics were, for an export's manifest: the file's metadata, its sets and its
    content digest (``path``: the file, recorded by name)."""
    meta = dict(stats.metadata)
    out: dict = {k: meta[k] for k in ("format", "version", "tool_version", "model", "revision") if k in meta}
    out["sets"] = stats.sets
    extra = {k: v for k, v in meta.items() if k not in out and k != "sets"}
    for k, v in sorted(extra.items()):
        try:
            out[k] = json.loads(v)
        except (TypeError, ValueError):
            out[k] = v
    if path is not None:
        out["file"] = Path(path).name
    out["digest"] = content_digest(stats)
    return out


def load_stats(path: str | os.PathLike) -> StatsFile:
    """Read and check a statistics file (``stats_path``: a file or its directory; no pickle)."""
    path = stats_path(path)
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except FileNotFoundError:
        raise EditorError(f"statistics file not found: {path}") from None
    except Exception as e:  # noqa: BLE001
        raise EditorError(f"cannot read statistics file {path}: {e}") from None
    if meta.get("format") != STATS_FORMAT:
        raise EditorError(f"{path} is not a skill-editor statistics file (format={meta.get('format')!r})")
    return StatsFile(tensors, meta)
