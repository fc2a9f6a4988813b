"""Data-parallel profiling with ``torch.distributed`` (DESIGN §7).

``torchrun --nproc-per-node N -m editor profile RECIPE --out DIR`` starts N processes; each one
sees ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in its environment. :func:`session` turns that into
a :class:`Dist` context (a trivial one, world size 1, when the process was not launched that way,
so the single-process code path is the same code):

* the process group: ``gloo`` on CPU; ``cpu:gloo,cuda:nccl`` when CUDA is present (statistics on
  the GPU go through NCCL, the small control messages through gloo); destroyed in ``finally``;
* each rank's model on ``cuda:LOCAL_RANK`` (CPU when the recipe says ``cpu`` or there is no GPU);
* every named set is sharded deterministically: rank r profiles texts ``i`` with
  ``i % world == r`` — uneven shards, shards smaller than the batch size and empty shards work;
* the per-rank statistics are merged with collectives: count / mean / M2 (float64) are
  all-gathered layer by layer and Chan-merged **in rank order** on every rank (so every rank holds
  bit-identical merged statistics — it needs them to plan NA before the NA-active KSD pass), and
  min / max are all-reduced with ``MIN`` / ``MAX``; the texts' token and truncation counts are
  summed, while the set description (number of texts, fingerprint) is the whole set's;
* rank 0 writes ``stats.safetensors``, the others wait for it;
* a failure on one rank is agreed on by all (:meth:`Dist.agree`): every rank stops with the same
  one-line error instead of hanging in the next collective. Messages travel as byte tensors,
  never pickled.

The merged file equals the single-process file up to floating-point summation order (float64
moments, so ~1e-12 relative; the float32 forward itself may differ in the last bits with a
different batch composition) — except in NA ``sample`` mode, where the NA-active pass draws its
random numbers per rank and batch: the KSD keys are then another equally valid draw, reproducible
for a fixed world size and batch size, but not the single-process draw.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from editor.data import TextSet
from editor.errors import EditorError
from editor.model.loading import param_bytes, pick_dtype
from editor.profile.stream import profile_set
from editor.profile.stats import Moments, SetStats

TIMEOUT = timedelta(minutes=60)
_MSG_LIMIT = 4000  # bytes of an error message sent to the other ranks


def env_ranks(environ=None) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from a torchrun environment; ``None`` when not launched
    by torchrun (or with a world of one process, which needs no process group)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env["RANK"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise EditorError("torchrun environment: RANK / WORLD_SIZE / LOCAL_RANK must be integers") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise EditorError(f"torchrun environment: bad RANK={rank} / WORLD_SIZE={world} / LOCAL_RANK={local}")
    return None if world == 1 else (rank, world, local)


def shard(items: list, rank: int, world: int) -> list:
    """The items of ``rank``: index ``i`` goes to rank ``i % world`` (may be empty)."""
    return list(items[rank::world])


def rank_device(recipe_device: str, local_rank: int) -> torch.device:
    """Where one rank's model lives: ``cuda:LOCAL_RANK`` on GPU machines, ``cpu`` otherwise (or when
    the recipe asks for ``cpu``). Under torchrun an explicit ``cuda:K`` is replaced by the rank's
    own GPU: one process per GPU."""
    if recipe_device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise EditorError(f"LOCAL_RANK={local_rank} but this machine has {n} GPU(s): use --nproc-per-node {n} or fewer")
        return torch.device("cuda", local_rank)
    if recipe_device.startswith("cuda"):
        raise EditorError(f"device: {recipe_device!r} requested but CUDA is not available")
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# the pure merge (also what every rank runs on the gathered per-rank moments)
# ---------------------------------------------------------------------------------------------


def pack_moments(ms: list[Moments], device) -> torch.Tensor:
    """``[count, mean..., m2...]`` of each Moments, concatenated, float64 on ``device``."""
    parts = []
    for m in ms:
        parts.append(m.count.to(device=device, dtype=torch.float64).reshape(1))
        parts.append(m.mean.to(device=device, dtype=torch.float64))
        parts.append(m.m2.to(device=device, dtype=torch.float64))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)


def merge_packed(rows: list[torch.Tensor], widths: list[int]) -> list[Moments]:
    """Chan-merge per-rank packed moments (``rows[r]`` from :func:`pack_moments`) in rank order.

    Returns one Moments per width with count/mean/m2 set; min/max are left at ±inf (the caller
    fills them from the MIN/MAX reduction)."""
    out = []
    offset = 0
    for d in widths:
        acc = None
        for row in rows:
            count = row[offset].round().to(torch.int64)
            mean = row[offset + 1 : offset + 1 + d]
            m2 = row[offset + 1 + d : offset + 1 + 2 * d]
            m = Moments(count, mean.clone(), m2.clone(), torch.full((d,), float("inf"), device=row.device),
                        torch.full((d,), float("-inf"), device=row.device))
            acc = m if acc is None else acc.merge_(m)
        out.append(acc)
        offset += 1 + 2 * d
    return out


def merge_moments(parts: list[Moments]) -> Moments:
    """Merge per-rank Moments of one vector exactly as the collectives do (rank order, float64)."""
    d = parts[0].mean.shape[0]
    dev = parts[0].mean.device
    m = merge_packed([pack_moments([p], dev) for p in parts], [d])[0]
    m.min = torch.stack([p.min.to(dev, torch.float32) for p in parts]).amin(0)
    m.max = torch.stack([p.max.to(dev, torch.float32) for p in parts]).amax(0)
    return m


# ---------------------------------------------------------------------------------------------
# the context
# ---------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """One rank's view of a data-parallel job (world size 1: the plain single-process job)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device | None = None  # the model's (and the statistics' collectives') device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- placement ------------------------------------------------------------------------

    def model_device(self, recipe, config=None) -> str | None:
        """The device override for :func:`editor.model.loading.load_model` (``None``: its own policy).

        Data parallelism keeps one whole copy of the model per GPU: a model that does not fit one
        GPU is refused (profile it in one process, where ``device: auto`` spreads it with
        ``device_map="auto"``)."""
        if not self.enabled:
            return None
        self.device = rank_device(recipe.device, self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            if config is not None:
                need = param_bytes(config, pick_dtype(recipe, config))
                free, _ = torch.cuda.mem_get_info(self.device)
                if need > 0.85 * free:
                    raise EditorError(
                        f"the model (~{need / 2**30:.1f} GiB) does not fit {self.device} ({free / 2**30:.1f} GiB free): "
                        "torchrun keeps one copy per GPU; run `skill-editor profile` without torchrun, where "
                        "device: auto spreads the layers over the GPUs")
        return str(self.device)

    def _comm_device(self) -> torch.device:
        if self.device is not None and self.device.type == "cuda":
            return self.device
        return torch.device("cpu")

    # -- agreement ------------------------------------------------------------------------

    def agree(self, fn: Callable, *args, **kwargs):
        """Run ``fn`` on every rank; if it fails on any rank, fail on all of them with the first
        failing rank's one-line message (a collective: also a barrier)."""
        if not self.enabled:
            return fn(*args, **kwargs)
        result = None
        error: BaseException | None = None
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
        self._agree_on(error)
        return result

    def _agree_on(self, error: BaseException | None) -> None:
        import torch.distributed as dist

        flag = torch.tensor([1 if error is not None else 0], dtype=torch.int64)
        flags = [torch.zeros_like(flag) for _ in range(self.world_size)]
        dist.all_gather(flags, flag)
        failed = [r for r, f in enumerate(flags) if int(f)]
        if not failed:
            return
        src = failed[0]
        if self.rank == src:
            text = str(error) if isinstance(error, EditorError) else f"{type(error).__name__}: {error}"
            data = torch.tensor(list(text.encode("utf-8")[:_MSG_LIMIT]), dtype=torch.uint8)
            length = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            length = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(length, src)
        if self.rank != src:
            data = torch.zeros(int(length), dtype=torch.uint8)
        if int(length):
            dist.broadcast(data, src)
        if error is not None:
            raise error
        msg = bytes(data.tolist()).decode("utf-8", errors="replace")
        raise EditorError(f"rank {src}: {msg}")

    def barrier(self) -> None:
        if self.enabled:
            self._agree_on(None)

    # -- statistics -----------------------------------------------------------------------

    def sum_ints(self, values: list[int]) -> list[int]:
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [int(v) for v in t.tolist()]

    def merge_set(self, s: SetStats) -> SetStats:
        """The Chan merge of every rank's statistics of one set (every rank gets the result, on its
        statistics device); token and truncation counts summed."""
        if not self.enabled:
            return s
        import torch.distributed as dist

        dev = self._comm_device()
        layers: dict[int, dict[str, Moments]] = {}
        for layer in sorted(s.layers):
            kinds = sorted(s.layers[layer])
            ms = [s.layers[layer][k] for k in kinds]
            widths = [int(m.mean.shape[0]) for m in ms]
            packed = pack_moments(ms, dev)
            gathered = [torch.empty_like(packed) for _ in range(self.world_size)]
            dist.all_gather(gathered, packed)
            lo = torch.cat([m.min.to(dev, torch.float32) for m in ms])
            hi = torch.cat([m.max.to(dev, torch.float32) for m in ms])
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            merged = merge_packed(gathered, widths)
            layers[layer] = {}
            off = 0
            for k, m, d in zip(kinds, merged, widths):
                m.min, m.max = lo[off : off + d].clone(), hi[off : off + d].clone()
                off += d
                layers[layer][k] = m
        info = dict(s.info)
        keys = [k for k in ("tokens", "truncated") if k in info]
        for k, v in zip(keys, self.sum_ints([int(info[k]) for k in keys])):
            info[k] = v
        return SetStats(layers, info)

    def profile_set(self, model, tokenizer, spec, text_set, recipe_profile, *, desc=None, progress=True) -> SetStats:
        """``editor.profile.stream.profile_set`` on this rank's shard of ``text_set``, merged over ranks."""
        if not self.enabled:
            return profile_set(model, tokenizer, spec, text_set, recipe_profile, desc=desc, progress=progress)
        part = TextSet(text_set.name, shard(text_set.texts, self.rank, self.world_size),
                       shard(text_set.records, self.rank, self.world_size), dict(text_set.info))
        label = f"{desc or text_set.name} [rank 0/{self.world_size}]"
        local = self.agree(profile_set, model, tokenizer, spec, part, recipe_profile, desc=label,
                           progress=progress and self.is_main)
        return self.merge_set(local)


@contextmanager
def session(timeout: timedelta = TIMEOUT) -> Iterator[Dist]:
    """The :class:`Dist` of this process: a process group when launched by torchrun with
    ``WORLD_SIZE > 1``, the trivial context otherwise.

    The group is created once per process and destroyed when the process exits (``atexit``), not
    at the end of each session: tearing it down between two sessions of one process (two
    ``profile_recipe`` calls) races — rank 0 closes the rendezvous store on the shared
    MASTER_PORT while a faster rank is already connecting for the next session ("connection
    reset by peer", seen under load)."""
    ranks = env_ranks()
    if ranks is None:
        yield Dist()
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise EditorError("this torch build has no torch.distributed: run without torchrun")
    rank, world, local = ranks
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        if torch.cuda.is_available() and local < torch.cuda.device_count():
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
        atexit.register(_destroy_group)
    yield Dist(rank=rank, world_size=world, local_rank=local, backend=backend)


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
