"""Data-parallel profiling (editor.profile.distributed, DESIGN §7): gloo on CPU with real processes, the
merge against concatenated data, and accelerate-dispatched models (``device_map``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from editor.profile.distributed import Dist, env_ranks, merge_moments, shard
from editor.errors import EditorError
from editor.profile.stats import Moments, load_stats
from tests.helpers import tiny_project

ROOT = Path(__file__).resolve().parents[1]

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def _texts(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 12, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)))
    return out


def _make_job(tmp_path: Path, sizes: dict[str, int], *, batch_size: int, na_ksd: bool = True, mode: str = "expected") -> Path:
    """A tiny project in ``tmp_path`` whose sets have ``sizes`` random texts; returns the recipe path."""
    names = list(sizes)
    if na_ksd:
        methods = (f"neuron_adjust: {{forget: {names[0]}, retain: {names[1]}, top_percent: 10.0, mode: {mode}, seed: 0}}\n"
                   f"key_space: {{forget: {names[-1]}, layer: -1, scale: 2.0}}\n")
    else:
        methods = f"prune: {{forget: {names[0]}, retain: {names[1:]}, top_percent: 10.0}}\n"
    return tiny_project(tmp_path, methods, files={name: _texts(n, seed=10 + i) for i, (name, n) in enumerate(sizes.items())},
                        sets={name: f"{{path: {name}.jsonl, text: '{{text}}'}}" for name in names},
                        profile=f"{{batch_size: {batch_size}, max_length: 24}}", export=None,
                        name=f"recipe_{'_'.join(f'{k}{v}' for k, v in sizes.items())}_b{batch_size}.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single(recipe: Path, out: Path) -> Path:
    from editor.pipeline import profile_recipe

    return profile_recipe(recipe, out, progress=False)


def _assert_same_stats(got_path: Path, want_path: Path, tol: float = 1e-6) -> None:
    got, want = load_stats(got_path), load_stats(want_path)
    assert sorted(got.tensors) == sorted(want.tensors)
    for name, w in want.tensors.items():
        g = got.tensors[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if w.dtype == torch.int64:
            assert torch.equal(g, w), name
            continue
        # relative to the tensor's scale: the float32 forward of a text differs in the last bits
        # with its batch's composition (padding width), which sharding changes; the merge itself
        # is float64 (see test_merge_matches_concatenated_data)
        err = ((g.double() - w.double()).abs().max() / w.double().abs().max().clamp(min=1e-6)).item()
        assert err <= tol, f"{name}: max relative difference {err:.2e}"
    meta_g = dict(got.metadata)
    meta_w = dict(want.metadata)
    assert json.loads(meta_g.pop("sets")) == json.loads(meta_w.pop("sets"))
    assert meta_g == meta_w


# ---------------------------------------------------------------------------------------------
# pure parts
# ---------------------------------------------------------------------------------------------


def test_merge_matches_concatenated_data():
    torch.manual_seed(0)
    d = 7
    # uneven parts, one empty, one single row, very different scales and offsets
    parts = [torch.randn(13, d) * 3 + 100, torch.zeros(0, d), torch.randn(1, d), torch.randn(40, d) * 1e-3 - 5,
             torch.randn(2, d)]
    merged = merge_moments([Moments.of(p) for p in parts])
    whole = torch.cat(parts).double()
    assert int(merged.count) == whole.shape[0]
    torch.testing.assert_close(merged.mean, whole.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.std, whole.std(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(merged.min, whole.min(0).values.float())
    torch.testing.assert_close(merged.max, whole.max(0).values.float())
    # all empty: count 0, no NaN in mean / m2
    empty = merge_moments([Moments.of(torch.zeros(0, d)), Moments.empty(d, "cpu")])
    assert int(empty.count) == 0 and torch.isfinite(empty.mean).all() and torch.isfinite(empty.m2).all()


def test_shard_and_env():
    items = list(range(5))
    assert [shard(items, r, 2) for r in range(2)] == [[0, 2, 4], [1, 3]]
    assert shard([0, 1], 2, 3) == []
    assert sorted(sum((shard(items, r, 3) for r in range(3)), [])) == items
    assert env_ranks({}) is None
    assert env_ranks({"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert env_ranks({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, 2, 1)
    with pytest.raises(EditorError):
        env_ranks({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(EditorError):
        env_ranks({"RANK": "x", "WORLD_SIZE": "2"})
    solo = Dist()
    assert not solo.enabled and solo.is_main and solo.agree(lambda a: a + 1, 1) == 2


def test_empty_shard_profiles_to_empty_moments():
    from editor.model.arch import spec_for
    from editor.profile.stream import profile_texts
    from tests.tiny import CharTokenizer, tiny_model

    model = tiny_model("llama")
    got, summary = profile_texts(model, CharTokenizer(), spec_for(model.config), [], progress=False)
    assert summary["tokens"] == 0 and len(got) == model.config.num_hidden_layers
    for kinds in got.values():
        for m in kinds.values():
            assert int(m.count) == 0 and m.mean.shape == (model.config.intermediate_size,)


# ---------------------------------------------------------------------------------------------
# real processes (gloo)
# ---------------------------------------------------------------------------------------------


@pytest.mark.xdist_group("distributed")  # process groups on loopback: one at a time
@pytest.mark.slow
def test_torchrun_cli_two_ranks_matches_single_process(tmp_path):
    # forget: 5 texts → shards 3 / 2, both smaller than the batch of 4; retain: 3 texts → 2 / 1;
    # keys: 2 texts → 1 / 1. NA (expected mode) + KSD: the NA-active pass is distributed too.
    recipe = _make_job(tmp_path, {"forget": 5, "retain": 3, "keys": 2}, batch_size=4)
    want = _single(recipe, tmp_path / "single")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "editor", "profile", str(recipe), "--out", str(tmp_path / "dp")]
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "wrote " in res.stdout
    got = tmp_path / "dp" / "stats.safetensors"
    _assert_same_stats(got, want)
    sets = load_stats(got).sets
    assert sets["forget"]["texts"] == 5 and "keys@neuron_adjust" in sets


def _worker(rank: int, world: int, port: int, jobs: list[tuple[str, str]], result_dir: str) -> None:
    """One gloo rank: profile each (recipe, out) through the CLI's own code path; then the error
    agreement (a failure on one rank only must stop every rank with its message)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from editor.pipeline import profile_recipe
    from editor.profile.distributed import session

    for recipe, out in jobs:
        profile_recipe(recipe, out, progress=False)
    with session() as dist:
        def fail_on_last():
            if dist.rank == world - 1:
                raise EditorError("boom on the last rank")
            return "ok"

        try:
            dist.agree(fail_on_last)
            msg = "no error"
        except EditorError as e:
            msg = str(e)
        dist.barrier()
    Path(result_dir, f"rank{rank}.txt").write_text(msg, encoding="utf-8")


@pytest.mark.xdist_group("distributed")  # process groups on loopback: one at a time
@pytest.mark.slow
def test_spawn_three_ranks_empty_shard_and_errors(tmp_path):
    import torch.multiprocessing as mp

    # 2 texts over 3 ranks: rank 2's shard is empty (and the keys set: 1 / 1 / 0);
    # 4 texts with batch size 8: 2 / 1 / 1, all shards below the batch size. Prune-only recipe too.
    r1 = _make_job(tmp_path, {"forget": 2, "retain": 4, "keys": 2}, batch_size=8)
    r2 = _make_job(tmp_path, {"forget": 7, "retain": 3}, batch_size=2, na_ksd=False)
    # NA in `sample` mode: the NA-active pass draws per rank and batch, so only the first-pass sets
    # are the single-process ones; the NA-active set has the same counts and metadata
    r3 = _make_job(tmp_path, {"forget": 6, "retain": 3, "keys": 5}, batch_size=2, mode="sample")
    jobs = [(str(r1), str(tmp_path / "dp1")), (str(r2), str(tmp_path / "dp2")), (str(r3), str(tmp_path / "dp3"))]
    wants = [_single(r, tmp_path / f"single{i}") for i, r in enumerate((r1, r2, r3))]
    world = 3
    mp.start_processes(_worker, args=(world, _free_port(), jobs, str(tmp_path)), nprocs=world, join=True,
                       start_method="spawn")
    for (_, out), want in zip(jobs[:2], wants[:2]):
        _assert_same_stats(Path(out) / "stats.safetensors", want)
    got, want = load_stats(Path(jobs[2][1]) / "stats.safetensors"), load_stats(wants[2])
    assert got.sets == want.sets and got.metadata == want.metadata
    for name, w in want.tensors.items():
        g = got.tensors[name]
        if name.endswith(".count") or not name.startswith("keys@"):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))
        else:
            assert torch.isfinite(g).all() and g.shape == w.shape
    msgs = [(tmp_path / f"rank{r}.txt").read_text() for r in range(world)]
    assert msgs[-1] == "boom on the last rank"
    assert msgs[0] == msgs[1] == "rank 2: boom on the last rank"


# ---------------------------------------------------------------------------------------------
# accelerate-dispatched models (device_map): hooks accumulate on each layer's execution device
# ---------------------------------------------------------------------------------------------


def _dispatched(model_dir: Path, n_layers: int, offload_dir: Path | None):
    """The model dispatched by accelerate over a CPU-only ``device_map`` (hooks on every module, as
    with ``device_map="auto"`` over several GPUs); with ``offload_dir``: layer 1 and the embedding
    offloaded to disk (weights on ``meta``, loaded by the hooks at each forward)."""
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    device_map = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(n_layers)},
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    if offload_dir is None:  # a one-device map is not dispatched by from_pretrained: force the hooks
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = dispatch_model(model, device_map, main_device="cpu", force_hooks=True)
    else:
        device_map.update({"model.layers.1": "disk", "model.embed_tokens": "disk"})
        model = AutoModelForCausalLM.from_pretrained(model_dir, device_map=device_map, dtype=torch.float32,
                                                     offload_folder=str(offload_dir))
        assert model.model.layers[1].mlp.gate_proj.weight.device.type == "meta"
        assert model.get_input_embeddings().weight.device.type == "meta"
    assert hasattr(model.model.layers[0].mlp.gate_proj, "_hf_hook")  # really dispatched, down to the Linears
    return model.eval()


def _assert_same_sets(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].info == want[name].info
        for layer, kinds in want[name].layers.items():
            for kind, w in kinds.items():
                g = got[name].layers[layer][kind]
                assert int(w.count) == int(g.count), (name, layer, kind)
                assert g.mean.device.type == "cpu"  # accumulated on the layer's execution device
                for stat in ("mean", "std", "min", "max"):
                    torch.testing.assert_close(getattr(g, stat), getattr(w, stat), rtol=1e-6, atol=1e-6,
                                               msg=lambda m: f"{name} L{layer} {kind} {stat}: {m}")


@pytest.mark.parametrize("offload", [False, True])
def test_device_map_dispatch_gives_same_stats(tmp_path, offload):
    """The whole profile job (NA-active KSD pass included) on an accelerate-dispatched model equals
    the plain model's; with offloaded layers the first pass still does, and the NA-active pass (it
    permutes weights in place, which accelerate's offload would undo) is refused."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    from editor.model.loading import load_tokenizer
    from editor.pipeline import prepare, profile_job

    recipe = _make_job(tmp_path, {"forget": 7, "retain": 5, "keys": 4}, batch_size=3)
    job = prepare(recipe)
    tok = load_tokenizer(job.recipe)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    model = _dispatched(tmp_path / "model", job.n_layers, tmp_path / "offload" if offload else None)
    want = profile_job(job, plain, tok, progress=False)
    if not offload:
        _assert_same_sets(profile_job(job, model, tok, progress=False), want)
        return
    from editor.model.arch import spec_for
    from editor.profile.stream import profile_set

    spec = spec_for(job.config)
    for name in ("forget", "retain", "keys"):
        got = profile_set(model, tok, spec, job.sets[name], job.recipe.profile, progress=False)
        _assert_same_sets({name: got}, {name: want[name]})
    with pytest.raises(EditorError, match="offloads"):
        profile_job(job, model, tok, progress=False)


@pytest.mark.parametrize("detector", ["box", "linear"])
def test_guards_run_on_an_accelerate_dispatched_model(tmp_path, detector):
    """NA + a KSD guard (box or linear) installed on a model dispatched by accelerate (its hooks
    call ``_old_forward``, bound before the class swap) decide exactly as on the plain model."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editor.methods.key_space import LinearShare, ksd_bounds
    from editor.model.arch import spec_for
    from editor.patch import apply_key_space, build_edit, wrap
    from editor.plan import Plans
    from editor.profile.collect import pooled_keys
    from tests.tiny import save_tiny

    save_tiny("llama", tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    tok.padding_side = "left"
    texts = ["3 + 4 = ", "the cat sat on the mat", "12 + 19 = ", "a dog ran"]
    enc = tok(texts, return_tensors="pt", padding=True)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    n_layers = plain.config.num_hidden_layers
    spec = spec_for(plain.config)
    d = plain.config.intermediate_size
    g = torch.Generator().manual_seed(0)
    if detector == "linear":
        w = {i: torch.randn(d, generator=g) for i in range(n_layers)}
        pooled = pooled_keys(plain, tok, spec, texts, batch_size=4)
        score = sum(pooled[i] @ w[i] for i in w)
        bias = -float(score.median()) + 1e-3  # about half the rows abstain
        guard = {i: LinearShare(w[i], bias if i == 0 else 0.0) for i in range(n_layers)}
    else:  # a box around the first text's last-token key at the last layer
        rec = {}
        h = plain.model.layers[-1].mlp.down_proj.register_forward_pre_hook(lambda m, a: rec.__setitem__("k", a[0][0, -1]))
        with torch.no_grad():
            plain(**tok(texts[:1], return_tensors="pt"))
        h.remove()
        k = rec["k"].float()
        guard = {n_layers - 1: ksd_bounds(k, torch.full_like(k, 0.05), k - 0.01, k + 0.01, 1.0)}

    def decide(model):
        apply_key_space(model, spec, "llama", guard)
        edit = build_edit("llama", model, Plans(key_space=guard), refusal="no", refusal_ids=[5, 2], check="prompt")
        with torch.no_grad():
            out = wrap(model, edit.config())(**enc)
        return out.abstained, out.logits

    want_ab, want_logits = decide(plain)
    model = _dispatched(tmp_path / "model", n_layers, None)
    got_ab, got_logits = decide(model)
    assert want_ab.any() and not want_ab.all(), want_ab  # the guard really decides, both ways
    if detector == "box":
        assert bool(want_ab[0])
    assert got_ab.tolist() == want_ab.tolist()
    torch.testing.assert_close(got_logits, want_logits)
