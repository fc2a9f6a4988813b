"""Verifying an exported checkpoint from its files alone: the sha256 of every file that
skill_editor.json lists, unlisted files, and the patch tensors against config.json's
``patch_digest`` (``verify``); whether loading it with ``trust_remote_code`` would run other code
than this tool's runtime (``shipped_code_differs``). The checkpoint's shipped code is never imported
or executed; names of files, formats and patch tensors are those of ``editor.manifest`` and of the
tool's own copy of the runtime.

An ONNX export directory (``editor.export.onnx``: model.onnx + external data, tokenizer files,
skill_editor.json with an ``onnx`` section, deliberately no config.json) is recognised too: the
same sha256 check of every file skill_editor.json lists (the graph and its external data must be
listed), unlisted files, and — the analogue of the HF patch-digest check — the edit recorded in
the graph's own metadata (``metadata_props["skill_editor"]``, read without the weights) must carry
the manifest's patch digest.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from editor.errors import EditorError, VerificationError
from editor.io import sha256_file
from editor.manifest import (AUTO_MAP, CONFIG, EDIT_KEY, GRAPH_FORMAT_KEY, INDEX, MANIFEST, ONNX_DATA, ONNX_FORMAT,
                             ONNX_MODEL, RUNTIME_DIR, RUNTIME_FILES, is_patched_config)
from editor.runtime.modeling_skill_editor import FORMAT, GUARDS, PATCHES, NeuronAdjust, arch_spec, patch_digest

log = logging.getLogger(__name__)

# files a Hub snapshot or a git clone adds that are not part of the checkpoint
IGNORED = {".gitattributes", ".gitignore"}
BASE_PREFIX = "model."  # SkillEditorForCausalLM.base_model_prefix
NA_PATCH, KS_PATCH = PATCHES


@dataclass
class Report:
    path: Path
    config: dict
    manifest: dict | None
    problems: list[str] = field(default_factory=list)
    checked: int = 0
    format: str = "hf"  # "hf" (config.json + safetensors) or "onnx" (model.onnx + external data)
    notes: list[str] = field(default_factory=list)  # what could not be checked (not a failure)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def patched(self) -> bool:
        if self.format == "onnx":
            return bool(((self.manifest or {}).get("edit") or {}).get("patch_digest"))
        return is_patched_config(self.config)


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EditorError(f"{path.parent} is not a checkpoint: no {path.name}") from None
    except (OSError, ValueError) as e:
        raise EditorError(f"cannot read {what} {path}: {e}") from None
    if not isinstance(obj, dict):
        raise EditorError(f"{what} {path} is not a JSON object")
    return obj


def weight_files(ckpt: Path) -> list[Path]:
    """The safetensors files of a checkpoint (single file or the shards named by the index)."""
    index = ckpt / INDEX
    if index.exists():
        names = sorted(set(_read_json(index, "index").get("weight_map", {}).values()))
        return [ckpt / n for n in names]
    single = ckpt / "model.safetensors"
    return [single] if single.exists() else []


def load_tensors(ckpt: Path, keep=lambda name: True) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    files = weight_files(ckpt)
    if not files:
        raise EditorError(f"{ckpt}: no model.safetensors (or shard index) found")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    if keep(k):
                        out[k] = st.get_tensor(k)
        except FileNotFoundError:
            raise EditorError(f"{ckpt}: weight file {f.name} is missing") from None
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise EditorError(f"{ckpt}: cannot read {f.name}: {e}") from None
    return out


def is_patch_tensor(name: str) -> bool:
    return any(f".{p}." in name for p in PATCHES)


def _patch_names(spec, layer, path: str, patch: str, tensors) -> set[str]:
    return {f"{spec.layers}.{int(layer)}.{path}.{patch}.{t}" for t in tensors}


def expected_patch_tensors(edit: dict) -> set[str]:
    """Names (relative to the base model) of every patch tensor the config's edit requires."""
    spec = arch_spec(edit["arch"])
    names = set()
    for layer in (edit.get("neuron_adjust") or {}).get("counts") or {}:
        names |= _patch_names(spec, layer, spec.pre, NA_PATCH, NeuronAdjust.TENSORS)
    ks = edit.get("key_space") or {}
    for layer in ks.get("layers") or []:
        names |= _patch_names(spec, layer, spec.down, KS_PATCH, GUARDS[ks.get("detector", "box")].TENSORS)
    return names


def shipped_code_differs(ckpt, config: dict | None = None) -> str | None:
    """Why loading ``ckpt`` with ``trust_remote_code`` would run other code than this tool's own
    runtime — a shipped runtime file that is missing or not byte-identical to ``editor/runtime/``,
    or an ``auto_map`` (config.json, tokenizer_config.json) naming other code — or None when it
    would run exactly the tool's runtime. Reads the files; imports nothing from the checkpoint."""
    ckpt = Path(ckpt)
    config = config if config is not None else _read_json(ckpt / CONFIG, "config")
    auto_map = config.get("auto_map")
    if auto_map is not None and auto_map != AUTO_MAP:
        return f"its config.json auto_map names other code ({json.dumps(auto_map, sort_keys=True)})"
    tok_cfg = ckpt / "tokenizer_config.json"
    if tok_cfg.is_file():
        try:
            tok_map = json.loads(tok_cfg.read_text(encoding="utf-8")).get("auto_map")
        except (OSError, ValueError, AttributeError):
            tok_map = None
        if tok_map:
            return "its tokenizer_config.json names custom tokenizer code (auto_map)"
    if not is_patched_config(config):
        return None if auto_map is None else "a plain checkpoint with an auto_map"
    for name in RUNTIME_FILES:
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        if p.read_bytes() != (RUNTIME_DIR / name).read_bytes():
            return f"its {name} differs from this tool's runtime (skill-editor's editor/runtime/{name})"
    return None


def _strip(name: str) -> str:
    return name[len(BASE_PREFIX):] if name.startswith(BASE_PREFIX) else name


def is_onnx_export(ckpt) -> bool:
    """An ONNX export directory: no config.json, and model.onnx or a skill_editor.json with an
    ``onnx`` section."""
    ckpt = Path(ckpt)
    if (ckpt / CONFIG).exists():
        return False
    if (ckpt / ONNX_MODEL).exists():
        return True
    try:
        m = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and (isinstance(m.get("onnx"), dict) or m.get("format") == ONNX_FORMAT)


def verify(ckpt) -> Report:
    """Check every file listed in skill_editor.json (exists, sha256), unlisted files, and for a
    patched checkpoint the patch tensors against config.json's ``patch_digest`` (an ONNX export:
    the graph's recorded edit against the manifest's patch digest)."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise EditorError(f"{ckpt} is not a directory")
    if is_onnx_export(ckpt):
        return _verify_onnx(ckpt)
    config = _read_json(ckpt / CONFIG, "config")
    rep = Report(ckpt, config, None)
    _read_manifest(rep, "checkpoint")
    _verify_files(rep)
    if rep.patched:
        rep.problems.extend(_verify_patch(ckpt, config, rep.manifest))
    return rep


def _read_manifest(rep: Report, what: str) -> None:
    mpath = rep.path / MANIFEST
    if not mpath.exists():
        rep.problems.append(f"missing {MANIFEST}: not a skill-editor {what} (nothing to verify against)")
        return
    try:
        rep.manifest = _read_json(mpath, "manifest")
    except EditorError as e:
        rep.problems.append(str(e))


def _verify_files(rep: Report) -> dict:
    """sha256 of every file the manifest lists; files on disk it does not list. Returns the listing."""
    ckpt = rep.path
    files = (rep.manifest or {}).get("files")
    if rep.manifest is not None and not isinstance(files, dict):
        rep.problems.append(f"{MANIFEST} lists no files")
        files = {}
    files = files or {}
    for rel, want in sorted(files.items()):
        p = ckpt / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            rep.problems.append(f"{rel}: bad path in {MANIFEST}")
        elif not p.is_file():
            rep.problems.append(f"{rel}: missing")
        else:
            got = sha256_file(p)
            rep.checked += 1
            if got != want:
                rep.problems.append(f"{rel}: sha256 mismatch (expected {str(want)[:12]}…, got {got[:12]}…)")
    if rep.manifest is not None:
        for p in sorted(ckpt.rglob("*")):
            rel = p.relative_to(ckpt).as_posix()
            if not p.is_file() or rel == MANIFEST or rel in files:
                continue
            if rel in IGNORED or any(part.startswith(".") for part in Path(rel).parts):
                continue
            rep.problems.append(f"{rel}: not listed in {MANIFEST}")
    return files


def _verify_onnx(ckpt: Path) -> Report:
    """An ONNX export: the files (as for HF checkpoints; the graph and its external data must be
    listed) and the edit recorded inside the graph against the manifest's patch digest."""
    rep = Report(ckpt, {}, None, format="onnx")
    _read_manifest(rep, "ONNX export")
    m = rep.manifest
    onnx_meta = (m or {}).get("onnx")
    if m is not None and not isinstance(onnx_meta, dict):
        rep.problems.append(f"{MANIFEST} has no onnx section: not a skill-editor ONNX export")
    onnx_meta = onnx_meta if isinstance(onnx_meta, dict) else {}
    if isinstance(onnx_meta.get("base_config"), dict):
        rep.config = onnx_meta["base_config"]
    files = _verify_files(rep)
    if m is None:
        return rep
    data = onnx_meta.get("external_data") or ONNX_DATA
    for rel in (ONNX_MODEL, data):
        if rel not in files and not (ckpt / rel).is_file():
            rep.problems.append(f"{rel}: missing")  # neither on disk nor listed (an unlisted file is reported above)
    if any(p.startswith(f"{ONNX_MODEL}:") for p in rep.problems):
        return rep  # the graph itself is missing or changed: that is the one finding
    rep.problems.extend(_verify_graph_edit(ckpt, m, rep.notes))
    return rep


def _verify_graph_edit(ckpt: Path, manifest: dict, notes: list[str]) -> list[str]:
    """The graph's metadata (``export_onnx`` writes the format and the edit dict) against the
    manifest: same patch digest, or neither has one. Reads model.onnx without its external data."""
    try:
        import onnx
    except ImportError:
        notes.append(f"the edit recorded in {ONNX_MODEL} was not compared (the onnx package is not installed)")
        return []
    try:
        graph = onnx.load(str(ckpt / ONNX_MODEL), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf / onnx raise their own error types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [f"{ONNX_MODEL}: cannot read the graph: {first}"]
    props = {p.key: p.value for p in graph.metadata_props}
    if props.get(GRAPH_FORMAT_KEY) != ONNX_FORMAT:
        return [f"{ONNX_MODEL}: not a skill-editor graph (metadata {GRAPH_FORMAT_KEY} is {props.get(GRAPH_FORMAT_KEY)!r})"]
    graph_edit: dict = {}
    if EDIT_KEY in props:
        try:
            graph_edit = json.loads(props[EDIT_KEY])
        except ValueError as e:
            return [f"{ONNX_MODEL}: its {EDIT_KEY} metadata is not JSON: {e}"]
        if not isinstance(graph_edit, dict):
            return [f"{ONNX_MODEL}: its {EDIT_KEY} metadata is not a JSON object"]
    got = graph_edit.get("patch_digest")
    want = (manifest.get("edit") or {}).get("patch_digest")
    if got == want:
        return []
    if want is None:
        return [f"{ONNX_MODEL} carries an edit (patch digest {str(got)[:12]}…) that {MANIFEST} does not record"]
    if got is None:
        return [f"{MANIFEST} records an edit (patch digest {str(want)[:12]}…) that {ONNX_MODEL} does not carry"]
    return [f"{MANIFEST} and {ONNX_MODEL} record different patch digests (expected {str(want)[:12]}…, got {str(got)[:12]}…)"]


def _verify_patch(ckpt: Path, config: dict, manifest: dict | None) -> list[str]:
    edit = config.get(EDIT_KEY) or {}
    if edit.get("format") != FORMAT:
        return ["config.json: skill_editor.format is missing"]
    problems = []
    try:
        tensors = {_strip(k): v for k, v in load_tensors(ckpt, is_patch_tensor).items()}
    except EditorError as e:
        return [str(e)]
    try:
        expected = expected_patch_tensors(edit)
    except (KeyError, ValueError) as e:
        return [f"config.json: bad skill_editor description: {e}"]
    for name in sorted(expected - set(tensors)):
        problems.append(f"patch tensor missing: {name}")
    for name in sorted(set(tensors) - expected):
        problems.append(f"unexpected patch tensor: {name}")
    want = edit.get("patch_digest")
    if not want:
        problems.append("config.json: no patch_digest")
    elif not problems:
        got = patch_digest(tensors)
        if got != want:
            problems.append(f"patch tensors do not match config.json's patch_digest (expected {want[:12]}…, got {got[:12]}…)")
    if manifest is not None:
        md = (manifest.get("edit") or {}).get("patch_digest")
        if md and want and md != want:
            problems.append(f"{MANIFEST} and config.json record different patch digests")
    return problems



def require_ok(rep: Report, prefix: str = "") -> Report:
    """``rep`` when it has no problem; else ``VerificationError`` (the CLI's exit 1) naming the first."""
    if not rep.ok:
        more = f" (+{len(rep.problems) - 1} more; see `skill-editor inspect`)" if len(rep.problems) > 1 else ""
        raise VerificationError(f"{prefix}{rep.path} fails verification: {rep.problems[0]}{more}")
    return rep


def verified(ckpt, prefix: str = "", *, plain_ok: bool = False) -> Report:
    """``verify``, refusing a checkpoint with any problem before anything loads it: ``eval``,
    ``restore`` and ``push`` use nothing that fails the check ``inspect`` makes. ``plain_ok``: a
    plain model directory with no skill_editor.json at all (a base model, ``restore``'s output) has
    nothing to be verified against and passes, with a warning; a patched one never does."""
    rep = verify(ckpt)
    if plain_ok and rep.format == "hf" and not rep.patched and not (rep.path / MANIFEST).exists():
        log.warning(f"{rep.path} has no {MANIFEST}: a plain model whose files cannot be verified")
        return rep
    return require_ok(rep, prefix)
