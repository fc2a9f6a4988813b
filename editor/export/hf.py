"""The exported Hugging Face checkpoint (DESIGN §4): a directory that loads with nothing but
``torch`` + ``transformers``.

Layout of a Neuron Adjust / Key Space Detection export::

    config.json                      the base config (top level, its model_type) and again as base_model_config,
                                     auto_map + architectures (the runtime's classes), transformers_weights
                                     (a sentence: every other class refuses the checkpoint), the edit
                                     (``skill_editor``: ``Edit.config()``, patch_digest included)
    configuration_skill_editor.py    editor/runtime/* copied verbatim (torch + transformers only)
    modeling_skill_editor.py
    model.safetensors                base weights (MLP neurons permuted) + the patch tensors
      (or model-0000i-of-0000n.safetensors + model.safetensors.index.json for big models)
    generation_config.json, tokenizer files
    README.md                        the model card (editor.export.card)
    skill_editor.json                the manifest (editor.manifest): recipe, tool version, statistics
                                     provenance, the edit, scorecard, sha256 of every other file

The prune baseline (an edit without a patch) exports a plain checkpoint of the base architecture
(no custom code, loads without ``trust_remote_code``) with the same README / skill_editor.json.

Everything is written into a temporary directory beside the destination and renamed into place
(``editor.io.atomic_directory``); the same recipe + seed + statistics give byte-identical files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from editor.export.card import build_card
from editor.io import atomic_directory, check_destination
from editor.manifest import CARD, DEFAULT_SHARD, RUNTIME_DIR, RUNTIME_FILES, Edit, write_manifest
from editor.patch import wrap


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


def _normalize(tmp: Path) -> None:
    """Ordinary permissions (the temp dir and some library writes are owner-only)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)
    for p in tmp.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def export_hf(model, tokenizer, edit: Edit, manifest: dict, out, *, overwrite: bool = False,
              max_shard_size=DEFAULT_SHARD) -> Path:
    """Write the checkpoint directory ``out`` atomically; return its path.

    ``model``: the patched base model (``editor.patch.apply_plans``), ``edit`` its description,
    ``manifest``: ``skill_editor.json`` without its file digests (``editor.manifest.build_manifest``).
    """
    out = check_destination(out, overwrite)
    config_edit = edit.config()
    with atomic_directory(out, overwrite=overwrite) as tmp:
        # the saved configs name the recipe's model reference, not this machine's path; the base
        # config travels inside the checkpoint config, so wrap under that name too
        with _NameOrPath(model.config, manifest["base_model"]["model"]):
            _save_model(model if config_edit is None else wrap(model, config_edit), tmp, max_shard_size)
        if config_edit is not None:
            _write_runtime(tmp)
        _save_tokenizer(tokenizer, tmp)
        if not (tmp / "generation_config.json").exists() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        (tmp / CARD).write_text(str(build_card(manifest)), encoding="utf-8")
        _normalize(tmp)
        write_manifest(tmp, manifest)
        _normalize(tmp)
    return Path(out)
