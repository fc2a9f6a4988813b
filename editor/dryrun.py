"""``skill-editor run RECIPE --dry-run``: validate a recipe and print the plan — no weights, no
network, nothing written.

What is checked, offline:

* the recipe itself (``load_recipe``: keys, types, ranges, set names);
* the model's ``config.json`` (a local directory, or a Hub id already in the local cache):
  architecture supported (``editor.model.arch.spec_for``), layer indices (``check_against_config``);
* every data set: local files are read (jsonl / json / txt fully, csv / parquet by their header
  and metadata) and every template field and ``where`` key is checked on the records; Hub data
  sets are **not** fetched — their template fields, configuration and split are checked against
  a known schema for the paper's benchmarks (``KNOWN_DATASETS``: GSM8K, MBPP, MLQA, MMLU), any
  other Hub data set is listed as "checked at run time".

What is printed: the sets and how many texts each gives, the neurons Neuron Adjust / pruning
selects (n = max(1, round(p·N/100)) over N = layers × d_ff), the resolved KSD layer and scale — or,
for a calibrated ``key_space`` (retain queries named, ``calibrate`` not false), that the layer(s),
dims and α will be chosen by calibration, with its budget, folds, seed and retain sets — d_ff, and
memory estimates — weights in the recipe's dtype (from the config's shapes), the statistics
(O(layers × d_ff) per set), the per-batch transient of the profiler, the calibration's keys and
what the edit adds to the checkpoint.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from editor.errors import EditorError
from editor.model.arch import config_d_ff, config_layers
from editor.model.loading import check_against_config, model_source
from editor.recipe import DataSetSpec, Recipe, load_recipe

# ---------------------------------------------------------------------------------------------
# known Hub schemas (fields, configurations, splits with their published row counts)
# ---------------------------------------------------------------------------------------------

_MLQA_LANGS = ("ar", "de", "en", "es", "hi", "vi", "zh")
# rows of the same-language configurations (test, validation) as published with MLQA v1
_MLQA_ROWS = {
    "en": (11590, 1148), "de": (4517, 512), "es": (5253, 500), "ar": (5335, 517),
    "hi": (4918, 507), "vi": (5495, 511), "zh": (5137, 504),
}


def _mlqa_configs() -> dict:
    out = {}
    fields = ["id", "title", "context", "question", "answers"]
    for c in _MLQA_LANGS:
        for q in _MLQA_LANGS:
            rows = _MLQA_ROWS[c] if c == q else (None, None)
            out[f"mlqa.{c}.{q}"] = {"fields": fields, "splits": {"test": rows[0], "validation": rows[1]}}
    return out


KNOWN_DATASETS: dict[str, dict] = {
    "openai/gsm8k": {
        "aliases": ("gsm8k",),
        "configs": {
            "main": {"fields": ["question", "answer"], "splits": {"train": 7473, "test": 1319}},
            "socratic": {"fields": ["question", "answer"], "splits": {"train": 7473, "test": 1319}},
        },
    },
    "google-research-datasets/mbpp": {
        "aliases": ("mbpp",),
        "configs": {
            "full": {
                "fields": ["task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list"],
                "splits": {"train": 374, "test": 500, "validation": 90, "prompt": 10},
            },
            "sanitized": {
                "fields": ["source_file", "task_id", "prompt", "code", "test_imports", "test_list"],
                "splits": {"train": 120, "test": 257, "validation": 43, "prompt": 7},
            },
        },
        "default": "full",
    },
    "facebook/mlqa": {
        "aliases": ("mlqa",),
        "configs": _mlqa_configs(),
        "note": "the Hub repository may still be a loading script, which datasets >= 4 refuses; "
        "if loading fails, convert MLQA_V1 to JSONL (recipes/paper/README.md)",
    },
    "cais/mmlu": {
        "aliases": ("mmlu",),
        "configs": {
            "all": {
                "fields": ["question", "subject", "choices", "answer"],
                "splits": {"test": 14042, "validation": 1531, "dev": 285, "auxiliary_train": 99842},
            },
        },
    },
}


def known_schema(spec: DataSetSpec) -> tuple[str, dict] | None:
    """(canonical id, entry) of a known Hub data set, or None."""
    for key, entry in KNOWN_DATASETS.items():
        if spec.path == key or spec.path in entry.get("aliases", ()):
            return key, entry
    return None


# ---------------------------------------------------------------------------------------------
# sizes from config.json
# ---------------------------------------------------------------------------------------------


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _first(c, *names, default=None):
    for n in names:
        v = getattr(c, n, None)
        if v is not None:
            return v
    return default


def model_shape(config) -> dict:
    """Layers, hidden size, d_ff, heads, vocab, tied embeddings — from the config only."""
    c = _text_config(config)
    hidden = int(_first(c, "hidden_size", "n_embd", "d_model", default=0))
    layers = config_layers(config) or 0
    d_ff = config_d_ff(config) or 4 * hidden
    heads = int(_first(c, "num_attention_heads", "n_head", default=1))
    kv = int(_first(c, "num_key_value_heads", default=heads) or heads)
    head_dim = int(_first(c, "head_dim", default=0) or (hidden // heads if heads else 0))
    vocab = int(_first(c, "vocab_size", default=0))
    tied = bool(getattr(c, "tie_word_embeddings", getattr(config, "tie_word_embeddings", True)))
    return {"layers": layers, "hidden": hidden, "d_ff": d_ff, "heads": heads, "kv_heads": kv,
            "head_dim": head_dim, "vocab": vocab, "tied": tied}


def parameter_count(config, gated: bool) -> int:
    """Parameters from the shapes: embeddings (+ untied head), attention, MLP, norms. An estimate
    (biases and architecture extras are ignored) — within a fraction of a percent for Llama/Gemma."""
    s = model_shape(config)
    h, ff, n = s["hidden"], s["d_ff"], s["layers"]
    q = s["heads"] * s["head_dim"]
    kv = s["kv_heads"] * s["head_dim"]
    attn = h * q + 2 * h * kv + q * h
    mlp = (3 if gated else 2) * h * ff
    per_layer = attn + mlp + 2 * h
    emb = s["vocab"] * h * (1 if s["tied"] else 2)
    return n * per_layer + emb + h


_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def recipe_dtype(recipe: Recipe, config) -> str:
    if recipe.dtype != "auto":
        return recipe.dtype
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(d).replace("torch.", "") if d is not None else "float32"
    return name if name in _BYTES else "float32"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# data sets
# ---------------------------------------------------------------------------------------------


def _is_local(spec: DataSetSpec, base_dir: Path) -> Path | None:
    from editor.data import LOCAL_EXT

    p = Path(spec.path).expanduser()
    if not p.is_absolute():
        p = base_dir / p
    if p.suffix.lower() in LOCAL_EXT or p.exists():
        return p
    return None


def _check_fields(name: str, spec: DataSetSpec, fields: list[str], where_from: str) -> None:
    from editor.data import _template_fields

    for f in _template_fields(spec.text):
        if f not in fields:
            raise EditorError(f"data.{name}.text: {where_from} has no field {f!r} (fields: {', '.join(fields)})")
    for k in spec.where or {}:
        if k not in fields:
            raise EditorError(f"data.{name}.where: {where_from} has no field {k!r} (fields: {', '.join(fields)})")


def _columns_of(path: Path, name: str) -> tuple[list[str], int | None]:
    """Column names (and row count when cheap) of a csv / parquet file, without any cache."""
    if not path.exists():
        raise EditorError(f"data.{name}: file not found: {path}")
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path)
            return list(meta.schema_arrow.names), meta.metadata.num_rows
        except Exception as e:  # noqa: BLE001
            raise EditorError(f"data.{name}: cannot read {path.name}: {type(e).__name__}: {e}") from None
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = sum(1 for _ in reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise EditorError(f"data.{name}: cannot read {path.name}: {e}") from None
    if not header:
        raise EditorError(f"data.{name}: {path.name} has no header row")
    return header, rows


def _texts_after_limit(rows: int | None, spec: DataSetSpec) -> int | None:
    if rows is None:
        return spec.limit if spec.where is None else None
    if spec.where:
        return None
    return min(rows, spec.limit) if spec.limit is not None else rows


def check_set(recipe: Recipe, name: str) -> dict:
    """What can be known about one named set offline; raises EditorError on a definite error."""
    from editor.data import check_scorecard_records, load_records, render

    spec = recipe.data[name]
    local = _is_local(spec, recipe.base_dir)
    info: dict = {"name": name, "template": spec.text, "limit": spec.limit, "split": spec.split}
    if local is not None:
        info["source"] = f"local {local}"
        if local.suffix.lower() in (".csv", ".parquet"):
            cols, rows = _columns_of(local, name)
            _check_fields(name, spec, cols, local.name)
            info["texts"] = _texts_after_limit(rows, spec)
            info["checked"] = "header checked (fields ok)"
        else:
            records, _, origins = load_records(spec, recipe.base_dir, name)
            if recipe.evaluate and recipe.evaluate.data == name:
                check_scorecard_records(records, origins, f"evaluate.data: set {name!r}")
            texts = render(records, spec.text, name, origins)
            if not texts:
                raise EditorError(f"data.{name}: the set is empty")
            if len(texts) < 2:
                raise EditorError(f"data.{name}: has {len(texts)} text(s); at least 2 are needed")
            info["texts"] = len(texts)
            info["checked"] = "read and rendered (fields ok)"
            info["longest_chars"] = max(len(t) for t in texts)
        return info
    info["source"] = f"Hub {spec.path}" + (f" ({spec.name})" if spec.name else "") + (f" @ {spec.revision}" if spec.revision else "")
    known = known_schema(spec)
    if known is None:
        info["texts"] = spec.limit
        info["checked"] = "Hub data set not fetched in a dry run: fields are checked at run time"
        return info
    key, entry = known
    cfg_name = spec.name or entry.get("default")
    if cfg_name is None:
        raise EditorError(f"data.{name}.name: {key} needs a configuration name (one of: {_few(entry['configs'])})")
    cfg = entry["configs"].get(cfg_name)
    if cfg is None:
        raise EditorError(f"data.{name}.name: {key} has no configuration {cfg_name!r} (have: {_few(entry['configs'])})")
    if spec.split not in cfg["splits"]:
        raise EditorError(f"data.{name}.split: {key}/{cfg_name} has no split {spec.split!r} (have: {', '.join(cfg['splits'])})")
    _check_fields(name, spec, cfg["fields"], f"{key}/{cfg_name}")
    rows = cfg["splits"][spec.split]
    info["rows"] = rows
    info["texts"] = _texts_after_limit(rows, spec)
    info["checked"] = f"fields checked against the known schema of {key}; not fetched"
    if entry.get("note"):
        info["note"] = entry["note"]
    return info


def _few(d: dict, k: int = 8) -> str:
    keys = list(d)
    return ", ".join(keys[:k]) + (f", … ({len(keys)} in all)" if len(keys) > k else "")


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------


def calibration_plan(recipe: Recipe, sets: dict[str, dict], n_layers: int, d_ff: int) -> dict:
    """What the dry run can say about a calibrated ``key_space`` (docs/GENERALIZATION.md §1): the
    layer(s), guarded dims and α are chosen at profile time by K-fold cross-validation on the forget
    and retain queries, so the recipe's ``layer`` / ``scale`` are not used and are not shown as the
    plan. The settings come from ``editor.methods.calibrate.calibration_config`` (what the stored choice
    must agree with). Returns {"lines": [...], "memory": str}."""
    from editor.methods.calibrate import SCALES, calibration_config

    scales = SCALES
    ks = recipe.key_space
    cfg = calibration_config(recipe)
    retain = list(cfg.get("retain") or ks.retain_sets)
    budget = float(cfg.get("false_positive_budget", ks.false_positive_budget))
    folds = int(cfg.get("folds", ks.folds))
    seed = cfg.get("seed", ks.seed)
    cont = cfg.get("continuation_tokens")
    counts = [sets[n].get("texts") if n in sets else None for n in [ks.forget, *retain]]
    if ks.background == "default":
        from editor.ordinary import load as load_ordinary

        n_bg = len(load_ordinary("calibration"))
        background = f"background: the {n_bg} shipped ordinary prompts (calibration part)"
        counts.append(n_bg)
    elif ks.background == "none":
        background = "no background negatives (background: none)"
    else:
        counts += [sets[n].get("texts") if n in sets else None for n in ks.background_sets]
        background = f"background: {', '.join(repr(b) for b in ks.background_sets)}"
    budget_on = "per retain set and on the background" if ks.background != "none" else "per retain set"
    if ks.detector == "linear":
        q = sum(int(c) for c in counts) if all(c is not None for c in counts) else None
        feat = n_layers * d_ff
        # what the calibration adds above the profile's peak: the pooled keys (allocated once, filled in
        # place), the float64 Gram matrix of the queries and one fold's copy of it with its
        # eigenvectors, and one layer's standardized keys (float64 and float32) at a time
        def fit_bytes(n: int) -> int:
            return 4 * n * n * 8 + n * d_ff * 12

        memory = (f"≤ {q} queries × {n_layers} layers × {d_ff} × 4 B = {human_bytes(q * feat * 4)} of pooled keys (float32), "
                  f"+ {human_bytes(fit_bytes(q))} for the fit (the {q} × {q} Gram matrix, a fold's copy and its "
                  f"eigenvectors, one layer's standardized keys) → ≤ {human_bytes(q * feat * 4 + fit_bytes(q))} above the "
                  f"profile's peak (a set in both raw and chat form counts twice)"
                  if q is not None else f"queries × {n_layers} layers × {d_ff} × 4 B of pooled keys (float32) "
                  f"+ 4 × queries² × 8 B for the fit above the profile's peak")
        return {"lines": [
            f"key_space    forget {ks.forget!r}: pooled linear detector — every layer's key max-pooled over the prompt's "
            f"tokens, one linear score fitted at profile time; the recipe's layer ({ks.layer}) and scale ({ks.scale:g}) are not used",
            f"             retain sets {', '.join(repr(r) for r in retain)}; {background}; false-positive budget {budget:g} "
            f"({budget * 100:g} % {budget_on}, out of fold), {folds}-fold cross-fitting, seed {seed}; check {ks.check}",
        ], "memory": memory}
    lines = [
        f"key_space    forget {ks.forget!r}: calibrated — the layer(s), the guarded dims and α (scale) are chosen by "
        f"calibration at profile time; the recipe's layer ({ks.layer}) and scale ({ks.scale:g}) are not used",
        f"             retain sets {', '.join(repr(r) for r in retain)}; {background}; false-positive budget {budget:g} "
        f"({budget * 100:g} % {budget_on}), {folds}-fold cross-validation, seed {seed}",
        f"             candidates: every layer 0..{n_layers - 1} (and pairs of the best), the top-m of the {d_ff} key dims "
        f"for m on a grid, " + (f"α ∈ {{{', '.join(f'{a:g}' for a in scales)}}}" if scales else "α on a grid"),
    ]
    # keys held in memory (float32, CPU): per query its prompt key plus, when the runtime checks
    # every call, up to continuation_tokens - 1 generated tokens' keys, at every layer
    per_query = max(1, int(cont)) if cont is not None else None
    per = f"{per_query} key(s)" if per_query is not None else "its keys"
    if per_query is not None and all(c is not None for c in counts):
        q = sum(int(c) for c in counts)
        memory = (f"≤ {q} queries × {per} × {n_layers} layers × {d_ff} × 4 B = "
                  f"{human_bytes(q * per_query * n_layers * d_ff * 4)} of keys (float32, CPU)")
    else:
        memory = f"per query ≤ {per} × {n_layers} layers × {d_ff} × 4 B of keys (float32, CPU); query counts known at run time"
    if cont is not None:
        lines.append(f"             keys: each query's last prompt token" + (f" + up to {int(cont) - 1} greedy continuation tokens"
                                                                             if int(cont) > 1 else " only"))
    return {"lines": lines, "memory": memory}


_LABELS = {"model", "architecture", "shape", "weights", "device", "data", "profile", "neuron_adjust", "prune",
           "key_space", "memory", "export", "push", "evaluate", "steps"}


def _load_config(recipe: Recipe):
    """config.json of a local directory, or of a Hub id from the local cache — never the network
    (``try_to_load_from_cache`` only looks on disk)."""
    from transformers import AutoConfig

    from editor.model.loading import load_config

    ref = model_source(recipe).ref
    if Path(ref).exists():
        return load_config(recipe)
    hint = (f"a dry run reads only config.json and never downloads: point model: at a local directory holding it, "
            f"or fetch it first (hf download {recipe.model} config.json)")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(recipe.model, "config.json", revision=recipe.revision)
    except Exception:  # noqa: BLE001 - a malformed repo id, a missing cache...
        cached = None
    if not isinstance(cached, str):
        raise EditorError(f"model: {recipe.model!r} is neither a local directory nor in the Hub cache — {hint}")
    try:
        return AutoConfig.from_pretrained(Path(cached).parent, trust_remote_code=recipe.trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EditorError(f"model: cannot read the cached config of {recipe.model!r}: {first}") from None


def dry_run(recipe_path, *, model: str | None = None) -> str:
    """Validate ``recipe_path`` offline (config.json + data sets, no weights, nothing written)
    and return the printed plan. ``model`` overrides the recipe's ``model:`` (e.g. a local
    directory holding only the config.json of the Hub model)."""
    from editor.methods.neuron_adjust import selection_count
    from editor.model.arch import resolve_layer, spec_for

    path = Path(recipe_path)
    recipe = load_recipe(path)
    named = recipe.model
    if model is not None:
        local = Path(model).expanduser()
        recipe.model = str(local.resolve()) if local.exists() else str(model)
    config = _load_config(recipe)
    check_against_config(recipe, config)
    arch = spec_for(config)
    shape = model_shape(config)
    n_layers, d_ff = shape["layers"], shape["d_ff"]
    if n_layers <= 0 or d_ff <= 0:
        raise EditorError("model: config.json gives no layer count or intermediate size")
    total = n_layers * d_ff
    dtype = recipe_dtype(recipe, config)
    nbytes = _BYTES[dtype]
    params = parameter_count(config, arch.gated)

    profiled = recipe.profiled_sets() if hasattr(recipe, "profiled_sets") else list(recipe.data)
    sets = {n: check_set(recipe, n) for n in recipe.data}

    L: list[str] = []

    def add(line: str) -> None:
        # labels are padded to one column: "label  text"
        m = re.match(r"^([a-z_]+) {1,}(.*)$", line)
        if m and not line.startswith(" ") and m.group(1) in _LABELS:
            line = f"{m.group(1):<14}{m.group(2)}"
        elif line.startswith(" " * 13) and not line.startswith(" " * 14):
            line = " " + line
        L.append(line)

    add(f"dry run of {path} — nothing loaded, nothing downloaded, nothing written")
    add("")
    add(f"model        {named}" + (f" @ {recipe.revision}" if recipe.revision else ""))
    src = model_source(recipe)
    add(f"             config.json from {src.ref}" + (f" (GGUF file {src.gguf_file})" if src.gguf_file else ""))
    mlp = f"{arch.pre}" + (f" (gated × {arch.up})" if arch.up else (" (fused gate|up)" if arch.fused else "")) + f" → {arch.act} → {arch.down}"
    add(f"architecture {config.model_type} (supported): layers {arch.layers}; neurons: {mlp}")
    add(f"shape        {n_layers} layers × d_ff {d_ff} = {total} FFL neurons; hidden {shape['hidden']}, "
        f"{shape['heads']} heads ({shape['kv_heads']} kv), vocab {shape['vocab']}")
    count = f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.2f} M"
    add(f"weights      ≈ {count} parameters; {dtype} → {human_bytes(params * nbytes)} "
        f"(+ activations and KV cache)")
    if recipe.device == "auto":
        add("device       auto: one CUDA GPU when the weights fit (device_map='auto' over several GPUs otherwise), else CPU")
    else:
        add(f"device       {recipe.device}")
    add("")
    add(f"data         {len(recipe.data)} set(s); profiled: {', '.join(profiled) or '-'}")
    notes: list[str] = []
    for n, info in sets.items():
        texts = info.get("texts")
        count = f"{texts} texts" if texts is not None else "texts counted at run time"
        lim = f", limit {info['limit']}" if info.get("limit") else ""
        rows = f" of {info['rows']} rows" if info.get("rows") else ""
        add(f"  {n}: {info['source']}, split {info['split']}{lim} → {count}{rows}")
        tpl = info["template"]
        short = tpl if len(tpl) <= 70 else tpl[:40] + f"… ({len(tpl)} chars) …" + tpl[-20:]
        add(f"      template {json.dumps(short, ensure_ascii=False)}; {info['checked']}")
        if info.get("note") and info["note"] not in notes:
            notes.append(info["note"])
    for note in notes:
        add(f"  note: {note}")
    p = recipe.profile
    add("")
    add(f"profile      batch_size {p.batch_size}, max_length {p.max_length} tokens (longer texts are cut; the KSD key is then "
        f"the last kept token), padding {p.padding_side or 'the tokenizer default'}")

    stats_sets = len(profiled)
    if recipe.neuron_adjust:
        na = recipe.neuron_adjust
        n_sel = selection_count(na.top_percent, total)
        add(f"neuron_adjust forget {na.forget!r} vs retain {', '.join(repr(r) for r in na.retain_sets)}: "
            f"top {na.top_percent:g} % of {total} neurons → {n_sel} neurons (score {na.score}, mode {na.mode}, seed {na.seed})")
    if recipe.prune:
        pr = recipe.prune
        n_sel = selection_count(pr.top_percent, total)
        add(f"prune        forget {pr.forget!r} vs retain {', '.join(repr(r) for r in pr.retain_sets)}: "
            f"top {pr.top_percent:g} % of {total} neurons → {n_sel} neurons zeroed (plain checkpoint)")
    calibration = None
    if recipe.key_space:
        ks = recipe.key_space
        extra = ""
        if recipe.neuron_adjust:
            stats_sets += 1
            extra = f"; keys profiled again with Neuron Adjust active ({ks.forget}@neuron_adjust)"
        if ks.calibrated:
            calibration = calibration_plan(recipe, sets, n_layers, d_ff)
            for line in calibration["lines"]:
                add(line)
            if extra:
                add(f"             {extra[2:]}; the calibration's keys are collected with it active too")
        else:
            ksd_layer = resolve_layer(ks.layer, n_layers, "key_space.layer")
            add(f"key_space    forget {ks.forget!r}: layer {ks.layer} → {ksd_layer} (of 0..{n_layers - 1}), key = last real token's "
                f"down-projection input ({d_ff} dims), scale α = {ks.scale:g}{extra}")
            if ks.retain_sets:
                add(f"             calibrate: false — the retain sets {', '.join(repr(r) for r in ks.retain_sets)} "
                    f"choose nothing; the recipe's layer and scale are used")
        check = getattr(ks, "check", None)
        add(f"             refusal {json.dumps(ks.refusal, ensure_ascii=False)}"
            + (f"; check {check}" if check and check != "every_call" else ""))

    # memory: Moments per layer and kind = count + mean/M2 float64 + min/max float32 = 24 B/neuron
    acc = stats_sets * n_layers * 2 * d_ff * 24
    file_bytes = stats_sets * n_layers * 2 * (4 * d_ff * 4 + 8)
    transient = p.batch_size * p.max_length * d_ff * 8
    add("")
    add(f"memory       statistics: {stats_sets} set(s) × {n_layers} layers × 2 (pre, key) × {d_ff} neurons "
        f"→ {human_bytes(acc)} of accumulators; stats.safetensors ≈ {human_bytes(file_bytes)}")
    add(f"             profiler transient ≤ batch {p.batch_size} × {p.max_length} tokens × {d_ff} × 8 B = {human_bytes(transient)} "
        f"(float64 moments of one layer at a time)")
    added = 0
    if recipe.neuron_adjust:
        n_sel = selection_count(recipe.neuron_adjust.top_percent, total)
        added += n_sel * 5 * 4 + n_layers * d_ff * 8  # a, b, c, slope, offset + inverse permutations
    if recipe.key_space and recipe.key_space.detector == "linear":
        added += n_layers * d_ff * 4 + 4 * n_layers  # a weight per layer (+ the bias)
    elif recipe.key_space:
        added += (2 if calibration is not None else 1) * 2 * d_ff * 4  # lower + upper; calibration may pick 2 layers
    if added:
        add(f"             checkpoint: the base weights ({human_bytes(params * nbytes)}) + {human_bytes(added)} of edit tensors")
    if calibration is not None:
        add(f"             calibration: {calibration['memory']}")
    add("")
    e = recipe.export
    out = recipe.out_dir() if hasattr(recipe, "out_dir") else recipe.resolve(e.out)
    add(f"export       {', '.join(e.formats)} → {Path(out).resolve()}")
    if recipe.push:
        add(f"push         {recipe.push.repo_id} ({'private' if recipe.push.private else 'public'})")
    if recipe.evaluate:
        add(f"evaluate     scorecard on {recipe.evaluate.data!r} before and after")
    steps = [f"profile {', '.join(profiled)}"]
    if recipe.neuron_adjust and recipe.key_space:
        steps.append(f"profile {recipe.key_space.forget} again with Neuron Adjust on")
    if calibration is not None:
        ks = recipe.key_space
        negatives = list(ks.retain_sets) + ([] if ks.background == "none" else ["background"])
        steps.append(f"calibrate key_space ({ks.forget} vs {', '.join(negatives)}, {ks.folds}-fold CV)")
    steps += ["plan (" + ", ".join(recipe.methods) + ")", "patch", f"export {', '.join(e.formats)}"]
    add("steps        " + " → ".join(steps))
    return "\n".join(L) + "\n"
