"""Reading an exported checkpoint back: ``inspect`` (what was edited, provenance, sha256 of every
file) and ``restore`` (the exact base model: undo the neuron permutation, drop the patch).

Works from the files alone (config.json, skill_editor.json, safetensors) — the checkpoint's
shipped code is never imported or executed; names of files, formats and patch tensors are those
of ``editor.manifest`` and of the tool's own copy of the runtime.

An ONNX export directory (``editor.export.onnx``: model.onnx + external data, tokenizer files,
skill_editor.json with an ``onnx`` section, deliberately no config.json) is recognised too: the
same sha256 check of every file skill_editor.json lists (the graph and its external data must be
listed), unlisted files, and — the analogue of the HF patch-digest check — the edit recorded in
the graph's own metadata (``metadata_props["skill_editor"]``, read without the weights) must carry
the manifest's patch digest. ``restore`` does not apply to ONNX exports.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from editor.errors import EditorError
from editor.io import atomic_directory, check_destination, sha256_file
from editor.manifest import (AUTO_MAP, CARD, CONFIG, EDIT_KEY, GRAPH_FORMAT_KEY, INDEX, MANIFEST, ONNX_DATA, ONNX_FORMAT,
                             ONNX_MODEL, RUNTIME_DIR, RUNTIME_FILES, edit_of, is_patched_config)
from editor.methods.neuron_adjust import inverse_permutation
from editor.runtime.configuration_skill_editor import BASE_CONFIG_KEY
from editor.runtime.modeling_skill_editor import FORMAT, GUARDS, PATCHES, NeuronAdjust, arch_spec, patch_digest

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


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def describe(rep: Report) -> str:
    """Human-readable summary: what was edited, provenance, verification."""
    m = rep.manifest or {}
    cfg = rep.config
    edit = edit_of(m, cfg)
    base = m.get("base_model") or {}
    onnx_meta = m.get("onnx") if isinstance(m.get("onnx"), dict) else {}
    lines = [f"checkpoint: {rep.path}"]
    if rep.format == "onnx":
        what = "patched: the edit runs inside the graph" if rep.patched else "plain: no edit inside the graph"
        kind = f"ONNX export ({ONNX_MODEL} + {onnx_meta.get('external_data') or ONNX_DATA}; {what}; runs with ONNX Runtime)"
    else:
        kind = "patched (custom code, trust_remote_code=True)" if rep.patched else "plain (base architecture, no custom code)"
    lines.append(f"kind:       {kind}")
    arch = base.get("model_type") or edit.get("arch") or cfg.get("model_type") or "?"
    dtype = base.get("dtype") or cfg.get("dtype") or cfg.get("torch_dtype") or onnx_meta.get("dtype") or "?"
    lines.append(f"base model: {base.get('model', '?')}" + (f" @ {base['revision']}" if base.get("revision") else "")
                 + f" ({arch}, {dtype})")
    recipe = m.get("recipe")
    if isinstance(recipe, dict):
        lines.append("recipe:     " + _recipe_line(recipe))
    methods = edit.get("methods") or []
    lines.append(f"methods:    {', '.join(methods) or 'none'}")
    na = edit.get("neuron_adjust")
    if na:
        counts = na.get("counts") or {}
        total = na.get("total", sum(int(v) for v in counts.values()))
        lines.append(f"neuron adjust: {total} neurons, mode {na.get('mode')}, seed {na.get('seed')}, score {na.get('score')}, "
                     f"top {_fmt(na.get('top_percent'))} %" + (f", forget {na['forget']} vs retain {', '.join(na.get('retain') or [])}" if na.get("forget") else ""))
        lines.append("  per layer: " + ", ".join(f"{k}:{v}" for k, v in sorted(counts.items(), key=lambda kv: int(kv[0]))))
    ks = edit.get("key_space")
    if ks:
        if ks.get("detector") == "linear":
            lines.append(f"key space:  pooled linear detector over layers {', '.join(str(x) for x in ks.get('layers') or [])} "
                         f"({ks.get('pool', 'max')}-pooled keys of the prompt's tokens; abstain when the score > 0)")
        else:
            for layer in ks.get("layers") or []:
                lines.append(f"key space:  layer {layer}, k {_fmt((ks.get('k') or {}).get(str(layer)))}, "
                             f"scale (alpha) {_fmt((ks.get('scale') or {}).get(str(layer)))}, "
                             f"{(ks.get('dims') or {}).get(str(layer), '?')} guarded dims")
        plan = ks.get("plan")
        if isinstance(plan, dict) and plan.get("method"):
            lines.append("  plan: " + _ksd_plan_line(plan))
        lines.append(f"  refusal: {ks.get('refusal')!r}" + (f", check {ks['check']}" if ks.get("check") else ""))
    pr = edit.get("prune")
    if pr:
        lines.append(f"prune:      {pr.get('total')} neurons zeroed (top {_fmt(pr.get('top_percent'))} %, forget {pr.get('forget')})")
        lines.append("  per layer: " + ", ".join(f"{k}:{v}" for k, v in sorted((pr.get("counts") or {}).items(), key=lambda kv: int(kv[0]))))
    digest = edit.get("patch_digest")
    if digest:
        lines.append(f"patch digest: {digest}")
    if onnx_meta:
        lines.append("onnx:       " + _onnx_line(onnx_meta))
    if m:
        lines.append(f"tool:       skill-editor {m.get('tool_version')}")
        st = m.get("statistics") or {}
        if st:
            lines.append(f"statistics: model {st.get('model')}" + (f" @ {st['revision']}" if st.get("revision") else "")
                         + (f", digest {st['digest'][:16]}…" if st.get("digest") else "")
                         + (f", sha256 {st['sha256'][:16]}…" if st.get("sha256") else ""))
            for name, info in sorted((st.get("sets") or {}).items()):
                if isinstance(info, dict):
                    lines.append(f"  set {name}: {info.get('texts', '?')} texts, {info.get('tokens', '?')} tokens, "
                                 f"source {info.get('source', '?')}")
        sc = m.get("scorecard")
        if isinstance(sc, dict) and isinstance(sc.get("after"), dict):
            for skill in sorted(sc["after"]):
                b = (sc.get("before") or {}).get(skill) or {}
                a = sc["after"][skill] or {}
                lines.append(f"  score {skill}: exact match {_fmt(b.get('exact_match', '?'))} -> {_fmt(a.get('exact_match', '?'))}, "
                             f"abstained {_fmt(a.get('abstained', '?'))}")
    files = m.get("files") if isinstance(m.get("files"), dict) else {}
    status = "OK" if rep.ok else f"FAILED ({len(rep.problems)} problem{'s' if len(rep.problems) != 1 else ''})"
    matched = rep.checked - sum(1 for p in rep.problems if ": sha256 mismatch" in p)
    lines.append(f"verification: {status}; {matched}/{len(files)} files match their sha256")
    lines.extend(f"  note: {n}" for n in rep.notes)
    return "\n".join(lines)


def _recipe_line(recipe: dict) -> str:
    """The recipe in one line: its data sets (name: path) and the profile settings."""
    parts = []
    data = recipe.get("data")
    if isinstance(data, dict) and data:
        sets = []
        for name, spec in data.items():
            path = spec.get("path", "?") if isinstance(spec, dict) else spec
            sets.append(f"{name} ({path})")
        parts.append("data " + ", ".join(sets))
    prof = recipe.get("profile")
    if isinstance(prof, dict) and prof:
        parts.append(f"profile batch {prof.get('batch_size', '?')} × max_length {prof.get('max_length', '?')}")
    if recipe.get("dtype"):
        parts.append(f"dtype {recipe['dtype']}")
    ev = recipe.get("evaluate")
    if isinstance(ev, dict) and ev.get("data"):
        parts.append(f"scorecard on {ev['data']}")
    return "; ".join(parts) or "?"


def _pct(x: Any) -> str:
    return f"{x * 100:.3g} %" if isinstance(x, (int, float)) else "?"


def _ksd_plan_line(plan: dict) -> str:
    """How the KSD box was chosen: the paper's fixed layer and α, or the calibration's CV record."""
    if plan.get("method") == "linear":
        cv = plan.get("cv") or {}
        return (f"linear, fitted on {', '.join(plan.get('retain') or []) or '?'} (false-positive budget {_fmt(cv.get('budget', '?'))}, "
                f"{cv.get('folds', '?')} folds, seed {cv.get('seed', '?')}): out-of-fold forget coverage {_pct(cv.get('forget_coverage'))}, "
                f"retain false positives {_pct(cv.get('retain_fpr'))}")
    if plan.get("method") != "calibrated":
        return f"{plan.get('method')} (layer and α from the recipe, every key dim guarded)"
    cv = plan.get("cv") or {}
    line = (f"calibrated on {', '.join(plan.get('retain') or []) or '?'} (false-positive budget {_fmt(cv.get('budget', '?'))}, "
            f"{cv.get('folds', '?')} folds, seed {cv.get('seed', '?')}): held-out forget coverage {_pct(cv.get('forget_coverage'))}, "
            f"retain false positives {_pct(cv.get('retain_fpr'))}")
    if cv.get("candidates") is not None:
        line += f"; {cv.get('feasible', '?')} of {cv['candidates']} settings feasible"
    return line


def _onnx_line(meta: dict) -> str:
    line = f"opset {meta.get('opset', '?')}, {meta.get('dtype', '?')}, {meta.get('num_layers', '?')} layers with KV cache"
    v = meta.get("validation")
    if isinstance(v, dict):
        line += (f"; validated with ONNX Runtime: logits max |diff| {_fmt(v.get('max_abs_diff'))} (tol {_fmt(v.get('atol'))}), "
                 f"{v.get('greedy_steps', '?')} greedy steps, abstention agrees on {v.get('abstention_checks', '?')} row-steps")
    elif "validation" in meta:
        line += "; not validated at export"
    return line


def inspect_checkpoint(ckpt) -> Report:
    return verify(ckpt)


# ---------------------------------------------------------------------------------------------
# restore
# ---------------------------------------------------------------------------------------------


def _index(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    return t.index_select(dim, idx).contiguous()


def unpermute_plan(spec, layer: int, perm: torch.Tensor, shapes: dict[str, tuple]) -> dict[str, tuple[int, torch.Tensor]]:
    """Undo ``editor.model.arch.permute_neurons`` for one layer, as an index per tensor (names
    relative to the base model, ``shapes``: every tensor's shape): {name: (dim, index)} — position
    j holds original neuron perm[j]; ``index_select(dim, index)`` puts every neuron back in place."""
    inv = inverse_permutation(perm.to(torch.int64))
    prefix = f"{spec.layers}.{layer}."
    plan: dict[str, tuple[int, torch.Tensor]] = {}

    def rows(path: str, fused: bool) -> None:
        w_name = prefix + path + ".weight"
        if w_name not in shapes:
            raise EditorError(f"restore: tensor {w_name} not found")
        out_dim = 1 if spec.layout == "conv1d" else 0
        idx = inv
        if fused:
            half = shapes[w_name][out_dim] // 2
            idx = torch.cat([inv, inv + half])
        plan[w_name] = (out_dim, idx)
        b_name = prefix + path + ".bias"
        if b_name in shapes:
            plan[b_name] = (0, idx)

    rows(spec.pre, spec.fused)
    if spec.up is not None:
        rows(spec.up, False)
    d_name = prefix + spec.down + ".weight"
    if d_name not in shapes:
        raise EditorError(f"restore: tensor {d_name} not found")
    plan[d_name] = (0 if spec.layout == "conv1d" else 1, inv)
    return plan


# safetensors' dtype names (``get_slice(...).get_dtype()``) → torch, to plan shards without loading
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def restore(ckpt, out, *, overwrite: bool = False, max_shard_size="5GB", verify_first: bool = True) -> Path:
    """Write the exact base model of a patched checkpoint to ``out`` (atomically): neurons back
    in their original order, patch tensors dropped, the base config (plain architecture),
    tokenizer and generation config. Loads without custom code. Streams: the output shards are
    planned from the tensors' shapes, and each is read, un-permuted and written before the next,
    so memory holds one output shard (``max_shard_size``), not the model."""
    from transformers import AutoConfig

    ckpt = Path(ckpt)
    out = check_destination(out, overwrite)
    if out.resolve() == ckpt.resolve():
        raise EditorError("restore: --out must differ from the checkpoint")
    rep = verify(ckpt)
    if rep.format == "onnx":
        raise EditorError(f"restore: {ckpt} is an ONNX export; restore works on HF checkpoints "
                          f"(the graph does not keep the neuron permutation): restore the HF export of the same recipe")
    if verify_first and not rep.ok:
        raise EditorError(f"restore: {ckpt} fails verification: {rep.problems[0]}"
                          + (f" (+{len(rep.problems) - 1} more)" if len(rep.problems) > 1 else ""))
    if not rep.patched:
        kind = ((rep.manifest or {}).get("edit") or {}).get("methods") or []
        if "prune" in kind:
            raise EditorError("restore: a pruned checkpoint cannot be restored (the pruned weights are zeroed, not kept)")
        raise EditorError(f"restore: {ckpt} is a plain checkpoint; there is no patch to undo")
    cfg = rep.config
    edit = cfg.get(EDIT_KEY) or {}
    # the base configuration: BASE_CONFIG_KEY since format 2 of config.json, text_config before
    text = dict(cfg.get(BASE_CONFIG_KEY) or cfg.get("text_config") or {})
    model_type = text.pop("model_type", None) or edit.get("arch")
    if not model_type:
        raise EditorError(f"restore: config.json has no {BASE_CONFIG_KEY}.model_type")
    spec = arch_spec(model_type)
    sources, shapes, perms = _index_weights(ckpt, spec, edit)
    plan: dict[str, tuple[int, torch.Tensor]] = {}
    for layer, perm in perms.items():
        plan.update(unpermute_plan(spec, layer, perm, {k: v.shape for k, v in shapes.items()}))
    for k in ("_name_or_path", "transformers_version"):
        text.pop(k, None)
    if edit.get("base_architectures") and not text.get("architectures"):
        text["architectures"] = list(edit["base_architectures"])  # kept out of the base config (patch.checkpoint_config)
    base_config = AutoConfig.for_model(model_type, **text)
    skip = {CONFIG, MANIFEST, CARD, INDEX, *RUNTIME_FILES}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        _write_streaming(tmp, sources, shapes, plan, max_shard_size)
        base_config.save_pretrained(str(tmp))
        for p in sorted(ckpt.iterdir()):
            if p.is_file() and p.name not in skip and not p.name.endswith(".safetensors") and not p.name.startswith("."):
                shutil.copyfile(p, tmp / p.name)
    return Path(out)


def _index_weights(ckpt: Path, spec, edit: dict):
    """Without loading the weights: where each base tensor lives ({name: (file, key)}), its shape
    and dtype (meta tensors), and the NA permutations (small) of the edited layers."""
    from safetensors import safe_open

    files = weight_files(ckpt)
    if not files:
        raise EditorError(f"{ckpt}: no model.safetensors (or shard index) found")
    sources: dict[str, tuple[Path, str]] = {}
    shapes: dict[str, torch.Tensor] = {}
    perm_names = {name: int(i) for i in ((edit.get("neuron_adjust") or {}).get("counts") or {})
                  for name in _patch_names(spec, i, spec.pre, NA_PATCH, ("permutation",))}
    perms: dict[int, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    name = _strip(k)
                    if name in perm_names:
                        perms[perm_names[name]] = st.get_tensor(k)
                    if is_patch_tensor(name):
                        continue
                    sl = st.get_slice(k)
                    dtype = _ST_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise EditorError(f"restore: tensor {k} has an unsupported dtype {sl.get_dtype()}")
                    sources[name] = (f, k)
                    shapes[name] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
        except FileNotFoundError:
            raise EditorError(f"{ckpt}: weight file {f.name} is missing") from None
        except EditorError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise EditorError(f"{ckpt}: cannot read {f.name}: {e}") from None
    missing = sorted(n for n, i in perm_names.items() if i not in perms)
    if missing:
        raise EditorError(f"restore: permutation {missing[0]} is missing")
    return sources, shapes, dict(sorted(perms.items()))


def _write_streaming(tmp: Path, sources: dict, shapes: dict, plan: dict, max_shard_size) -> None:
    """Write the base state dict shard by shard (the shard plan and file names of
    ``huggingface_hub``, as ``save_pretrained`` names them); only one output shard in memory."""
    from contextlib import ExitStack

    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors import safe_open
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(shapes, max_shard_size=max_shard_size)
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for filename, names in split.filename_to_tensors.items():
            shard = {}
            for name in names:
                f, key = sources[name]
                if f not in handles:
                    handles[f] = stack.enter_context(safe_open(str(f), framework="pt"))
                t = handles[f].get_tensor(key)
                if name in plan:
                    dim, idx = plan[name]
                    t = _index(t, dim, idx)
                shard[name] = t.contiguous()
            save_file(shard, str(tmp / filename), metadata={"format": "pt"})
            del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
