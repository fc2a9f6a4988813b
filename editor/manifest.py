"""One description of an edit and one manifest format, shared by the HF and ONNX exporters,
``inspect`` / ``restore``, the model card and the ONNX generator.

* ``Edit``: what an edit is — the methods, per-layer neuron counts, the KSD guard and its refusal,
  the data sets it was planned from, the patch digest. Two views of it are written: ``config()``,
  the ``skill_editor`` dict of ``config.json`` that the shipped runtime reads, and ``summary()``,
  the ``edit`` section of ``skill_editor.json`` that people and tools read.
* ``build_manifest`` / ``write_manifest``: ``skill_editor.json`` — format, tool version, base
  model, recipe, statistics provenance, the edit, the scorecard, and the sha256 of every other
  file of the directory (an ONNX export adds its ``onnx`` section).
* The names of the files an export holds.

A leaf: standard library only (the ONNX generator runs without torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editor import __version__
from editor.io import json_bytes, sha256_file

DEFAULT_SHARD = "5GB"  # the largest safetensors shard of an export or a restore (transformers' own default)

MANIFEST = "skill_editor.json"
MANIFEST_FORMAT = "skill-editor/checkpoint"
MANIFEST_VERSION = 1
CONFIG = "config.json"
EDIT_KEY = "skill_editor"  # the edit (Edit.config()) in config.json (SkillEditorConfig's field) and in an ONNX graph's metadata
GRAPH_FORMAT_KEY = "skill_editor.format"  # an ONNX graph's metadata: ONNX_FORMAT
CARD = "README.md"
INDEX = "model.safetensors.index.json"
RUNTIME_FILES = ("configuration_skill_editor.py", "modeling_skill_editor.py")
RUNTIME_DIR = Path(__file__).resolve().parent / "runtime"  # the tool's own copy of the shipped files
# config.json's auto_map of a patched checkpoint: the shipped runtime's two classes
AUTO_MAP = {
    "AutoConfig": "configuration_skill_editor.SkillEditorConfig",
    "AutoModelForCausalLM": "modeling_skill_editor.SkillEditorForCausalLM",
}
ONNX_MODEL = "model.onnx"
ONNX_DATA = "model.onnx.data"
ONNX_FORMAT = "skill-editor/onnx"
ONNX_FORMAT_VERSION = 2  # 2: logits of the last position by default (export.onnx_logits), tolerance-scaled validation


@dataclass
class Edit:
    """One edit. ``neuron_adjust``: forget, retain, mode, seed, score, top_percent, counts
    ({layer: n}); ``key_space``: forget, layers, detector ("box" | "linear"), per-layer k / scale /
    dims (box), refusal, refusal_ids, check, plan (how it was chosen), profiled_with_neuron_adjust;
    ``prune``: forget, retain, top_percent, score, counts. Set names may be None (an edit read back
    from a config). ``patch_digest``: sha256 of the patch tensors (None for the prune baseline)."""

    arch: str
    num_layers: int | None
    methods: list[str]
    neuron_adjust: dict | None = None
    key_space: dict | None = None
    prune: dict | None = None
    patch_digest: str | None = None

    @property
    def patched(self) -> bool:
        """Whether the model runs through the shipped runtime: every edit but the prune baseline's
        plain weights."""
        return self.prune is None

    def config(self) -> dict | None:
        """config.json's ``skill_editor`` dict (what the runtime reads); None for plain weights."""
        if not self.patched:
            return None
        from editor.runtime.modeling_skill_editor import FORMAT, FORMAT_VERSION

        out: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION, "tool_version": __version__,
                               "arch": self.arch, "neuron_adjust": None, "key_space": None,
                               "patch_digest": self.patch_digest}
        na = self.neuron_adjust
        if na is not None:
            out["neuron_adjust"] = {k: na[k] for k in ("mode", "seed", "score", "top_percent", "counts")}
        ks = self.key_space
        if ks is not None:
            view = {"layers": ks["layers"], **self._guard(ks),
                    **{k: ks[k] for k in ("refusal", "refusal_ids", "check")}}
            if ks.get("plan"):
                view["plan"] = ks["plan"]
            out["key_space"] = view
        return out

    def summary(self) -> dict:
        """skill_editor.json's ``edit`` section."""
        out: dict[str, Any] = {"methods": self.methods, "arch": self.arch, "num_layers": self.num_layers}
        na = self.neuron_adjust
        if na is not None:
            out["neuron_adjust"] = {**{k: na.get(k) for k in ("forget", "retain", "mode", "seed", "score", "top_percent",
                                                               "counts")}, "total": sum(na["counts"].values())}
        ks = self.key_space
        if ks is not None:
            view = {"forget": ks.get("forget"), "layers": ks["layers"], **self._guard(ks)}
            if ks.get("detector") != "linear":
                view["layer"] = ks["layers"][0] if len(ks["layers"]) == 1 else ks["layers"]
            view.update(refusal=ks.get("refusal"), check=ks.get("check", "every_call"),
                        profiled_with_neuron_adjust=ks.get("profiled_with_neuron_adjust", na is not None))
            if ks.get("plan"):
                view["plan"] = ks["plan"]
            out["key_space"] = view
        pr = self.prune
        if pr is not None:
            out["prune"] = {**{k: pr[k] for k in ("forget", "retain", "top_percent", "score", "counts")},
                            "total": sum(pr["counts"].values())}
        if self.patched:
            out["patch_digest"] = self.patch_digest
        return out

    @staticmethod
    def _guard(ks: dict) -> dict:
        if ks.get("detector") == "linear":
            return {"detector": "linear", "pool": "max"}
        return {k: ks.get(k) for k in ("k", "scale", "dims")}

    @classmethod
    def from_config(cls, edit: dict, num_layers: int | None = None) -> "Edit":
        """The edit a checkpoint's config.json describes (no data set names: those are in the manifest)."""
        na, ks = edit.get("neuron_adjust"), edit.get("key_space")
        return cls(arch=edit.get("arch"), num_layers=num_layers, methods=[m for m in ("neuron_adjust", "key_space") if edit.get(m)],
                   neuron_adjust=dict(na) if na else None, key_space={"detector": "box", **ks} if ks else None,
                   patch_digest=edit.get("patch_digest"))


def is_patched_config(config: dict | None) -> bool:
    """Whether a checkpoint's config.json describes a patched model (its ``skill_editor`` edit),
    whatever its top-level ``model_type`` (the base architecture's since format 2 of config.json)."""
    edit = (config or {}).get(EDIT_KEY)
    return isinstance(edit, dict) and bool(edit)


def edit_of(manifest: dict | None, config: dict | None) -> dict:
    """The ``edit`` section of a checkpoint: its manifest's, or — without one — what its
    config.json's ``skill_editor`` says (then without the data set names)."""
    if manifest and isinstance(manifest.get("edit"), dict):
        return manifest["edit"]
    cedit = (config or {}).get(EDIT_KEY)
    return Edit.from_config(cedit).summary() if isinstance(cedit, dict) and cedit else {}


def build_manifest(recipe, *, model_type: str, dtype: str, edit: Edit, statistics: dict | None,
                   scorecard: dict | None = None) -> dict:
    """``skill_editor.json`` without its ``files`` digests: recipe, tool version, the base model,
    the statistics' provenance, the edit, the scorecard."""
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "tool": "skill-editor",
        "tool_version": __version__,
        "kind": "patched" if edit.patched else "plain",
        "base_model": {"model": recipe.recorded_model, "revision": recipe.revision, "model_type": model_type,
                       "local": recipe.resolve(recipe.model).exists() or recipe.model.startswith("editor:"),
                       "dtype": dtype},
        "recipe": recipe.to_metadata(),
        "statistics": statistics,
        "edit": edit.summary(),
    }
    if scorecard is not None:
        manifest["scorecard"] = scorecard
    return manifest


def file_digests(root: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    """sha256 of every regular file under ``root`` (POSIX relative paths, sorted)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel not in exclude:
                out[rel] = sha256_file(p)
    return out


def write_manifest(root: Path, manifest: dict) -> None:
    """``root/skill_editor.json``: ``manifest`` plus the sha256 of every other file of ``root``
    (inside an export's temporary directory: the rename makes it atomic)."""
    manifest = dict(manifest)
    manifest["files"] = file_digests(root)
    (Path(root) / MANIFEST).write_bytes(json_bytes(manifest))


def read_manifest(root: Path) -> dict:
    return json.loads((Path(root) / MANIFEST).read_text(encoding="utf-8"))
