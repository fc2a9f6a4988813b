"""What ``skill-editor run RECIPE --dry-run`` knows, offline — no weights, no network, nothing
written: the checks and the numbers (``estimate`` → ``DryRun``); ``editor.dryrun.render`` prints them.

What is checked:

* the recipe itself (``load_recipe``: keys, types, ranges, set names);
* the model's ``config.json`` (a local directory, or a Hub id already in the local cache):
  architecture supported (``editor.model.arch.spec_for``), layer indices (``check_against_config``);
* every data set: local files are read (jsonl / json / txt fully, csv / parquet by their header
  and metadata) and every template field and ``where`` key is checked on the records; Hub data
  sets are **not** fetched — their template fields, configuration and split are checked against
  a known schema for the paper's benchmarks (``KNOWN_DATASETS``: GSM8K, MBPP, MLQA, MMLU), any
  other Hub data set is listed as "checked at run time".

What is estimated: how many texts each set gives, the neurons Neuron Adjust / pruning selects
(n = max(1, round(p·N/100)) over N = layers × d_ff), the resolved KSD layer — or, for a calibrated
``key_space``, its settings —, and memory: weights in the recipe's dtype (from the config's shapes),
the statistics (O(layers × d_ff) per set), the profiler's per-batch transient, the calibration's
keys and what the edit adds to the checkpoint.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from editor.errors import EditorError
from editor.model.arch import ArchSpec, config_d_ff, config_layers
from editor.model.loading import ModelSource, check_against_config, model_source
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


def _first(c, *names, default=None):
    for n in names:
        v = getattr(c, n, None)
        if v is not None:
            return v
    return default


def model_shape(config) -> dict:
    """Layers, hidden size, d_ff, heads, vocab, tied embeddings — from the config only."""
    c = config.get_text_config()
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
    if spec.limit_each:
        return None
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
            texts = render(records, spec.text, name, origins) if spec.messages is None else [""] * len(records)
            if not texts:
                raise EditorError(f"data.{name}: the set is empty")
            if len(texts) < 2:
                raise EditorError(f"data.{name}: has {len(texts)} text(s); at least 2 are needed")
            info["texts"] = len(texts)
            info["checked"] = "read and rendered (fields ok)"
            info["longest_chars"] = max(len(t) for t in texts) if spec.messages is None else None
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
# the calibrated key_space
# ---------------------------------------------------------------------------------------------


@dataclass
class CalibrationEstimate:
    """What a dry run can say about a calibrated ``key_space`` (docs/GENERALIZATION.md §1): its
    settings as the stored choice must agree with them (``editor.methods.calibrate.calibration_config``)
    and the memory its keys take. The layer(s), dims and α are chosen at profile time, so the
    recipe's ``layer`` / ``scale`` are not the plan."""

    detector: str
    weights: str  # the linear detector's: signed | nonnegative
    retain: list[str]
    budget: float
    folds: int
    seed: int
    continuation_tokens: int
    background: str  # "default", "none" or "sets"
    background_sets: list[str]
    n_background: int | None  # the shipped ordinary prompts' calibration part (background: default)
    queries: int | None  # forget + retain + background queries, when every count is known
    forget: int | None  # the forget queries (every form), when known
    n_layers: int
    d_ff: int
    scales: tuple = ()

    @property
    def keys_bytes(self) -> int | None:
        """The keys held (float32, CPU): linear, one pooled key per query and layer; box, the prompt's
        key plus up to continuation_tokens − 1 generated tokens' keys per query and layer."""
        if self.queries is None:
            return None
        per_query = 1 if self.detector == "linear" else max(1, self.continuation_tokens)
        return self.queries * per_query * self.n_layers * self.d_ff * 4

    @property
    def fit_bytes(self) -> int | None:
        """linear, signed: the fit in kernel form (``calibrate_linear``) — the float64 Gram matrix of the
        queries, a fold's copy of it and its eigendecomposition (4 × queries² × 8 B), and one layer's
        standardized keys at a time (float64 and float32: queries × d_ff × 12 B). nonnegative: no Gram
        matrix; one layer's keys and its screening copy (queries × d_ff × 12 B), the fold's screened
        features (``MONOTONE_FEATURES`` of them: float32, a training copy and one layer's float64
        standardization, queries × k × 16 B) and the fold models' summed weights (float64, two
        copies)."""
        if self.queries is None:
            return None
        q = self.queries
        if self.weights == "nonnegative":
            from editor.methods.calibrate import MONOTONE_FEATURES

            k = min(MONOTONE_FEATURES, self.n_layers * self.d_ff)
            return q * self.d_ff * 12 + q * k * 16 + self.n_layers * self.d_ff * 16
        return 4 * q * q * 8 + q * self.d_ff * 12


def forms_of(fmt: str, chat: bool | None = None) -> int:
    """How many forms a set's format renders each text in (``auto``: both when the tokenizer has a
    chat template; ``chat`` None: not known without loading it — counted as both, an upper bound)."""
    if fmt == "auto":
        return 1 if chat is False else 2
    return 2 if fmt == "both" else 1


def has_chat_template(recipe: Recipe) -> bool | None:
    """Whether a local model directory's tokenizer has a chat template, from its files alone
    (``tokenizer_config.json``'s ``chat_template``, ``chat_template.jinja``); None when it cannot be
    told without loading the tokenizer (a Hub id, a GGUF file)."""
    import json

    if recipe.gguf_file is not None or recipe.model.lower().endswith(".gguf") or recipe.model.startswith("package:"):
        return None
    local = recipe.resolve(recipe.model)
    if not local.is_dir():
        return None
    if (local / "chat_template.jinja").exists() or (local / "chat_template.json").exists():
        return True
    try:
        return bool(json.loads((local / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return None


def calibration_estimate(recipe: Recipe, sets: dict[str, dict], n_layers: int, d_ff: int) -> CalibrationEstimate:
    """The calibrated ``key_space``'s settings and key memory (``sets``: ``check_set``'s findings)."""
    from editor.methods.calibrate import SCALES, calibration_config

    ks = recipe.key_space
    cfg = calibration_config(recipe)
    retain = list(cfg["retain"])
    chat = has_chat_template(recipe) if isinstance(recipe, Recipe) else False

    def texts(name: str) -> int | None:
        n = sets[name].get("texts") if name in sets else None
        return None if n is None else n * forms_of(recipe.set_format(name), chat)

    counts = [texts(n) for n in [ks.forget, *retain]]
    n_bg = None
    if ks.background == "default":
        from editor.ordinary import load as load_ordinary

        n_bg = len(load_ordinary("calibration"))
        counts.append(n_bg * forms_of(recipe.set_format(None), chat))
    elif ks.background != "none":
        counts += [texts(n) for n in ks.background_sets]
    queries = sum(int(c) for c in counts) if all(c is not None for c in counts) else None
    forget = counts[0]
    return CalibrationEstimate(
        detector=ks.detector, weights=ks.weights, retain=retain, budget=float(cfg["false_positive_budget"]), folds=int(cfg["folds"]),
        seed=cfg["seed"], continuation_tokens=int(cfg["continuation_tokens"]),
        background=ks.background if ks.background in ("default", "none") else "sets",
        background_sets=list(ks.background_sets), n_background=n_bg, queries=queries,
        forget=None if forget is None else int(forget), n_layers=n_layers, d_ff=d_ff,
        scales=tuple(SCALES))


# ---------------------------------------------------------------------------------------------
# the whole estimate
# ---------------------------------------------------------------------------------------------


@dataclass
class DryRun:
    """Everything a dry run found out about a recipe, for ``editor.dryrun.render``."""

    path: Path
    recipe: Recipe
    named_model: str  # the recipe's model: as written (before a ``model`` override)
    source: ModelSource
    model_type: str
    arch: ArchSpec
    shape: dict
    dtype: str
    params: int
    profiled: list[str]
    sets: dict[str, dict]  # check_set's findings per set
    stats_sets: int  # sets the statistics hold (the profiled ones + the NA-active pass)
    selected: dict[str, int] = field(default_factory=dict)  # neuron_adjust / prune: neurons selected
    ksd_layer: int | None = None  # a plain key_space's resolved layer
    calibration: CalibrationEstimate | None = None
    out: Path | None = None

    @property
    def neurons(self) -> int:
        return self.shape["layers"] * self.shape["d_ff"]

    @property
    def weight_bytes(self) -> int:
        return self.params * _BYTES[self.dtype]

    @property
    def accumulator_bytes(self) -> int:
        """Moments per layer and kind: count + mean/M2 float64 + min/max float32 = 24 B per neuron."""
        return self.stats_sets * self.shape["layers"] * 2 * self.shape["d_ff"] * 24

    @property
    def stats_file_bytes(self) -> int:
        return self.stats_sets * self.shape["layers"] * 2 * (4 * self.shape["d_ff"] * 4 + 8)

    @property
    def transient_bytes(self) -> int:
        """The profiler's float64 moments of one layer's batch at a time."""
        p = self.recipe.profile
        return p.batch_size * p.max_length * self.shape["d_ff"] * 8

    @property
    def shared_keys_bytes(self) -> int:
        """The forget queries' pooled keys that the profile pass collects for the linear detector
        (``Recipe.profile_collects_forget_keys``), float32: held from the profile stage to the fit."""
        c = self.calibration
        if c is None or c.forget is None or not self.recipe.profile_collects_forget_keys():
            return 0
        return c.forget * self.shape["layers"] * self.shape["d_ff"] * 4

    def _peak_terms(self) -> dict:
        c = self.calibration
        cal = (c.keys_bytes or 0) + (c.fit_bytes or 0) if c is not None and c.queries is not None else 0
        return dict(transient_bytes=self.transient_bytes, calibration_bytes=cal, shared_keys_bytes=self.shared_keys_bytes,
                    onnx="onnx" in self.recipe.export.formats)

    @property
    def peaks(self) -> dict[str, int]:
        """``stage_peaks`` of this recipe, each stage in its own process as ``profile`` and ``export``
        run it (host memory; on a GPU the weights and activations live there)."""
        return stage_peaks(self.weight_bytes, **self._peak_terms())

    @property
    def run_peaks(self) -> dict[str, int]:
        """``run_stage_peaks``: the same stages inside ``run``'s one process, after its base scorecard
        when the recipe has one, and the two scorecards themselves."""
        ev = self.recipe.evaluate
        if not ev:
            return run_stage_peaks(self.weight_bytes, scorecard=False, **self._peak_terms())
        b = _BYTES[self.dtype]
        generation = scorecard_batch_bytes(self.shape, b, ev.batch_size, generate=True)
        ks = self.recipe.key_space
        on_prompt = bool(ks) and ks.check == "prompt" and not self.recipe.neuron_adjust  # scorecard.decides_on_prompt
        if not on_prompt:
            edited = generation
        elif ks.detector == "linear":  # its decisions come from shared-prefix forwards (scorecard.pooled_guard_flags)
            edited = PREFIX_PASS[0] + PREFIX_PASS[1] * kv_cache_bytes(self.shape, b)
        else:
            edited = (min(GUARD_PASS[0], self.weight_bytes)
                      + GUARD_PASS[1] * scorecard_batch_bytes(self.shape, b, ev.batch_size, generate=False))
        return run_stage_peaks(self.weight_bytes, scorecard=True, generation_bytes=generation, edited_bytes=int(edited),
                               **self._peak_terms())

    @property
    def edit_bytes(self) -> int:
        """What the edit adds to the checkpoint: NA's a, b, c, slope, offset + the inverse permutations;
        the linear detector's weight per layer (+ the bias); a box's lower + upper (a calibration may
        pick 2 layers)."""
        n_layers, d_ff = self.shape["layers"], self.shape["d_ff"]
        added = 0
        if "neuron_adjust" in self.selected:
            added += self.selected["neuron_adjust"] * 5 * 4 + n_layers * d_ff * 8
        ks = self.recipe.key_space
        if ks and ks.detector == "linear":
            added += n_layers * d_ff * 4 + 4 * n_layers
        elif ks:
            added += (2 if self.calibration is not None else 1) * 2 * d_ff * 4
        return added


# Peak RSS per stage, W = the weights in the dtype they are loaded in (docs/SCALE.md, "Memory"): lines
# fitted on random Llamas of 58-374 M parameters (profile, export) and through the two real models'
# ONNX exports (the ONNX line); each stage in its own process, torch + transformers + the tool imported.
PROFILE_PEAK = (385 * 2**20, 1.18)  # the weights once, one batch's activations, the statistics
EXPORT_PEAK = (370 * 2**20, 1.03)  # the weights once; saving and hashing stream
ONNX_PEAK = (340 * 2**20, 2.5)  # PyTorch's weights, the exported initializers, ONNX Runtime's session


# Inside ``run``, after the base scorecard's generation, the profile peaks this much higher than in
# a fresh process: measured on both real models' shipped recipes (bench/stages.py: SmolLM2 +265 MiB,
# Qwen +243 MiB above this module's profile line with the shared forget keys) — what the generation
# leaves in the C heap, and the profile's batches then keep there. Not a fitted slope: two points; at
# most the weights' size (the testbed's 4 MiB model: +49 MiB above its line, within its ±25 % anyway).
AFTER_SCORECARD = 256 * 2**20


# The scorecards inside ``run`` (docs/SCALE.md, "Scorecards"). Their batches hold at most
# ``editor.heap.BATCH_TOKENS`` token positions, so what one batch holds is bounded by the model's shape
# alone (``scorecard_batch_bytes``). The base scorecard's generation peaks that much above the loaded
# model (``EXPORT_PEAK``'s line: SmolLM2 −9 %, Qwen −4 %, the testbed's demo +1 % of the measured peak);
# a guard deciding on the prompt (one forward per prompt, no cache) peaks above the level ``run`` holds
# after its fit by ``GUARD_PASS``: a constant (at most the weights' size, as ``AFTER_SCORECARD``) plus a
# factor on the batch's activations — the C heap keeps more than one batch's live tensors, more with
# two threads than with one. Read off the two real models' shipped runs (SmolLM2 +606 / +747 MiB at
# 1 / 2 threads on 168 MiB of activations, Qwen +1 059 MiB on 416 MiB, when their pooled linear guards
# still ran through that forward: before stop 31): two points, not a law. A pooled linear guard: ``PREFIX_PASS``.
# An edited model that generates (Neuron Adjust, ``check: every_call``) peaks like the base scorecard.
GUARD_PASS = (417 * 2**20, 1.54)
# A pooled linear guard's decisions come from shared-prefix forwards (``editor.profile.prefix``), which
# run the decoder stack only: what they hold is key/value caches — a group of prefixes' cache, the copy
# of its rows that a batch of members continues and that copy grown by the members' own tokens, each at
# most ``BATCH_TOKENS`` positions (``kv_cache_bytes``) — and one layer's activations at a time. Their
# peak above the level ``run`` holds after its fit: a constant plus a factor on one such cache, read off
# the two real models' shipped runs (AMD EPYC, stop 31: SmolLM2 +770 / +800 MiB at 1 / 2 threads on a
# 180 MiB cache, Qwen +335 MiB on 96 MiB — the C heap keeps freed caches' blocks): two points, not a law.
PREFIX_PASS = (64 * 2**20, 4)


def kv_cache_bytes(shape: dict, dtype_bytes: int) -> int:
    """Every layer's keys and values of ``BATCH_TOKENS`` token positions."""
    from editor.heap import BATCH_TOKENS

    return BATCH_TOKENS * shape["layers"] * 2 * shape["kv_heads"] * shape["head_dim"] * dtype_bytes


def scorecard_batch_bytes(shape: dict, dtype_bytes: int, batch_size: int, *, generate: bool) -> int:
    """One scorecard batch at its cap of ``BATCH_TOKENS`` positions: a layer's activations per position
    (the MLP's gate, up, activation and product: 4 × d_ff; the hidden state, its float32 norm and the
    attention's q, k, v and output: ~8 × hidden) and, when it generates, every layer's KV cache of those
    positions and the float32 logits of each row's last position (twice: the logits and their copy)."""
    from editor.heap import BATCH_TOKENS

    act = BATCH_TOKENS * (4 * shape["d_ff"] + 8 * shape["hidden"]) * dtype_bytes
    if not generate:
        return act
    return act + kv_cache_bytes(shape, dtype_bytes) + batch_size * shape["vocab"] * 4 * 2


def stage_peaks(weight_bytes: int, *, transient_bytes: int = 0, calibration_bytes: int = 0,
                shared_keys_bytes: int = 0, onnx: bool = False) -> dict[str, int]:
    """Estimated peak RSS (bytes) of each stage on the CPU, each in its own process: ``profile``
    (plus the profiler's float64 transient and the forget keys its pass collects,
    ``shared_keys_bytes``), ``calibration`` (the profile's peak + the keys and the fit it holds; the
    shared keys are among the keys), ``export`` (HF) and, when asked, ``export onnx`` (export + ONNX
    Runtime validation)."""
    profile = PROFILE_PEAK[0] + PROFILE_PEAK[1] * weight_bytes + transient_bytes + shared_keys_bytes
    out = {"profile": int(profile)}
    if calibration_bytes:
        out["calibration"] = int(profile - shared_keys_bytes + calibration_bytes)
    out["export"] = int(EXPORT_PEAK[0] + EXPORT_PEAK[1] * weight_bytes)
    if onnx:
        out["export onnx"] = int(ONNX_PEAK[0] + ONNX_PEAK[1] * weight_bytes)
    return out


def run_stage_peaks(weight_bytes: int, *, scorecard: bool, transient_bytes: int = 0, calibration_bytes: int = 0,
                    shared_keys_bytes: int = 0, onnx: bool = False, generation_bytes: int = 0,
                    edited_bytes: int = 0) -> dict[str, int]:
    """``stage_peaks`` inside ``run``: one process, the weights loaded once, the stages in ``run``'s
    order. The base scorecard peaks ``generation_bytes`` above the loaded model (the export line).
    After it the profile starts ``AFTER_SCORECARD`` higher (at most the weights' size) and the
    calibration with it; nothing the profile took is handed back before the export but the forget
    keys (freed after the fit), so the export peaks at the profile's level less those keys, or at its
    own line when that is higher (a model with little else to hold); the edited scorecard runs at that
    level and peaks ``edited_bytes`` above it; the ONNX export adds to the export what it adds to an
    HF export."""
    alone = stage_peaks(weight_bytes, transient_bytes=transient_bytes, calibration_bytes=calibration_bytes,
                        shared_keys_bytes=shared_keys_bytes, onnx=onnx)
    lift = min(AFTER_SCORECARD, weight_bytes) if scorecard else 0
    out = {"base scorecard": alone["export"] + generation_bytes} if scorecard else {}
    out["profile"] = alone["profile"] + lift
    if "calibration" in alone:
        out["calibration"] = alone["calibration"] + lift
    level = max(alone["export"], out["profile"] - shared_keys_bytes)
    if scorecard:
        out["edited scorecard"] = level + edited_bytes
    out["export"] = level
    if onnx:
        out["export onnx"] = out["export"] + alone["export onnx"] - alone["export"]
    return out


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


def estimate(recipe_path, *, model: str | None = None) -> DryRun:
    """Validate ``recipe_path`` offline (config.json + data sets) and estimate the run. ``model``
    overrides the recipe's ``model:`` (e.g. a local directory holding only the config.json of the
    Hub model)."""
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
    profiled = recipe.profiled_sets()
    sets = {n: check_set(recipe, n) for n in recipe.data}
    plan = DryRun(path=path, recipe=recipe, named_model=named, source=model_source(recipe), model_type=config.model_type,
                  arch=arch, shape=shape, dtype=recipe_dtype(recipe, config), params=parameter_count(config, arch.gated),
                  profiled=profiled, sets=sets, stats_sets=len(profiled), out=recipe.out_dir())
    for name in ("neuron_adjust", "prune"):
        spec = getattr(recipe, name)
        if spec is not None:
            plan.selected[name] = selection_count(spec.top_percent, n_layers * d_ff)
    ks = recipe.key_space
    if ks:
        if recipe.neuron_adjust:
            plan.stats_sets += 1  # the KSD forget set profiled again with NA active
        if ks.calibrated:
            plan.calibration = calibration_estimate(recipe, sets, n_layers, d_ff)
        else:
            plan.ksd_layer = resolve_layer(ks.layer, n_layers, "key_space.layer")
    return plan
