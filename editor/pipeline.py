"""The job, stage by stage: recipe → data → profile → plan (methods) → patch. Export, evaluation
and the Hub live in their own modules; this one wires the stages for the CLI and the Python API.

Everything that can be validated without weights (recipe, config.json, data sets) is validated
in ``prepare`` before any weight is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from editor.arch import resolve_layer, spec_for
from editor.data import TextSet, load_all
from editor.errors import EditorError
from editor.io import check_destination
from editor.methods import Gaussian, KSDBounds, LinearShare, NAPlan, ksd_bounds, neuron_scores, plan_neuron_adjust, pooled, select_neurons
from editor.recipe import Recipe, check_against_config, load_recipe
from editor.stats import SetStats, StatsFile, load_stats, save_stats

NA_SUFFIX = "@neuron_adjust"
STATS_NAME = "stats.safetensors"


@dataclass
class Job:
    recipe: Recipe
    config: object
    sets: dict[str, TextSet]
    recipe_path: Path | None = None

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def n_layers(self) -> int:
        c = self.config
        return int(getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer"))


@dataclass
class Plans:
    neuron_adjust: NAPlan | None = None
    key_space: dict[int, KSDBounds] = field(default_factory=dict)
    key_space_info: dict = field(default_factory=dict)
    prune: dict[int, torch.Tensor] | None = None


def prepare(recipe: Recipe | str | Path) -> Job:
    """Recipe, config.json and every data set, validated — no weights loaded."""
    from editor.modelio import load_config

    path = None
    if not isinstance(recipe, Recipe):
        path = Path(recipe)
        recipe = load_recipe(path)
    config = load_config(recipe)
    check_against_config(recipe, config)
    sets = load_all(recipe)
    return Job(recipe, config, sets, path)


def ksd_set_name(recipe: Recipe) -> str | None:
    """The stats set KSD bounds come from: profiled with NA active when both methods are on."""
    if not recipe.key_space:
        return None
    return recipe.key_space.forget + (NA_SUFFIX if recipe.neuron_adjust else "")


def profile_job(job: Job, model, tokenizer, *, progress: bool = True, dist=None) -> dict[str, SetStats]:
    """Profile every named set; with NA and KSD both on, profile the KSD forget set again with the
    NA patch active (seeded). NB: that leaves ``model`` patched with NA. ``dist``: an
    ``editor.distributed.Dist`` (torchrun): each rank profiles its shard, statistics merged."""
    from editor.modelio import offloaded_modules
    from editor.patch import apply_neuron_adjust, plan_digest
    from editor.profile import profile_set

    if dist is not None:
        profile_set = dist.profile_set  # noqa: F811 - same signature: shard, profile, merge
    if job.recipe.neuron_adjust and job.recipe.key_space and (off := offloaded_modules(model)):
        raise EditorError(f"neuron_adjust + key_space: the NA-active pass edits weights in place, but accelerate offloads "
                          f"{len(off)} module(s) to cpu/disk (e.g. {off[0]}): give the model enough GPU memory")

    spec = spec_for(job.config)
    out: dict[str, SetStats] = {}
    for name in job.recipe.profiled_sets():
        ts = job.sets[name]
        out[name] = profile_set(model, tokenizer, spec, ts, job.recipe.profile, progress=progress)
    r = job.recipe
    if r.neuron_adjust and r.key_space:
        plan = plan_from_sets(job, out)
        apply_neuron_adjust(model, spec, job.model_type, plan)
        ts = job.sets[r.key_space.forget]
        s = profile_set(model, tokenizer, spec, ts, r.profile, desc=f"{ts.name} (NA on)", progress=progress)
        s.info["neuron_adjust"] = plan_digest(plan)
        out[ts.name + NA_SUFFIX] = s
    if r.key_space and r.key_space.calibrated:
        # calibrated KSD (editor.calibrate): per-example keys of the key_space probe sets only,
        # under NA when both methods are on; the choice is stored with the KSD set's statistics
        from editor.calibrate import calibrate_job

        record = calibrate_job(job, model, tokenizer, spec, progress=progress)
        target = out[ksd_set_name(r)]
        target.detector = record.pop("weights", {})
        target.info["calibration"] = record
    return out


def profile_recipe(recipe_path, out, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Profile a recipe into ``out/stats.safetensors``. Under ``torchrun`` (WORLD_SIZE > 1) every
    rank profiles a shard of each set, the statistics are merged with collectives and rank 0
    writes the file (``editor.distributed``); any rank's error stops all ranks with one line."""
    from editor.distributed import session
    from editor.modelio import load_model, load_tokenizer

    target = Path(out) / STATS_NAME

    def check() -> Job:
        job = prepare(recipe_path)
        if target.exists() and not overwrite:
            raise EditorError(f"{target} exists (use --overwrite to replace it)")
        if Path(out).exists() and not Path(out).is_dir():
            raise EditorError(f"--out {out} is not a directory")
        return job

    with session() as dist:
        job = dist.agree(check)
        tokenizer = dist.agree(load_tokenizer, job.recipe)
        model = dist.agree(lambda: load_model(job.recipe, job.config, device=dist.model_device(job.recipe, job.config)))
        stats = profile_job(job, model, tokenizer, progress=progress and dist.is_main, dist=dist)
        if dist.is_main:
            dist.agree(save_stats, target, stats, model=job.recipe.model, revision=job.recipe.revision)
        else:
            dist.agree(lambda: None)  # wait for rank 0's write (and fail with it)
    return target


# ---------------------------------------------------------------------------------------------
# planning from statistics (in memory or from a file)
# ---------------------------------------------------------------------------------------------


def _gaussians(source, set_name: str, n_layers: int, kind: str = "pre") -> tuple[dict[int, Gaussian], int]:
    out = {}
    count = 0
    for i in range(n_layers):
        if isinstance(source, StatsFile):
            mean, std = source.stat(set_name, i, kind, "mean"), source.stat(set_name, i, kind, "std")
            count = int(source.stat(set_name, i, kind, "count"))
        else:
            if set_name not in source:
                raise EditorError(f"no statistics for data set {set_name!r}")
            m = source[set_name].get(i, kind)
            # rounded to float32 exactly as save_stats writes them: planning from memory and from
            # the stats file must give the same plan (and the same plan digest / checkpoint bytes)
            mean, std, count = m.mean.float().cpu(), m.std.float().cpu(), int(m.count)
        out[i] = Gaussian.of(mean, std, where=f"for set {set_name!r} layer {i}")
    return out, count


def _forget_retain(job: Job, source, forget: str, retain: list[str]) -> tuple[dict, dict]:
    f, _ = _gaussians(source, forget, job.n_layers)
    parts = [_gaussians(source, r, job.n_layers) for r in retain]
    r = {i: pooled([p[0][i] for p in parts], [p[1] for p in parts]) for i in range(job.n_layers)}
    return f, r


def plan_from_sets(job: Job, source) -> NAPlan:
    na = job.recipe.neuron_adjust
    f, r = _forget_retain(job, source, na.forget, na.retain_sets)
    return plan_neuron_adjust(f, r, top_percent=na.top_percent, mode=na.mode, seed=na.seed, score=na.score)


def plan_key_space(job: Job, source) -> tuple[dict[int, KSDBounds], dict]:
    ks = job.recipe.key_space
    name = ksd_set_name(job.recipe)
    layer = resolve_layer(ks.layer, job.n_layers, "key_space.layer")
    if isinstance(source, StatsFile):
        if not source.has_set(name):
            raise EditorError(f"statistics have no set {name!r}: profile again with this recipe")
        get = lambda stat: source.stat(name, layer, "key", stat)  # noqa: E731
    else:
        if name not in source:
            raise EditorError(f"no statistics for {name!r}")
        m = source[name].get(layer, "key")
        vals = {"mean": m.mean.float().cpu(), "std": m.std.float().cpu(), "min": m.min.float().cpu(), "max": m.max.float().cpu()}
        get = vals.__getitem__
    if ks.calibrated and ks.detector == "linear":
        return _linear_key_space(job, source, name)
    if ks.calibrated:
        return _calibrated_key_space(job, source, name)
    b = ksd_bounds(get("mean"), get("std"), get("min"), get("max"), ks.scale)
    return {layer: b}, {"method": "paper", "layer": layer, "scale": ks.scale, "k": b.k, "set": name}


def _calibrated_key_space(job: Job, source, name: str) -> tuple[dict[int, KSDBounds], dict]:
    """Bounds of the calibrated setting stored by ``profile_job``: the chosen layer(s), dims and α
    over the KSD set's streaming statistics (other dims ±inf) — the same from memory or file."""
    info = _stored_calibration(job, source, name)
    bounds = {}
    for layer in info["layers"]:
        if isinstance(source, StatsFile):
            st = {s: source.stat(name, layer, "key", s) for s in ("mean", "std", "min", "max")}
        else:
            m = source[name].get(layer, "key")
            st = {"mean": m.mean.float().cpu(), "std": m.std.float().cpu(), "min": m.min.float().cpu(), "max": m.max.float().cpu()}
        dims = torch.tensor(info["dims"][str(layer)], dtype=torch.long)
        bounds[int(layer)] = ksd_bounds(st["mean"], st["std"], st["min"], st["max"], info["scale"][str(layer)], dims=dims)
    plan = {"method": "calibrated", "layers": info["layers"], "scale": info["scale"],
            "dims": {str(i): b.dims for i, b in bounds.items()}, "k": {str(i): b.k for i, b in bounds.items()},
            "cv": info["cv"], "retain": info["config"]["retain"], "set": name}
    return bounds, plan


def _stored_calibration(job: Job, source, name: str) -> dict:
    from editor.calibrate import calibration_config

    info = (source.sets.get(name, {}) if isinstance(source, StatsFile) else source[name].info).get("calibration")
    if not info or info.get("config") != calibration_config(job.recipe):
        raise EditorError("the statistics hold no key_space calibration for these settings "
                          "(key_space.retain / detector / false_positive_budget / folds / seed / check): "
                          "profile again with this recipe")
    return info


def _linear_key_space(job: Job, source, name: str) -> tuple[dict[int, LinearShare], dict]:
    """The pooled linear detector stored by ``profile_job``: per layer its weight, the bias on the
    first layer (the runtime sums the layers' shares) — the same from memory or file."""
    info = _stored_calibration(job, source, name)
    shares = {}
    for j, layer in enumerate(info["layers"]):
        w = source.detector(name, layer) if isinstance(source, StatsFile) else source[name].detector[layer]
        shares[int(layer)] = LinearShare(w.to(torch.float32).cpu(), info["bias"] if j == 0 else 0.0)
    plan = {"method": "linear", "detector": "linear", "pool": info["pool"], "layers": info["layers"],
            "cv": info["cv"], "retain": info["config"]["retain"], "set": name}
    return shares, plan


def plan_all(job: Job, source) -> Plans:
    r = job.recipe
    plans = Plans()
    if r.neuron_adjust:
        plans.neuron_adjust = plan_from_sets(job, source)
        if r.key_space and isinstance(source, StatsFile):
            from editor.patch import plan_digest

            info = source.sets.get(r.key_space.forget + NA_SUFFIX, {})
            if info.get("neuron_adjust") != plan_digest(plans.neuron_adjust):
                raise EditorError("the statistics' KSD keys were profiled under a different Neuron Adjust plan: profile again with this recipe")
    if r.key_space:
        plans.key_space, plans.key_space_info = plan_key_space(job, source)
    if r.prune:
        f, rt = _forget_retain(job, source, r.prune.forget, r.prune.retain_sets)
        plans.prune = select_neurons({i: neuron_scores(f[i], rt[i], r.prune.score) for i in f}, r.prune.top_percent)
    return plans


def load_job_stats(stats_dir) -> StatsFile:
    p = Path(stats_dir)
    return load_stats(p / STATS_NAME if p.is_dir() else p)


def apply_plans(job: Job, model, tokenizer, plans: Plans, *, na_applied: bool = False) -> dict | None:
    """Patch ``model`` in place; return the checkpoint's ``skill_editor`` dict (None for prune)."""
    from editor.patch import apply_key_space, apply_neuron_adjust, apply_prune, edit_description, refusal_token_ids

    spec = spec_for(job.config)
    if plans.prune is not None:
        apply_prune(model, spec, plans.prune)
        return None
    if plans.neuron_adjust is not None and not na_applied:
        apply_neuron_adjust(model, spec, job.model_type, plans.neuron_adjust)
    refusal = refusal_ids = None
    check = job.recipe.key_space.check if job.recipe.key_space else "every_call"
    if plans.key_space:
        apply_key_space(model, spec, job.model_type, plans.key_space)
        refusal = job.recipe.key_space.refusal
        refusal_ids = refusal_token_ids(tokenizer, refusal)
    edit = edit_description(job.model_type, plans.neuron_adjust, plans.key_space or None, refusal, refusal_ids, model,
                            check=check)
    if plans.key_space_info:
        edit["key_space"]["plan"] = plans.key_space_info
    return edit


def stats_dir_for(out: Path) -> Path:
    """Where ``run`` keeps the statistics it profiled: beside the checkpoint, ``<out>.stats/``."""
    out = Path(out)
    return out.parent / f"{out.name}.stats"


def run_recipe(recipe_path, out=None, *, overwrite: bool = False, progress: bool = True, echo=print) -> dict:
    """The whole job: validate → (scorecard before) → profile → plan → patch → (scorecard after)
    → export in every format of the recipe. Returns a summary dict."""
    from editor.export_hf import build_edited, export_hf, export_onnx_for
    from editor.modelio import load_model, load_tokenizer

    job = prepare(recipe_path)
    r = job.recipe
    out = Path(out) if out else r.out_dir()
    check_destination(out, overwrite)
    formats = list(dict.fromkeys(r.export.formats or ["hf"]))
    onnx_out = out if formats == ["onnx"] else out.parent / f"{out.name}-onnx"
    if "onnx" in formats and formats != ["onnx"]:
        check_destination(onnx_out, overwrite)
    stats_path = stats_dir_for(out) / STATS_NAME
    if stats_path.exists() and not overwrite:
        raise EditorError(f"{stats_path} exists (use --overwrite to replace it)")
    tokenizer = load_tokenizer(r)
    model = load_model(r, job.config)

    before = records = None
    if r.evaluate:
        from editor.evaluate import score

        records = job.sets[r.evaluate.data].records
        echo(f"scoring the base model on {len(records)} records of {r.evaluate.data!r}")
        before = score(model, tokenizer, records, batch_size=r.evaluate.batch_size, max_new_tokens=r.evaluate.max_new_tokens)

    stats = profile_job(job, model, tokenizer, progress=progress)
    save_stats(stats_path, stats, model=r.model, revision=r.revision)
    echo(f"wrote {stats_path}")
    ed = build_edited(job, load_stats(stats_path), model=model, tokenizer=tokenizer,
                      na_applied=bool(r.neuron_adjust and r.key_space))
    edited = ed.wrapped

    card = None
    if r.evaluate:
        from editor.evaluate import scorecard

        echo("scoring the edited model")
        card = scorecard(None, edited, tokenizer, records, batch_size=r.evaluate.batch_size,
                         max_new_tokens=r.evaluate.max_new_tokens, before=before)
    if hasattr(edited, "reset_neuron_adjust_rng"):
        edited.reset_neuron_adjust_rng()  # the export starts from the seed, whatever ran before

    written = {}
    if "hf" in formats:
        written["hf"] = str(export_hf(job, ed.model, tokenizer, ed.plans, ed.edit, out, overwrite=overwrite,
                                      stats_file=stats_path, scorecard=card))
    if "onnx" in formats:
        written["onnx"] = str(export_onnx_for(job, ed, onnx_out, stats_path=stats_path, overwrite=overwrite, scorecard=card))
    summary = {"out": written, "stats": str(stats_path), "plans": _plans_summary(ed.plans), "scorecard": card}
    if card is not None:
        from editor.evaluate import render_scorecard

        echo(render_scorecard(card))
    return summary


def _plans_summary(plans: Plans) -> dict:
    out = {}
    if plans.neuron_adjust:
        out["neuron_adjust"] = plans.neuron_adjust.summary()
    if plans.key_space:
        out["key_space"] = plans.key_space_info
    if plans.prune is not None:
        out["prune"] = {str(i): int(v.numel()) for i, v in plans.prune.items()}
    return out
