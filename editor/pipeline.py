"""The one orchestrator: recipe → data → profile → plan → patch → (scorecard) → export, for the
CLI and the Python API (``run_recipe``, ``profile_recipe``, ``export_recipe``).

Every other module is one stage and imports only earlier stages and the leaves; only this one
wires them. Everything that can be validated without weights (recipe, config.json, data sets)
is validated in ``prepare`` before any weight is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from editor.data import (TextSet, background_set, check_scorecard_records, contrast_split, load_all, needs_tokenizer,
                         ordinary_eval_set)
from editor.errors import EditorError
from editor.eval.attacks import attack_prompts, attack_requests
from editor.eval.scorecard import examples_of, render_scorecard, score, scorecard
from editor.export.hf import export_hf
from editor.heap import release_freed
from editor.io import atomic_directory, check_destination, check_parent, hold_destination, replaced_together
from editor.manifest import DEFAULT_SHARD, Edit, build_manifest
from editor.methods.calibrate import KeySet, calibrate_keys, calibrate_linear, calibration_config, continuation_tokens
from editor.model.arch import ArchSpec, config_layers, spec_for
from editor.model.identity import model_identity, weights_fingerprint
from editor.model.loading import (check_against_config, load_config, load_model, load_tokenizer, model_file_identity,
                                  offloaded_modules, pick_dtype)
from editor.patch import apply_neuron_adjust, apply_plans, wrap
from editor.plan import NA_SUFFIX, Plans, ksd_set_name, plan_all, plan_na
from editor.profile import collect
from editor.profile.distributed import Dist, session
from editor.profile.stream import profile_set
from editor.profile.stats import (STATS_NAME, ProfiledSets, StatsFile, check_identity, load_stats, provenance, save_stats,
                                  stats_path)
from editor.progress import bar, stage
from editor.recipe import Recipe, load_recipe


@dataclass
class Job:
    """A validated recipe with the model's config.json and every data set (no weights)."""

    recipe: Recipe
    config: object
    sets: dict[str, TextSet]
    recipe_path: Path | None = None
    background: TextSet | None = None  # the calibration's background negatives (key_space.background)
    ordinary: TextSet | None = None  # the scorecard's ordinary prompts (evaluate.ordinary)
    model_file: dict | None = None  # the model file as recorded (model_file_identity: a GGUF file's name and sha256)
    tokenizer: object | None = None  # loaded by ``prepare`` when a set is rendered in chat form (reused by the run)

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def n_layers(self) -> int:
        return config_layers(self.config)

    def plans(self, stats) -> Plans:
        """Every plan of the recipe from ``stats`` (a calibrated guard: fitted on this job's background)."""
        return plan_all(self.recipe, self.n_layers, stats, self.background.info if self.background else None)

    def identity(self, model=None) -> dict:
        """What identifies the profiled model (``editor.model.identity``, and a GGUF file's name and
        sha256); with ``model`` (the base, before any edit) its weights' fingerprint too."""
        ident = model_identity(self.recipe, self.config, pick_dtype(self.recipe, self.config))
        ident.update({k: v for k, v in (self.model_file or {}).items() if k in ("gguf_file", "gguf_sha256")})
        if model is not None:
            ident["weights"] = weights_fingerprint(model)
        return ident

    def set_fingerprints(self) -> dict[str, str]:
        """{set: fingerprint} of the sets the statistics must hold (the profiled ones)."""
        return {n: self.sets[n].info["fingerprint"] for n in self.recipe.profiled_sets()}


def prepare(recipe: Recipe | str | Path) -> Job:
    """Recipe, config.json and every data set, validated — no weights loaded."""
    path = None
    if not isinstance(recipe, Recipe):
        path = Path(recipe)
        recipe = load_recipe(path)
    config = load_config(recipe)
    check_against_config(recipe, config)
    # the chat form needs the tokenizer's template (no weights): loaded here, validated with the data
    tokenizer = load_tokenizer(recipe) if needs_tokenizer(recipe) else None
    sets = load_all(recipe, tokenizer=tokenizer)
    if recipe.evaluate:
        scorecard = sets[recipe.evaluate.data]
        check_scorecard_records(scorecard.records, scorecard.origins, f"evaluate.data: set {scorecard.name!r}")
        if recipe.evaluate.attacks:
            attack_requests(scorecard.records, recipe.evaluate.attacks)
    return Job(recipe, config, sets, path, background_set(recipe, sets, tokenizer), ordinary_eval_set(recipe, sets, tokenizer),
               model_file_identity(recipe), tokenizer)


def _load(recipe) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def _prepared(recipe: Recipe, recipe_path) -> Job:
    """``prepare`` of a recipe already loaded from ``recipe_path`` (its destinations checked first)."""
    job = prepare(recipe)
    job.recipe_path = Path(recipe_path) if not isinstance(recipe_path, Recipe) else None
    return job


# ---------------------------------------------------------------------------------------------
# profile (+ the NA-active pass and the key_space calibration)
# ---------------------------------------------------------------------------------------------


def profile_job(job: Job, model, tokenizer, *, progress: bool = True, dist: Dist | None = None) -> ProfiledSets:
    """Profile every named set. With NA and KSD both on, plan NA from these statistics, apply it
    and profile the KSD forget set again (``<set>@neuron_adjust``, tied to the plan's digest): the
    box must describe the keys the edited model sees. The NA patch stays on ``model`` (``apply_plans``
    keeps it). A calibrated ``key_space`` then collects its probe keys, under NA when it is on, and
    stores its choice with the KSD set. ``dist`` (torchrun): each rank profiles a shard, merged."""
    r = job.recipe
    profile = dist.profile_set if dist is not None else profile_set
    if r.neuron_adjust and r.key_space and (off := offloaded_modules(model)):
        raise EditorError(f"neuron_adjust + key_space: the NA-active pass edits weights in place, but accelerate offloads "
                          f"{len(off)} module(s) to cpu/disk (e.g. {off[0]}): give the model enough GPU memory")
    spec = spec_for(job.config)
    out = ProfiledSets()
    # a pooled linear detector reads its forget set's keys as they are in the base model: the profile
    # pass of that set collects them too (one pass, not two), unless the NA-active pass changes them
    shared = None
    if dist is None and r.profile_collects_forget_keys():
        shared = collect.PerTextKeys(model, spec, len(job.sets[r.key_space.forget].texts), collect.max_over_real_tokens)
    with stage("profile"):
        for name in r.profiled_sets():
            tap = shared.tap if shared is not None and name == r.key_space.forget else None
            out[name] = profile(model, tokenizer, spec, job.sets[name], r.profile, progress=progress,
                                **({"also_key": tap} if tap is not None else {}))
        if r.neuron_adjust and r.key_space:
            plan = plan_na(r, job.n_layers, out)
            apply_neuron_adjust(model, spec, job.model_type, plan)
            ts = job.sets[r.key_space.forget]
            s = profile(model, tokenizer, spec, ts, r.profile, desc=f"{ts.name} (NA on)", progress=progress)
            s.info["neuron_adjust"] = plan.digest()
            out[ts.name + NA_SUFFIX] = s
    if r.key_space and r.key_space.calibrated:
        target = out[ksd_set_name(r)]
        target.info["calibration"], target.detector = calibrate_job(
            job, model, tokenizer, spec, progress=progress, forget_keys=shared.take() if shared is not None else None)
    return out


def calibrate_job(job: Job, model, tokenizer, spec: ArchSpec, *, progress: bool = False,
                  forget_keys: dict[int, torch.Tensor] | None = None) -> tuple[dict, dict[int, torch.Tensor]]:
    """The calibrated ``key_space``: the keys of its forget set, of its retain query sets and of its
    background negatives (the only sets it reads; the budget holds on the background as on each
    retain set), then the pure calibration (``editor.methods.calibrate``). Returns the record
    stored with the statistics and the linear detector's weights ({} for a box). Two timed stages,
    ``calibration keys`` and ``calibration fit``, each with its progress bars. ``forget_keys``: the
    linear detector's pooled keys of the forget set, when the profile pass collected them."""
    ks, p = job.recipe.key_space, job.recipe.profile
    kw = dict(batch_size=p.batch_size, max_length=p.max_length, padding_side=p.padding_side, progress=progress)
    forget = job.sets[ks.forget].texts
    # one budget group per negative set and form — the false-positive budget holds in raw and in chat
    # form —, and the background's near-neighbour contrast prompts a group of their own (contrast_split)
    negatives, names = [], []
    sources = [(n, job.sets[n]) for n in ks.retain_sets]
    if job.background:
        sources += [("contrast" if part else "background", ts) for part, ts in contrast_split(job.background)]
    for name, ts in sources:
        for form in ts.form_names:
            negatives.append(ts.in_form(form))
            names.append(name if len(ts.form_names) == 1 else f"{name}[{form}]")
    which = "retain + background" if job.background else "retain"
    retain = [t for ts in negatives for t in ts.texts]
    group = torch.tensor([g for g, ts in enumerate(negatives) for _ in ts.texts], dtype=torch.long)
    fit = dict(budget=ks.false_positive_budget, folds=ks.folds, seed=ks.seed, retain_names=names)
    if ks.detector == "linear":
        with stage("calibration keys"):
            pooled_f = forget_keys if forget_keys is not None else collect.pooled_keys(
                model, tokenizer, spec, forget, desc="keys: forget queries", **kw)
            pooled_r = collect.pooled_keys(model, tokenizer, spec, retain, desc=f"keys: {which}", **kw)
            release_freed()  # the forwards' activations: the fit's temporaries start from the keys alone
        with stage("calibration fit"), bar(progress, ks.folds, "fitting the detector", "fold") as shown:
            record, weights = calibrate_linear(pooled_f, pooled_r, group, weights=ks.weights, on_fold=shown.update, **fit)
            del pooled_f, pooled_r, forget_keys  # the only references (the profile pass's tap handed its keys over)
            release_freed()  # the keys and the fit's temporaries
    else:
        new_tokens = continuation_tokens(ks.check)

        def keys(texts: list[str], label: str, group: torch.Tensor | None = None) -> KeySet:
            prompt = collect.last_token_keys(model, tokenizer, spec, texts, desc=f"keys: {label}", **kw)
            cont, owner = collect.generated_keys(model, tokenizer, spec, texts, new_tokens=new_tokens,
                                                 batch_size=p.batch_size, max_length=p.max_length, progress=progress,
                                                 desc=f"continuation keys: {label}")
            return KeySet.of(prompt, cont, owner, group)

        with stage("calibration keys"):
            forget_keys, retain_keys = keys(forget, "forget queries"), keys(retain, which, group)
        with stage("calibration fit"):
            record, weights = calibrate_keys(forget_keys, retain_keys, **fit), {}
    record["config"] = calibration_config(job.recipe, job.background.info if job.background else None)
    return record, weights


def write_stats(job: Job, path, stats: ProfiledSets, identity: dict) -> None:
    """``stats.safetensors`` with the base model's ``identity`` (``Job.identity``: checked by
    ``export --stats``), the recipe's ``model`` as recorded and its revision, and for a GGUF model
    the file's name and sha256 (``model_file``, carried into the checkpoint's provenance)."""
    ident = job.model_file or {}
    extra = {"identity": identity}
    if "gguf_file" in ident:
        extra["model_file"] = {k: ident[k] for k in ("gguf_file", "gguf_sha256") if k in ident}
    save_stats(path, stats, model=job.recipe.recorded_model, revision=job.recipe.revision, extra=extra)


def profile_recipe(recipe_path, out, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Profile a recipe into ``out/stats.safetensors``. Under ``torchrun`` (WORLD_SIZE > 1) every
    rank profiles a shard of each set, the statistics are merged with collectives and rank 0
    writes the file (``editor.profile.distributed``); any rank's error stops all ranks with one line."""
    target = Path(out) / STATS_NAME

    def check() -> Job:
        recipe = _load(recipe_path)
        if Path(out).exists() and not Path(out).is_dir():
            raise EditorError(f"--out {out} is not a directory")
        check_parent(target, "statistics")
        if target.exists() and not overwrite:
            raise EditorError(f"{target} exists (use --overwrite to replace it)")
        return _prepared(recipe, recipe_path)

    with session() as dist:
        job = dist.agree(check)
        tokenizer = dist.agree(load_tokenizer, job.recipe)
        model = dist.agree(lambda: load_model(job.recipe, job.config, device=dist.model_device(job.recipe, job.config)))
        identity = job.identity(model)  # the base weights, before the NA-active pass edits them
        stats = profile_job(job, model, tokenizer, progress=progress and dist.is_main, dist=dist)
        if dist.is_main:
            dist.agree(write_stats, job, target, stats, identity)
        else:
            dist.agree(lambda: None)  # wait for rank 0's write (and fail with it)
    return target


# ---------------------------------------------------------------------------------------------
# plan + patch, export
# ---------------------------------------------------------------------------------------------


@dataclass
class Edited:
    """A patched in-memory model and what the exporters need."""

    model: object  # the patched base model (NA / KSD installed, or pruned)
    tokenizer: object
    plans: Plans
    edit: Edit

    @property
    def wrapped(self):
        """The checkpoint class around the patched model (what a checkpoint loads as); the plain
        model for the prune baseline."""
        config = self.edit.config()
        return self.model if config is None else wrap(self.model, config)


def edit_model(job: Job, stats: StatsFile | ProfiledSets, *, model=None, tokenizer=None) -> Edited:
    """Plan from ``stats`` and patch the model (loaded unless given) in place."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(job.recipe)
    plans = job.plans(stats)  # plan before loading weights: bad stats fail fast
    if model is None:
        model = load_model(job.recipe, job.config)
    edit = apply_plans(job.recipe, job.model_type, job.n_layers, model, tokenizer, plans)
    return Edited(model, tokenizer, plans, edit)


def _manifest(job: Job, ed: Edited, stats: StatsFile, stats_file: Path, scorecard: dict | None) -> dict:
    return build_manifest(job.recipe, model_type=job.model_type, dtype=str(getattr(ed.model, "dtype", "")).removeprefix("torch."),
                          edit=ed.edit, statistics=provenance(stats, stats_file), scorecard=scorecard)


def _export_onnx(job: Job, ed: Edited, manifest: dict, out, *, overwrite: bool) -> Path:
    """The ONNX export, validated on prompts of both sides of the edit (abstention included)."""
    from editor.export.onnx import export_onnx  # lazily: optional dependencies

    r = job.recipe
    prompts = []
    for name in dict.fromkeys(n for n in (r.key_space.forget if r.key_space else None,
                                          r.neuron_adjust.forget if r.neuron_adjust else None,
                                          *(r.neuron_adjust.retain_sets if r.neuron_adjust else [])) if n):
        prompts += [t for t in job.sets[name].texts[:2] if t.strip()]
    return Path(export_onnx(ed.wrapped, ed.tokenizer, out, opset=r.export.onnx_opset, overwrite=overwrite,
                            manifest=manifest, prompts=prompts or None, logits=r.export.onnx_logits,
                            rtol=r.export.onnx_tolerance))


def export_recipe(recipe_path, stats, out=None, *, fmt: str = "hf", overwrite: bool = False,
                  max_shard_size=DEFAULT_SHARD) -> Path:
    """``skill-editor export``: validate the recipe (no weights), read the statistics (a directory
    or the file) and check they were profiled on this recipe's model and data, load the model
    (its weights checked against the statistics' too), plan, patch and export in ``fmt`` (hf | onnx).
    The destination is checked before anything is read and locked while it is written."""
    if fmt not in ("hf", "onnx"):
        raise EditorError(f"--format must be hf or onnx, got {fmt!r}")
    recipe = _load(recipe_path)
    if fmt == "onnx" and recipe.neuron_adjust and recipe.neuron_adjust.mode == "sample":
        raise EditorError("ONNX needs a deterministic Neuron Adjust; set neuron_adjust.mode to 'expected' or 'hard'")
    out = Path(out) if out else recipe.out_dir()
    check_destination(out, overwrite)
    job = _prepared(recipe, recipe_path)
    stats_file = load_stats(stats)
    check_identity(stats_file, job.identity(), job.set_fingerprints())
    with hold_destination(out):
        model = load_model(job.recipe, job.config)
        check_identity(stats_file, job.identity(model))
        ed = edit_model(job, stats_file, model=model)
        manifest = _manifest(job, ed, stats_file, stats_path(stats), None)
        if fmt == "hf":
            return export_hf(ed.model, ed.tokenizer, ed.edit, manifest, out, overwrite=overwrite, max_shard_size=max_shard_size)
        return _export_onnx(job, ed, manifest, out, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# the whole job
# ---------------------------------------------------------------------------------------------


def stats_dir_for(out: Path) -> Path:
    """Where ``run`` keeps the statistics it profiled: beside the checkpoint, ``<out>.stats/``."""
    out = Path(out)
    return out.parent / f"{out.name}.stats"


def run_recipe(recipe_path, out=None, *, overwrite: bool = False, progress: bool = True, echo=print) -> dict:
    """The whole job: validate → (scorecard before) → profile → plan → patch → (scorecard after)
    → export in every format of the recipe. Returns a summary dict. Every destination (the
    checkpoint, the ONNX export, the statistics) is checked before any other work and locked
    until the end, and all are replaced together (``io.replaced_together``): a killed run never
    leaves statistics beside a checkpoint they did not make."""
    r = _load(recipe_path)
    out = Path(out) if out else r.out_dir()
    check_destination(out, overwrite)
    formats = list(dict.fromkeys(r.export.formats or ["hf"]))
    onnx_out = out if formats == ["onnx"] else out.parent / f"{out.name}-onnx"
    if "onnx" in formats and formats != ["onnx"]:
        check_destination(onnx_out, overwrite)
    stats_dir = check_destination(stats_dir_for(out), overwrite)
    with stage("validate"):
        job = _prepared(r, recipe_path)
    with replaced_together([out, onnx_out, stats_dir] if "onnx" in formats else [out, stats_dir], overwrite):
        summary = _run(job, out, onnx_out, formats, stats_dir, overwrite=overwrite, progress=progress, echo=echo)
    echo(f"wrote {summary['stats']}")
    return summary


def _run(job: Job, out: Path, onnx_out: Path, formats: list[str], stats_dir: Path, *, overwrite: bool, progress: bool,
         echo) -> dict:
    """``run_recipe``'s work, inside ``replaced_together``: the statistics directory and the
    checkpoint(s) are written into temporary directories and put in place together at the end."""
    r = job.recipe
    with stage("load"):
        tokenizer = job.tokenizer if job.tokenizer is not None else load_tokenizer(r)
        model = load_model(r, job.config)
        identity = job.identity(model)

    before = records = attacks = None
    if r.evaluate:
        ts = job.sets[r.evaluate.data]
        records = examples_of(ts)
        if r.evaluate.attacks:
            attacks = {"skill": r.evaluate.attacks, "prompts": attack_prompts(attack_requests(ts.records, r.evaluate.attacks),
                                                                              ts.form_names, tokenizer)}
        forms = f" ({' and '.join(ts.form_names)} form)" if ts.forms is not None else ""
        echo(f"scoring the base model on {len(records)} prompts of {r.evaluate.data!r}{forms}")
        with stage("base scorecard"):
            before = score(model, tokenizer, records, batch_size=r.evaluate.batch_size,
                           max_new_tokens=r.evaluate.max_new_tokens, progress=progress, desc="scoring base")
            release_freed()  # inside the stage: the generation's caches are not carried into the next stages' peaks

    profiled = profile_job(job, model, tokenizer, progress=progress)
    with stage("plan + patch"):
        with atomic_directory(stats_dir, overwrite=overwrite) as tmp:
            write_stats(job, tmp / STATS_NAME, profiled, identity)
            stats = load_stats(tmp / STATS_NAME)
        ed = edit_model(job, stats, model=model, tokenizer=tokenizer)
        edited = ed.wrapped

    card = None
    if r.evaluate:
        echo("scoring the edited model")
        with stage("edited scorecard"):
            card = scorecard(None, edited, tokenizer, records, batch_size=r.evaluate.batch_size,
                             max_new_tokens=r.evaluate.max_new_tokens, before=before, ordinary=job.ordinary,
                             ordinary_new_tokens=r.evaluate.ordinary_new_tokens, attacks=attacks, progress=progress)
            release_freed()
    if hasattr(edited, "reset_neuron_adjust_rng"):
        edited.reset_neuron_adjust_rng()  # the export starts from the seed, whatever ran before

    manifest = _manifest(job, ed, stats, stats_dir / STATS_NAME, card)
    written = {}
    with stage("export"):
        if "hf" in formats:
            written["hf"] = str(export_hf(ed.model, tokenizer, ed.edit, manifest, out, overwrite=overwrite))
        if "onnx" in formats:
            written["onnx"] = str(_export_onnx(job, ed, manifest, onnx_out, overwrite=overwrite))
    if card is not None:
        echo(render_scorecard(card))
    return {"out": written, "stats": str(stats_dir / STATS_NAME), "plans": ed.plans.summary(), "scorecard": card}
