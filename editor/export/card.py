"""The model card (README.md) of an exported checkpoint, through ``huggingface_hub.ModelCard``.

Front-matter: ``base_model`` (when the base is a Hub id), ``tags``, ``library_name``,
``pipeline_tag`` and, when a scorecard exists, ``model-index`` results so the Hub renders them.
Body: what was forgotten and how, the scorecard before / after, how to load, limits, provenance,
citation. Built only from the checkpoint's manifest (``skill_editor.json``, ``editor.manifest``),
so it is deterministic and can be rebuilt from a checkpoint.
"""

from __future__ import annotations

import re
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from editor.manifest import ONNX_MODEL

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")

CITATION = """@inproceedings{li-etal-2025-effective,
    title = "Effective Skill Unlearning through Intervention and Abstention",
    author = "Li, Yongce and Sun, Chung-En and Weng, Tsui-Wei",
    booktitle = "Proceedings of the 2025 Conference of the Nations of the Americas Chapter of the Association for Computational Linguistics (NAACL)",
    year = "2025",
}"""

METHOD_TAGS = {"neuron_adjust": "neuron-adjust", "key_space": "key-space-detection", "prune": "selective-pruning"}


def hub_base_model(manifest: dict) -> str | None:
    """The base model's Hub id, or None for a local directory / embedded model."""
    base = manifest.get("base_model") or {}
    ref = str(base.get("model") or "")
    if base.get("local") or not HUB_ID.match(ref):
        return None
    return ref


def _num(x, fmt: str = ".3f") -> str:
    if isinstance(x, bool) or x is None:
        return "–" if x is None else str(x)
    if isinstance(x, (int, float)):
        return format(float(x), fmt)
    return str(x)


def _model_name(manifest: dict) -> str:
    recipe = manifest.get("recipe") or {}
    push = recipe.get("push") or {}
    if push.get("repo_id"):
        return str(push["repo_id"]).split("/")[-1]
    out = (recipe.get("export") or {}).get("out")
    if out:
        return str(out).rstrip("/").split("/")[-1]
    base = str((manifest.get("base_model") or {}).get("model") or "model").rstrip("/").split("/")[-1]
    return f"{base}-skill-editor"


def _skills(scorecard: dict) -> list[str]:
    names: set[str] = set()
    for key in ("before", "after", "drop"):
        v = scorecard.get(key)
        if isinstance(v, dict):
            names.update(str(k) for k in v)
    return sorted(names)


def _get(scorecard: dict, side: str, skill: str, metric: str):
    row = (scorecard.get(side) or {}).get(skill)
    if isinstance(row, dict):
        return row.get(metric)
    return None


def _drop(scorecard: dict, skill: str):
    d = (scorecard.get("drop") or {}).get(skill)
    if isinstance(d, dict):
        d = d.get("relative_drop", d.get("drop"))
    if d is None:
        b, a = _get(scorecard, "before", skill, "exact_match"), _get(scorecard, "after", skill, "exact_match")
        if isinstance(b, (int, float)) and isinstance(a, (int, float)) and b > 0:
            d = 1.0 - a / b
    return d


def eval_results(manifest: dict) -> list[EvalResult]:
    """model-index entries: per skill, the edited model's exact match, abstention rate and relative
    drop vs. the base model (when known). The base model's own scores stay in the card's table:
    model-index results are read as this model's."""
    sc = manifest.get("scorecard")
    if not isinstance(sc, dict):
        return []
    recipe = manifest.get("recipe") or {}
    ev = recipe.get("evaluate") or {}
    ds_spec = (recipe.get("data") or {}).get(ev.get("data"), {}) if ev.get("data") else {}
    ds_path = str(ds_spec.get("path") or "")
    ds_type = ds_path if HUB_ID.match(ds_path) and not ds_path.endswith((".jsonl", ".json", ".csv", ".parquet", ".txt")) else "skill-editor/scorecard"
    out = []
    forms = sc.get("forms") if isinstance(sc.get("forms"), dict) and sc.get("forms") else None
    for form, part in (forms.items() if forms else [(None, sc)]):
        suffix = f" ({form} form)" if form else ""
        for skill in _skills(part):
            metrics = [
                ("exact_match", "exact match (edited)", _get(part, "after", skill, "exact_match")),
                ("abstention_rate", "abstention rate (edited)", _get(part, "after", skill, "abstained")),
                ("relative_drop", "relative drop 1 - after/before", _drop(part, skill)),
            ]
            for mtype, mname, value in metrics:
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out.append(EvalResult(
                        task_type="text-generation", task_name="Skill unlearning",
                        dataset_type=ds_type, dataset_name=f"{ev.get('data') or 'scorecard'}: {skill}{suffix}",
                        dataset_config=f"{skill}-{form}" if form else skill, dataset_split="eval",
                        metric_type=mtype, metric_name=mname, metric_value=round(float(value), 4),
                    ))
    o = sc.get("ordinary")
    if isinstance(o, dict) and o.get("n"):
        out.append(EvalResult(
            task_type="text-generation", task_name="Skill unlearning", dataset_type="skill-editor/ordinary",
            dataset_name=f"ordinary prompts: {o.get('set', 'held out')}", dataset_split="eval",
            metric_type="false_refusal_rate", metric_name="ordinary prompts refused (edited)",
            metric_value=round(float(o["rate"]), 4),
        ))
    return out


def card_data(manifest: dict, fmt: str = "hf") -> ModelCardData:
    edit = manifest.get("edit") or {}
    methods = list(edit.get("methods") or [])
    tags = ["skill-editor", "unlearning", "machine-unlearning", "model-editing"] + (["onnx"] if fmt == "onnx" else [])
    tags += [METHOD_TAGS[m] for m in methods if m in METHOD_TAGS]
    arch = (manifest.get("base_model") or {}).get("model_type")
    if arch:
        tags.append(str(arch))
    results = eval_results(manifest)
    kwargs: dict[str, Any] = {}
    if results:
        kwargs["eval_results"] = results
        kwargs["model_name"] = _model_name(manifest)
    return ModelCardData(
        base_model=hub_base_model(manifest),
        library_name="onnx" if fmt == "onnx" else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
        **kwargs,
    )


def _data_line(name: str, spec: dict) -> str:
    bits = [f"`{spec.get('path')}`"]
    if spec.get("name"):
        bits.append(f"config `{spec['name']}`")
    if spec.get("split"):
        bits.append(f"split `{spec['split']}`")
    if spec.get("text"):
        bits.append(f"template `{spec['text']!r}`")
    if spec.get("where"):
        bits.append(f"where `{spec['where']}`")
    if spec.get("limit"):
        bits.append(f"first {spec['limit']}")
    return f"- **{name}**: " + ", ".join(bits)


def _how_section(manifest: dict) -> list[str]:
    edit = manifest.get("edit") or {}
    recipe = manifest.get("recipe") or {}
    lines = ["## What was forgotten and how", ""]
    na, ks, pr = edit.get("neuron_adjust"), edit.get("key_space"), edit.get("prune")
    forget = sorted({x.get("forget") for x in (na, ks, pr) if x and x.get("forget")})
    if forget:
        lines += [f"Forgotten skill (forget set{'s' if len(forget) > 1 else ''}): {', '.join(f'`{f}`' for f in forget)}.", ""]
    if na:
        lines += [
            "**Neuron Adjust** (intervention). The feed-forward neurons whose pre-activation mean differs "
            f"most between the forget set `{na.get('forget')}` and the retain set(s) "
            f"{', '.join(f'`{x}`' for x in na.get('retain') or [])} were selected "
            f"(score `{na.get('score')}`, top {_num(na.get('top_percent'), 'g')} % of all neurons: "
            f"{na.get('total')} neurons). At inference, values that look like the forget distribution "
            "are mapped onto the retain distribution "
            f"(mode `{na.get('mode')}`, seed {na.get('seed')}).",
            "",
            "| layer | neurons |",
            "|---:|---:|",
        ]
        lines += [f"| {layer} | {n} |" for layer, n in sorted((na.get("counts") or {}).items(), key=lambda kv: int(kv[0]))]
        lines.append("")
    if ks and ks.get("detector") == "linear":
        cv = (ks.get("plan") or {}).get("cv") or {}
        lines.append(
            f"**Key Space Detection, pooled linear detector** (abstention; beyond the paper). The MLP keys of "
            f"layers {', '.join(str(x) for x in ks.get('layers') or [])}, each max-pooled over the query's tokens, "
            f"are scored by one linear function fitted to tell `{ks.get('forget')}` from the retain queries "
            f"{', '.join(f'`{x}`' for x in (ks.get('plan') or {}).get('retain') or [])} and thresholded by "
            f"{cv.get('folds')}-fold cross-validation at a false-positive budget of {_num(cv.get('budget'), 'g')} per "
            "retain set (weights and bias stored in the checkpoint; out of fold: "
            f"{_num(100 * cv['forget_coverage'] if isinstance(cv.get('forget_coverage'), (int, float)) else None, '.3g')} % of the "
            f"forget queries caught, {_num(100 * cv['retain_fpr'] if isinstance(cv.get('retain_fpr'), (int, float)) else None, '.3g')} % "
            "of the retain queries refused). A query whose score is positive is answered with the refusal text"
            + (" (keys profiled with Neuron Adjust active)." if ks.get("profiled_with_neuron_adjust") else ".")
        )
    elif ks:
        layers = ks.get("layers") or []
        for layer in layers:
            k = (ks.get("k") or {}).get(str(layer))
            a = (ks.get("scale") or {}).get(str(layer))
            lines.append(
                f"**Key Space Detection** (abstention). Queries of `{ks.get('forget')}` cluster in the MLP key "
                f"space of layer {layer}; a hypercube μ ± α·k·σ around them (k = {_num(k, '.4g')}, "
                f"α = {_num(a, 'g')}) is stored in the checkpoint. A query whose key falls inside it in every "
                "dimension is answered with the refusal text"
                + (" (keys profiled with Neuron Adjust active)." if ks.get("profiled_with_neuron_adjust") else ".")
            )
    if ks:
        if ks.get("check") == "prompt":
            what = "scores the prompt's pooled keys" if ks.get("detector") == "linear" else "tests the key of the prompt's last token"
            lines += ["", f"The guard decides on the query: `generate` {what} "
                      "(its first forward call) and does not re-check the generated tokens (`key_space.check: prompt`)."]
        else:
            lines += ["", "The guard tests the key at the last token of every forward call of `generate`: the "
                      "prompt and each generated token (`key_space.check: every_call`)."]
        lines += ["", f"Refusal: `{ks.get('refusal')}`", ""]
    if pr:
        lines += [
            f"**Selective Pruning** (baseline). {pr.get('total')} neurons (top {_num(pr.get('top_percent'), 'g')} %, "
            f"score `{pr.get('score')}`) most specific to `{pr.get('forget')}` were zeroed in the down projection. "
            "This is a plain checkpoint of the base architecture (no custom code).",
            "",
        ]
    data = recipe.get("data") or {}
    if data:
        lines += ["Data sets:", ""] + [_data_line(n, s) for n, s in sorted(data.items())] + [""]
    return lines


def _skill_table(sc: dict) -> list[str]:
    lines = [
        "| skill | before | after | drop | abstained before | abstained after | n |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for skill in _skills(sc):
        n = _get(sc, "after", skill, "n") or _get(sc, "before", skill, "n")
        lines.append(
            f"| {skill} | {_num(_get(sc, 'before', skill, 'exact_match'))} | {_num(_get(sc, 'after', skill, 'exact_match'))} "
            f"| {_num(_drop(sc, skill))} | {_num(_get(sc, 'before', skill, 'abstained'))} "
            f"| {_num(_get(sc, 'after', skill, 'abstained'))} | {n if n is not None else '–'} |"
        )
    return lines


FORM_TITLES = {"raw": "Raw form (the prompt as text)", "chat": "Chat form (the prompt in the tokenizer's chat template, "
                                                              "as chat clients send it)"}


def _scorecard_section(manifest: dict) -> list[str]:
    sc = manifest.get("scorecard")
    if not isinstance(sc, dict) or not _skills(sc):
        return ["## Scorecard", "", "No scorecard was computed for this export (run `skill-editor eval`).", ""]
    lines = [
        "## Scorecard",
        "",
        "Exact match per skill on held-out prompts, base model vs. this checkpoint; *drop* = 1 − after/before.",
        "",
    ]
    forms = sc.get("forms") if isinstance(sc.get("forms"), dict) else {}
    if forms:
        for form, part in forms.items():
            lines += [f"### {FORM_TITLES.get(form, form)}", ""] + _skill_table(part) + [""]
    else:
        lines += _skill_table(sc) + [""]
    return lines + _refusals_section(sc) + _attacks_section(sc)


def _refusals_section(sc: dict) -> list[str]:
    """False refusals: the share of ordinary prompts (never read by the calibration) refused, the
    near-neighbour contrast prompts apart, per form."""
    o = sc.get("ordinary")
    if not isinstance(o, dict) or not o.get("n"):
        return ["**False refusals:** not measured for this export (`skill-editor eval --ordinary default`).", ""]
    cats = o.get("categories") or {}
    lines = [
        "### False refusals",
        "",
        f"Ordinary prompts refused by this checkpoint: **{100 * o['rate']:.1f} %** ({o['refused']} of {o['n']}; "
        f"set: {o.get('set', '?')}, held out from the guard's calibration).",
        "",
    ]
    if isinstance(o.get("contrast"), dict):
        c = o["contrast"]
        lines += [f"Near-neighbour contrast prompts (they look like a forgotten skill but are not it: numbers in text, "
                  f"talk about a subject, other programming languages) refused: **{100 * c['rate']:.1f} %** "
                  f"({c['refused']} of {c['n']}).", ""]
    forms = o.get("forms") if isinstance(o.get("forms"), dict) else {}
    if forms:
        lines += ["| form | ordinary prompts refused | near-neighbour contrast refused |", "|---|---:|---:|"]
        for form, d in forms.items():
            c = d.get("contrast") or {}
            contrast = f"{100 * c['rate']:.1f} % ({c['refused']} of {c['n']})" if c else "–"
            lines.append(f"| {form} | {100 * d['rate']:.1f} % ({d['refused']} of {d['n']}) | {contrast} |")
        lines.append("")
    if len(cats) > 1:
        lines += ["| category | refused | n |", "|---|---:|---:|"]
        for c, d in cats.items():
            apart = " (near-neighbour contrast)" if c in (o.get("separate") or []) else ""
            lines.append(f"| {c}{apart} | {d['refused']} | {d['n']} |")
        lines.append("")
    return lines


def _attacks_section(sc: dict) -> list[str]:
    """The attack suite: the forgotten skill's requests wrapped to slip past the guard."""
    a = sc.get("attacks")
    if not isinstance(a, dict) or not a.get("n"):
        return []
    fams = a.get("families") or {}
    forms = list(dict.fromkeys(f for d in fams.values() for f in (d.get("forms") or {})))
    lines = [
        "### Attacks",
        "",
        f"Requests of the forgotten skill ({a.get('skill', '?')}) wrapped to slip past the guard (the tool's attack "
        f"suite, {a.get('part', 'evaluation')} part, never used to fit it). Refused: **{100 * a['rate']:.1f} %** "
        f"({a['refused']} of {a['n']}); the attack success rate is the rest.",
        "",
        "| attack family | " + " | ".join(f"refused ({f})" for f in forms) + " |",
        "|---|" + "---:|" * len(forms),
    ]
    for fam, d in fams.items():
        cells = []
        for f in forms:
            v = (d.get("forms") or {}).get(f)
            cells.append(f"{100 * v['rate']:.1f} % ({v['refused']} of {v['n']})" if v else "–")
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    return lines + [""]


def _load_section(manifest: dict) -> list[str]:
    recipe = manifest.get("recipe") or {}
    repo = (recipe.get("push") or {}).get("repo_id") or "path/to/this/checkpoint"
    plain = manifest.get("kind") == "plain"
    if plain:
        return [
            "## How to load",
            "",
            "A plain checkpoint of the base architecture:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            "```",
            "",
        ]
    ks = (manifest.get("edit") or {}).get("key_space")
    lines = [
        "## How to load",
        "",
        "The edit ships as a small custom module (`modeling_skill_editor.py`, which imports only `torch` and "
        "`transformers`), so loading needs `trust_remote_code=True` — read the file first. Without it, loading "
        "fails (it never silently falls back to the unedited model). A checkpoint whose patch tensors are "
        "missing or do not match the digest recorded in `config.json` refuses to load.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        f'generator = pipeline("text-generation", model="{repo}", trust_remote_code=True)',
        "```",
        "",
    ]
    if ks:
        lines += [
            "`model(...)` returns `abstained` (bool per batch row) next to the logits; `model.generate(...)` "
            "returns the refusal text for rows whose query falls in the forgotten skill's key space and "
            "stops them at once (other rows continue).",
            "",
        ]
        if ks.get("check") == "prompt":
            lines += [
                "This checkpoint decides on the prompt (`check: prompt`): `forward` still reports the test of "
                "every call, and `generate` uses the first call's. A hand-written loop (or ONNX Runtime) should "
                "read `abstained` from the prompt's forward call only.",
                "",
            ]
    lines += [
        "`skill-editor inspect CHECKPOINT` shows what was edited and verifies every file's sha256; "
        "`skill-editor restore CHECKPOINT --out DIR` writes the exact base model back.",
        "",
    ]
    return lines


def _limits_section(manifest: dict) -> list[str]:
    edit = manifest.get("edit") or {}
    na = edit.get("neuron_adjust")
    lines = ["## Limits", ""]
    if manifest.get("kind") == "plain":
        lines.append("- Selective Pruning zeroes weights; the pruned neurons' contribution is gone, other "
                     "neurons may still carry part of the skill.")
    else:
        lines += [
            "- **The base weights are still present** (only the MLP neurons are permuted). The edit is an "
            "inference-time guard for people who load the checkpoint as published — not a defense against "
            "someone who edits the weights or the shipped code; anyone can remove the patch.",
        ]
        if na and na.get("mode") == "sample":
            lines.append("- Neuron Adjust runs in `sample` mode (the paper's): outputs are stochastic; the "
                         "random generator is seeded per layer (`model.reset_neuron_adjust_rng()` replays it).")
        if (edit.get("key_space") or {}).get("detector") == "linear":
            lines.append("- The linear detector abstains on any query whose pooled keys score above its threshold: "
                         "prompts of other skills can be refused (false positives; the cross-validated rate is above), "
                         "rephrased forget-skill prompts can escape it, and a long prompt is judged as a whole (its "
                         "keys are max-pooled over every token), so a prompt that mixes skills can be refused.")
        elif edit.get("key_space"):
            lines.append("- Key Space Detection abstains on any query whose key falls in the hypercube: prompts "
                         "of other skills can be refused (false positives), and rephrased forget-skill prompts "
                         "can escape it.")
            if edit["key_space"].get("check") == "prompt":
                lines.append("- The guard decides on the query only (`check: prompt`): an answer to a query that "
                             "escaped the box is not stopped while it is generated.")
    lines += [
        "- Measured only on the data sets and the scorecard listed here; the skill may survive in other "
        "phrasings, languages or formats.",
        "",
    ]
    return lines


def environment() -> dict[str, str]:
    """The versions of the libraries the edit was built and checked with (this process's)."""
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}


def _tested_with(manifest: dict, fmt: str = "hf") -> str:
    """Which transformers (and torch) the checkpoint was tested with, and what the rest of the range relies on."""
    env = manifest.get("environment") or environment()
    versions = f"transformers {env['transformers']}, torch {env['torch']}"
    if fmt == "onnx":
        return (f"- Tested with: {versions} (the graph was exported with these releases and validated against "
                "PyTorch's output; running it needs ONNX Runtime only, not transformers)")
    if manifest.get("kind") == "plain":
        return f"- Tested with: {versions} (plain weights of the base architecture, no custom code)"
    return (f"- Tested with: {versions} (the shipped runtime file ran in-process with these releases). The runtime "
            "declares transformers >=5.0,<6 and passes the KV cache under the name the installed release supports "
            "(`cache` from 5.24, `past_key_values` before), never through the deprecated alias that transformers "
            "5.40 removes; other releases were not tested with this checkpoint")


def _provenance_section(manifest: dict, fmt: str = "hf") -> list[str]:
    base = manifest.get("base_model") or {}
    st = manifest.get("statistics") or {}
    lines = [
        "## Provenance",
        "",
        f"- Base model: `{base.get('model')}`" + (f" (revision `{base.get('revision')}`)" if base.get("revision") else "")
        + f", architecture `{base.get('model_type')}`, dtype `{base.get('dtype')}`",
    ]
    gguf = st.get("model_file") if isinstance(st.get("model_file"), dict) else {}
    if gguf.get("gguf_file"):
        lines.append(f"- Base weights read from the GGUF file `{gguf['gguf_file']}`"
                     + (f" (sha256 `{gguf['gguf_sha256']}`)" if gguf.get("gguf_sha256") else "")
                     + ", dequantized on load; this checkpoint holds them in the dtype above")
    lines += [
        f"- Tool: skill-editor {manifest.get('tool_version')}",
        _tested_with(manifest, fmt),
    ]
    digest = (manifest.get("edit") or {}).get("patch_digest")
    if digest:
        lines.append(f"- Patch digest (sha256 of the patch tensors): `{digest}`")
    if st.get("digest"):
        lines.append(f"- Statistics: `{st.get('file', 'stats.safetensors')}` content digest (sha256 of its metadata "
                     f"and tensors) `{st['digest']}`")
    for name, info in sorted((st.get("sets") or {}).items()):
        if isinstance(info, dict):
            bits = [f"{k} {info[k]}" for k in ("texts", "tokens") if k in info]
            if info.get("fingerprint"):
                bits.append(f"fingerprint `{str(info['fingerprint'])[:16]}`")
            lines.append(f"- Profiled set `{name}`: " + ", ".join(bits))
    lines += ["- Recipe, statistics and sha256 of every file: `skill_editor.json`.", ""]
    return lines


def _onnx_load_section(manifest: dict) -> list[str]:
    logits = (manifest.get("onnx") or {}).get("logits", "last")
    edit = manifest.get("edit") or {}
    ks = edit.get("key_space")
    na = edit.get("neuron_adjust")
    lines = [
        "## How to load (ONNX)",
        "",
        "`model.onnx` (+ `model.onnx.data`) is a self-contained graph: the edit is inside it"
        + (f" (Neuron Adjust in `{na.get('mode')}` mode" if na else "")
        + ((" and the Key Space Detection " + ("linear detector" if ks.get("detector") == "linear" else "box")) if ks else "") + (")" if na else "")
        + ". Inputs: `input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key|value` "
        "(empty for the prompt); outputs: `logits` "
        + ("(`[batch, sequence, vocab]`: every position)" if logits == "all" else
           "(`[batch, 1, vocab]`: the last position only, as `logits_to_keep=1` — what a generator needs; left-pad "
           "batches so that it is every row's last real token)")
        + ", `present.{i}.key|value`"
        + (", `abstained` (bool per batch row)" if ks else "") + ". The tokenizer files load with "
        "`transformers.AutoTokenizer`; `skill_editor.json` lists the shapes, the validation against "
        "PyTorch and the sha256 of every file.",
        "",
        "```python",
        "import onnxruntime as ort",
        "",
        f'session = ort.InferenceSession("{ONNX_MODEL}")',
        "```",
        "",
    ]
    if ks:
        rule = ("read `abstained` from the prompt's call only (this export decides on the query: "
                "`key_space.check: prompt`)") if ks.get("check") == "prompt" else (
                "stop a row and answer the refusal text as soon as any call's `abstained` is true "
                "(`key_space.check: every_call`)")
        lines += [f"In a generation loop, {rule}; the refusal text is `{ks.get('refusal')}`.", ""]
    lines += [
        "With skill-editor installed, `editor.onnx_runtime.OnnxGenerator(path).generate(prompts)` runs "
        "that loop (greedy, KV cache, the edit's abstention rule); `skill-editor inspect DIR` verifies "
        "every file's sha256.",
        "",
    ]
    return lines


def card_body(manifest: dict, fmt: str = "hf") -> str:
    base = (manifest.get("base_model") or {}).get("model")
    name = _model_name(manifest)
    edit = manifest.get("edit") or {}
    methods = ", ".join(METHOD_TAGS.get(m, m).replace("-", " ") for m in edit.get("methods") or []) or "no method"
    lines = [
        f"# {name}",
        "",
        f"`{base}` with one skill removed by skill-editor ({methods}), the training-free "
        "methods of *Effective Skill Unlearning through Intervention and Abstention* (Li, Sun, Weng — NAACL 2025).",
        "",
    ]
    lines += _how_section(manifest)
    lines += _scorecard_section(manifest)
    lines += _onnx_load_section(manifest) if fmt == "onnx" else _load_section(manifest)
    lines += _limits_section(manifest)
    lines += _provenance_section(manifest, fmt)
    lines += ["## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def build_card(manifest: dict, fmt: str = "hf") -> ModelCard:
    """The ModelCard of a checkpoint from its manifest (``skill_editor.json`` without ``files``);
    ``fmt``: ``hf`` (transformers) or ``onnx`` (an ONNX export directory)."""
    data = card_data(manifest, fmt)
    content = f"---\n{data.to_yaml()}\n---\n\n{card_body(manifest, fmt)}"
    return ModelCard(content)
