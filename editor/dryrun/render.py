"""The dry run's printed plan (``render``) from its estimate (``editor.dryrun.estimate.DryRun``):
labelled rows in one column (``Lines.row``), their continuation lines aligned under the text."""

from __future__ import annotations

import json
from pathlib import Path

from editor.dryrun.estimate import CalibrationEstimate, DryRun
from editor.heap import BATCH_TOKENS

LABEL = 14  # the width of the label column


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


class Lines:
    """The printed lines: ``row(label, text)`` (the label padded to one column), ``more(text)``
    (a continuation, under the text), ``raw(text)``."""

    def __init__(self):
        self.lines: list[str] = []

    def row(self, label: str, text: str) -> None:
        self.lines.append(f"{label:<{LABEL - 1}} {text}")

    def more(self, text: str) -> None:
        self.lines.append(" " * LABEL + text)

    def raw(self, text: str = "") -> None:
        self.lines.append(text)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _background(c: CalibrationEstimate, sets: list[str]) -> str:
    if c.background == "default":
        return f"background: the {c.n_background} shipped ordinary prompts (calibration part)"
    if c.background == "none":
        return "no background negatives (background: none)"
    return f"background: {', '.join(repr(b) for b in sets)}"


def calibration_lines(out: Lines, plan: DryRun) -> None:
    """The calibrated ``key_space``'s rows: what calibration chooses, on what, with which settings."""
    c, ks = plan.calibration, plan.recipe.key_space
    retain = ", ".join(repr(r) for r in c.retain)
    background = _background(c, c.background_sets)
    budget_on = "per retain set and on the background" if c.background != "none" else "per retain set"
    if c.detector == "linear":
        weights = ("non-negative weights (no feature counts against the skill)" if c.weights == "nonnegative"
                   else "signed weights")
        out.row("key_space", f"forget {ks.forget!r}: pooled linear detector — every layer's key max-pooled over the prompt's "
                             f"tokens, one linear score with {weights} fitted at profile time; the recipe's layer "
                             f"({ks.layer}) and scale ({ks.scale:g}) are not used")
        out.more(f"retain sets {retain}; {background}; false-positive budget {c.budget:g} ({c.budget * 100:g} % {budget_on}, "
                 f"out of fold), {c.folds}-fold cross-fitting, seed {c.seed}; check {ks.check}")
        return
    out.row("key_space", f"forget {ks.forget!r}: calibrated — the layer(s), the guarded dims and α (scale) are chosen by "
                         f"calibration at profile time; the recipe's layer ({ks.layer}) and scale ({ks.scale:g}) are not used")
    out.more(f"retain sets {retain}; {background}; false-positive budget {c.budget:g} ({c.budget * 100:g} % {budget_on}), "
             f"{c.folds}-fold cross-validation, seed {c.seed}")
    out.more(f"candidates: every layer 0..{c.n_layers - 1} (and pairs of the best), the top-m of the {c.d_ff} key dims "
             f"for m on a grid, " + (f"α ∈ {{{', '.join(f'{a:g}' for a in c.scales)}}}" if c.scales else "α on a grid"))
    cont = c.continuation_tokens
    out.more("keys: each query's last prompt token" + (f" + up to {cont - 1} greedy continuation tokens" if cont > 1 else " only"))


def calibration_memory(c: CalibrationEstimate) -> str:
    """What the calibration holds above the profile's peak (docs/SCALE.md measures it on SmolLM2)."""
    q, n_layers, d_ff = c.queries, c.n_layers, c.d_ff
    if c.detector == "linear":
        nonneg = c.weights == "nonnegative"
        if q is None:
            fit = "queries × (d_ff × 12 B + screened features × 16 B)" if nonneg else "4 × queries² × 8 B"
            return (f"queries × {n_layers} layers × {d_ff} × 4 B of pooled keys (float32) "
                    f"+ {fit} for the fit above the profile's peak")
        what = ("one layer's keys and its screening copy, the fold's screened features, the summed weights" if nonneg
                else f"the {q} × {q} Gram matrix, a fold's copy and its eigenvectors, one layer's standardized keys")
        return (f"≤ {q} queries × {n_layers} layers × {d_ff} × 4 B = {human_bytes(c.keys_bytes)} of pooled keys (float32), "
                f"+ {human_bytes(c.fit_bytes)} for the fit ({what}) → ≤ {human_bytes(c.keys_bytes + c.fit_bytes)} above "
                f"the profile's peak (a set in raw and chat form counts twice)")
    per = f"{max(1, c.continuation_tokens)} key(s)"
    if q is None:
        return f"per query ≤ {per} × {n_layers} layers × {d_ff} × 4 B of keys (float32, CPU); query counts known at run time"
    return f"≤ {q} queries × {per} × {n_layers} layers × {d_ff} × 4 B = {human_bytes(c.keys_bytes)} of keys (float32, CPU)"


def render(plan: DryRun) -> str:
    """The printed plan of a dry run."""
    recipe, shape = plan.recipe, plan.shape
    n_layers, d_ff, total = shape["layers"], shape["d_ff"], plan.neurons
    out = Lines()
    out.raw(f"dry run of {plan.path} — nothing loaded, nothing downloaded, nothing written")
    out.raw()
    out.row("model", plan.named_model + (f" @ {recipe.revision}" if recipe.revision else ""))
    src = plan.source
    out.more(f"config.json from {src.ref}" + (f" (GGUF file {src.gguf_file})" if src.gguf_file else ""))
    arch = plan.arch
    mlp = f"{arch.pre}" + (f" (gated × {arch.up})" if arch.up else (" (fused gate|up)" if arch.fused else "")) + f" → {arch.act} → {arch.down}"
    out.row("architecture", f"{plan.model_type} (supported): layers {arch.layers}; neurons: {mlp}")
    out.row("shape", f"{n_layers} layers × d_ff {d_ff} = {total} FFL neurons; hidden {shape['hidden']}, "
                     f"{shape['heads']} heads ({shape['kv_heads']} kv), vocab {shape['vocab']}")
    params = plan.params
    count = f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.2f} M"
    out.row("weights", f"≈ {count} parameters; {plan.dtype} → {human_bytes(plan.weight_bytes)} (+ activations and KV cache)")
    if recipe.device == "auto":
        out.row("device", "auto: one CUDA GPU when the weights fit (device_map='auto' over several GPUs otherwise), else CPU")
    else:
        out.row("device", recipe.device)
    out.raw()
    out.row("data", f"{len(recipe.data)} set(s); profiled: {', '.join(plan.profiled) or '-'}")
    notes: list[str] = []
    for n, info in plan.sets.items():
        texts = info.get("texts")
        count = f"{texts} texts" if texts is not None else "texts counted at run time"
        lim = f", limit {info['limit']}" if info.get("limit") else ""
        rows = f" of {info['rows']} rows" if info.get("rows") else ""
        out.raw(f"  {n}: {info['source']}, split {info['split']}{lim} → {count}{rows}")
        tpl = info["template"]
        short = tpl if len(tpl) <= 70 else tpl[:40] + f"… ({len(tpl)} chars) …" + tpl[-20:]
        out.raw(f"      template {json.dumps(short, ensure_ascii=False)}; {info['checked']}")
        if info.get("note") and info["note"] not in notes:
            notes.append(info["note"])
    for note in notes:
        out.raw(f"  note: {note}")
    p = recipe.profile
    out.raw()
    out.row("profile", f"batch_size {p.batch_size}, max_length {p.max_length} tokens (longer texts are cut; the KSD key is "
                       f"then the last kept token), padding {p.padding_side or 'the tokenizer default'}")

    if recipe.neuron_adjust:
        na = recipe.neuron_adjust
        out.row("neuron_adjust", f"forget {na.forget!r} vs retain {', '.join(repr(r) for r in na.retain_sets)}: "
                                 f"top {na.top_percent:g} % of {total} neurons → {plan.selected['neuron_adjust']} neurons "
                                 f"(score {na.score}, mode {na.mode}, seed {na.seed})")
    if recipe.prune:
        pr = recipe.prune
        out.row("prune", f"forget {pr.forget!r} vs retain {', '.join(repr(r) for r in pr.retain_sets)}: "
                         f"top {pr.top_percent:g} % of {total} neurons → {plan.selected['prune']} neurons zeroed (plain checkpoint)")
    ks = recipe.key_space
    if ks:
        na_pass = f"keys profiled again with Neuron Adjust active ({ks.forget}@neuron_adjust)" if recipe.neuron_adjust else ""
        if plan.calibration is not None:
            calibration_lines(out, plan)
            if na_pass:
                out.more(f"{na_pass}; the calibration's keys are collected with it active too")
        else:
            out.row("key_space", f"forget {ks.forget!r}: layer {ks.layer} → {plan.ksd_layer} (of 0..{n_layers - 1}), key = last "
                                 f"real token's down-projection input ({d_ff} dims), scale α = {ks.scale:g}"
                                 + (f"; {na_pass}" if na_pass else ""))
            if ks.retain_sets:
                out.more(f"calibrate: false — the retain sets {', '.join(repr(r) for r in ks.retain_sets)} "
                         f"choose nothing; the recipe's layer and scale are used")
        out.more(f"refusal {json.dumps(ks.refusal, ensure_ascii=False)}" + (f"; check {ks.check}" if ks.check != "every_call" else ""))

    out.raw()
    out.row("memory", f"statistics: {plan.stats_sets} set(s) × {n_layers} layers × 2 (pre, key) × {d_ff} neurons "
                      f"→ {human_bytes(plan.accumulator_bytes)} of accumulators; stats.safetensors ≈ "
                      f"{human_bytes(plan.stats_file_bytes)}")
    out.more(f"profiler transient ≤ batch {p.batch_size} × {p.max_length} tokens × {d_ff} × 8 B = "
             f"{human_bytes(plan.transient_bytes)} (float64 moments of one layer at a time)")
    if plan.edit_bytes:
        out.more(f"checkpoint: the base weights ({human_bytes(plan.weight_bytes)}) + {human_bytes(plan.edit_bytes)} of edit tensors")
    if plan.calibration is not None:
        out.more(f"calibration: {calibration_memory(plan.calibration)}")
    alone = ", ".join(f"{stage} ≈ {human_bytes(b)}" for stage, b in plan.peaks.items())
    in_run = ", ".join(f"{stage} ≈ {human_bytes(b)}" for stage, b in plan.run_peaks.items())
    cap = f" (batches of at most {BATCH_TOKENS} token positions)" if recipe.evaluate else ""
    out.more(f"peak RSS per stage on the CPU (docs/SCALE.md formulas; within ±25 % on SmolLM2 and Qwen): in run, "
             f"one process, in its order{cap}: {in_run}; each in its own process as profile / export run it: {alone}")
    out.raw()
    e = recipe.export
    out.row("export", f"{', '.join(e.formats)} → {Path(plan.out).resolve()}")
    if recipe.push:
        out.row("push", f"{recipe.push.repo_id} ({'private' if recipe.push.private else 'public'})")
    if recipe.evaluate:
        out.row("evaluate", f"scorecard on {recipe.evaluate.data!r} before and after")
    steps = [f"profile {', '.join(plan.profiled)}"]
    if recipe.neuron_adjust and ks:
        steps.append(f"profile {ks.forget} again with Neuron Adjust on")
    if plan.calibration is not None:
        negatives = list(ks.retain_sets) + ([] if ks.background == "none" else ["background"])
        steps.append(f"calibrate key_space ({ks.forget} vs {', '.join(negatives)}, {ks.folds}-fold CV)")
    steps += ["plan (" + ", ".join(recipe.methods) + ")", "patch", f"export {', '.join(e.formats)}"]
    out.row("steps", " → ".join(steps))
    return out.text()
