"""``skill-editor inspect``'s text: what a verified checkpoint edits (methods, layers, neurons, the
key-space guard), its provenance and the verification's outcome (``describe``)."""

from __future__ import annotations

from typing import Any

from editor.checkpoint.verification import Report
from editor.manifest import ONNX_DATA, ONNX_MODEL, edit_of

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
