"""The exported Hugging Face checkpoint (DESIGN §4): a directory that loads with nothing but
``torch`` + ``transformers``.

Layout of a Neuron Adjust / Key Space Detection export::

    config.json                      model_type "skill_editor", auto_map, base config as text_config,
                                     the edit (``skill_editor``: counts, KSD bounds info, patch_digest)
    configuration_skill_editor.py    editor/runtime/* copied verbatim (torch + transformers only)
    modeling_skill_editor.py
    model.safetensors                base weights (MLP neurons permuted) + the patch tensors
      (or model-0000i-of-0000n.safetensors + model.safetensors.index.json for big models)
    generation_config.json, tokenizer files
    README.md                        the model card (editor.card)
    skill_editor.json                recipe, tool version, statistics provenance, per-layer counts,
                                     KSD layer/k/scale/refusal, scorecard, sha256 of every other file

The prune baseline (``edit is None``) exports a plain checkpoint of the base architecture (no
custom code, loads without ``trust_remote_code``) with the same README / skill_editor.json.

Everything is written into a temporary directory beside the destination and renamed into place
(``editor.io.atomic_directory``); the same recipe + seed + statistics give byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editor import __version__
from editor.errors import EditorError
from editor.io import atomic_directory, check_destination, sha256_file

MANIFEST = "skill_editor.json"
MANIFEST_FORMAT = "skill-editor/checkpoint"
MANIFEST_VERSION = 1
RUNTIME_FILES = ("configuration_skill_editor.py", "modeling_skill_editor.py")
RUNTIME_DIR = Path(__file__).resolve().parent / "runtime"
DEFAULT_SHARD = "5GB"


# ---------------------------------------------------------------------------------------------
# load + plan + patch (shared by `export` and `run`)
# ---------------------------------------------------------------------------------------------


@dataclass
class Edited:
    """A patched in-memory model and everything the exporters need."""

    model: Any  # the patched base model (NA / KSD installed, or pruned)
    tokenizer: Any
    plans: Any  # editor.pipeline.Plans
    edit: dict | None  # the checkpoint's ``skill_editor`` dict; None for the prune baseline

    @property
    def wrapped(self):
        """The checkpoint class around the patched model (what a checkpoint loads as); the plain
        model for the prune baseline."""
        if self.edit is None:
            return self.model
        from editor.patch import wrap

        return wrap(self.model, self.edit)


def build_edited(job, stats, *, model=None, tokenizer=None, na_applied: bool = False) -> Edited:
    """Load model + tokenizer (unless given), plan from ``stats`` (a StatsFile or in-memory sets)
    and patch the model in place.

    ``na_applied``: the model already carries the NA patch of these statistics (``profile_job``
    leaves it so when both methods are on).
    """
    from editor import pipeline
    from editor.modelio import load_model, load_tokenizer

    if tokenizer is None:
        tokenizer = load_tokenizer(job.recipe)
    plans = pipeline.plan_all(job, stats)  # plan before loading weights: bad stats fail fast
    if model is None:
        model = load_model(job.recipe, job.config)
        na_applied = False
    edit = pipeline.apply_plans(job, model, tokenizer, plans, na_applied=na_applied)
    return Edited(model, tokenizer, plans, edit)


# ---------------------------------------------------------------------------------------------
# provenance / manifest
# ---------------------------------------------------------------------------------------------


def stats_provenance(stats) -> dict | None:
    """What the statistics were: a StatsFile or a path to stats.safetensors (metadata + content
    digest, ``editor.stats.content_digest``) or in-memory sets ({name: SetStats})."""
    if stats is None:
        return None
    from editor.stats import StatsFile, content_digest, load_stats

    path = None
    if isinstance(stats, (str, os.PathLike)):
        path = Path(stats)
        if path.is_dir():
            from editor.pipeline import STATS_NAME

            path = path / STATS_NAME
        stats = load_stats(path)
    if isinstance(stats, StatsFile):
        meta = dict(stats.metadata)
        out: dict[str, Any] = {k: meta[k] for k in ("format", "version", "tool_version", "model", "revision") if k in meta}
        out["sets"] = stats.sets
        extra = {k: v for k, v in meta.items() if k not in out and k != "sets"}
        for k, v in sorted(extra.items()):
            try:
                out[k] = json.loads(v)
            except (TypeError, ValueError):
                out[k] = v
        if path is not None:
            out["file"] = path.name
        out["digest"] = content_digest(stats)
        return out
    if isinstance(stats, dict):
        return {"sets": {k: getattr(v, "info", {}) for k, v in sorted(stats.items())}, "in_memory": True}
    return None


def edit_summary(job, plans, edit: dict | None) -> dict:
    """Methods, per-layer neuron counts, KSD layer / k / scale / refusal — for the manifest,
    the card and ``inspect``."""
    r = job.recipe
    out: dict[str, Any] = {"methods": r.methods, "arch": job.model_type, "num_layers": job.n_layers}
    na = plans.neuron_adjust
    if na is not None:
        counts = {str(i): int(n) for i, n in sorted(na.counts.items())}
        out["neuron_adjust"] = {
            "forget": r.neuron_adjust.forget, "retain": r.neuron_adjust.retain_sets,
            "mode": na.mode, "seed": na.seed, "score": na.score, "top_percent": na.top_percent,
            "counts": counts, "total": sum(counts.values()),
        }
    if plans.key_space:
        layers = sorted(plans.key_space)
        ks: dict[str, Any] = {"forget": r.key_space.forget, "layers": layers}
        if r.key_space.detector == "linear":
            ks.update(detector="linear", pool="max")
        else:
            ks.update(layer=layers[0] if len(layers) == 1 else layers,
                      k={str(i): plans.key_space[i].k for i in layers},
                      scale={str(i): plans.key_space[i].scale for i in layers},
                      dims={str(i): plans.key_space[i].dims for i in layers})
        ks.update(refusal=r.key_space.refusal, check=r.key_space.check,
                  profiled_with_neuron_adjust=bool(na is not None))
        if plans.key_space_info:
            ks["plan"] = plans.key_space_info
        out["key_space"] = ks
    if plans.prune is not None:
        counts = {str(i): int(v.numel()) for i, v in sorted(plans.prune.items())}
        out["prune"] = {"forget": r.prune.forget, "retain": r.prune.retain_sets, "top_percent": r.prune.top_percent,
                        "score": r.prune.score, "counts": counts, "total": sum(counts.values())}
    if edit is not None:
        out["patch_digest"] = edit.get("patch_digest")
    return out


def file_digests(root: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    """sha256 of every regular file under ``root`` (POSIX relative paths, sorted)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel not in exclude:
                out[rel] = sha256_file(p)
    return out


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


class _NameOrPath:
    """Record the recipe's model reference (not this machine's path) in the saved config."""

    def __init__(self, config, value: str):
        self.config, self.value = config, value

    def __enter__(self):
        self.old = getattr(self.config, "_name_or_path", "")
        self.config._name_or_path = self.value

    def __exit__(self, *exc):
        self.config._name_or_path = self.old


def _save_model(model, tmp: Path, max_shard_size) -> None:
    model.save_pretrained(str(tmp), max_shard_size=max_shard_size)


def _write_runtime(tmp: Path) -> None:
    for name in RUNTIME_FILES:
        shutil.copyfile(RUNTIME_DIR / name, tmp / name)


def _save_tokenizer(tokenizer, tmp: Path) -> None:
    tokenizer.save_pretrained(str(tmp))


def _write_card(tmp: Path, manifest: dict, config: dict) -> None:
    from editor.card import build_card

    (tmp / "README.md").write_text(str(build_card(manifest, config)), encoding="utf-8")


def _write_manifest(tmp: Path, manifest: dict) -> None:
    manifest = dict(manifest)
    manifest["files"] = file_digests(tmp)
    (tmp / MANIFEST).write_bytes(_json_bytes(manifest))


def _normalize(tmp: Path) -> None:
    """Ordinary permissions (the temp dir and some library writes are owner-only)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)
    for p in tmp.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def build_manifest(job, model, plans, edit: dict | None, *, stats_file=None, scorecard: dict | None = None) -> dict:
    """``skill_editor.json`` without its ``files`` digests: recipe, tool version, statistics'
    provenance, the edit (per-layer counts, KSD layer/k/scale/refusal), the scorecard."""
    r = job.recipe
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "tool": "skill-editor",
        "tool_version": __version__,
        "kind": "plain" if edit is None else "patched",
        "base_model": {"model": r.model, "revision": r.revision, "model_type": job.model_type,
                       "local": r.resolve(r.model).exists() or r.model.startswith("editor:"),
                       "dtype": str(getattr(model, "dtype", "")).removeprefix("torch.")},
        "recipe": r.to_metadata(),
        "statistics": stats_provenance(stats_file),
        "edit": edit_summary(job, plans, edit),
    }
    if scorecard is not None:
        manifest["scorecard"] = scorecard
    return manifest


def export_hf(job, model, tokenizer, plans, edit: dict | None, out, *, overwrite: bool = False,
              stats_file=None, scorecard: dict | None = None, max_shard_size=DEFAULT_SHARD) -> Path:
    """Write the checkpoint directory ``out`` atomically; return its path.

    ``model`` is the patched base model (``pipeline.apply_plans``), ``edit`` its ``skill_editor``
    dict (None: prune baseline, a plain checkpoint). ``stats_file``: a StatsFile, a path to the
    statistics, or in-memory sets (for provenance). ``scorecard``: the eval module's dict.
    """
    out = check_destination(out, overwrite)
    r = job.recipe
    manifest = build_manifest(job, model, plans, edit, stats_file=stats_file, scorecard=scorecard)
    to_save = model
    with atomic_directory(out, overwrite=overwrite) as tmp:
        with _NameOrPath(model.config, r.model):
            if edit is not None:
                from editor.patch import wrap

                # the base config travels inside the checkpoint config, with the recipe's name
                to_save = wrap(model, edit)
            _save_model(to_save, tmp, max_shard_size)
        if edit is not None:
            _write_runtime(tmp)
        _save_tokenizer(tokenizer, tmp)
        if not (tmp / "generation_config.json").exists() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        _write_card(tmp, manifest, config)
        _normalize(tmp)
        _write_manifest(tmp, manifest)
        _normalize(tmp)
    return Path(out)


# ---------------------------------------------------------------------------------------------
# the `export` command
# ---------------------------------------------------------------------------------------------


def export_recipe(recipe_path, stats, out=None, *, fmt: str = "hf", overwrite: bool = False,
                  max_shard_size=DEFAULT_SHARD) -> Path:
    """``skill-editor export``: validate the recipe (no weights), read the statistics, load the
    model, plan, patch and export in ``fmt`` (hf | onnx)."""
    from editor import pipeline

    if fmt not in ("hf", "onnx"):
        raise EditorError(f"--format must be hf or onnx, got {fmt!r}")
    job = pipeline.prepare(recipe_path)
    r = job.recipe
    if fmt == "onnx" and r.neuron_adjust and r.neuron_adjust.mode == "sample":
        raise EditorError("ONNX needs a deterministic Neuron Adjust; set neuron_adjust.mode to 'expected' or 'hard'")
    out = Path(out) if out else r.out_dir()
    check_destination(out, overwrite)
    stats_file = pipeline.load_job_stats(stats)
    stats_path = Path(stats)
    if stats_path.is_dir():
        stats_path = stats_path / pipeline.STATS_NAME
    ed = build_edited(job, stats_file)
    if fmt == "hf":
        return export_hf(job, ed.model, ed.tokenizer, ed.plans, ed.edit, out, overwrite=overwrite,
                         stats_file=stats_path, max_shard_size=max_shard_size)
    return export_onnx_for(job, ed, out, stats_path=stats_path, overwrite=overwrite)


def export_onnx_for(job, ed: Edited, out, *, stats_path=None, overwrite: bool = False, scorecard=None) -> Path:
    """The ONNX export of an edited model, with the manifest and validation prompts that exercise
    both sides of the edit (abstention included)."""
    from editor.export_onnx import export_onnx  # lazily: optional dependencies

    r = job.recipe
    manifest = build_manifest(job, ed.model, ed.plans, ed.edit, stats_file=stats_path, scorecard=scorecard)
    prompts = []
    for name in dict.fromkeys(n for n in (r.key_space.forget if r.key_space else None,
                                          r.neuron_adjust.forget if r.neuron_adjust else None,
                                          *(r.neuron_adjust.retain_sets if r.neuron_adjust else [])) if n):
        prompts += [t for t in job.sets[name].texts[:2] if t.strip()]
    from editor.card import build_card

    card = str(build_card(manifest, fmt="onnx"))
    result = export_onnx(ed.wrapped, ed.tokenizer, out, opset=r.export.onnx_opset, overwrite=overwrite,
                         extra_files={MANIFEST: manifest, "README.md": card}, prompts=prompts or None)
    return Path(result)
