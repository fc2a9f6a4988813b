"""The typed recipe (DESIGN §5): one model drives the CLI, validation and the saved metadata.

Every rule that can be checked without weights or config is checked here, before anything is
loaded: unknown keys, types, ranges, names of data sets (the rules that need the model's
``config.json`` are ``editor.model.loading.check_against_config``'s). Errors are one line with the
field path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from editor.errors import EditorError

DTYPES = ("auto", "float32", "float16", "bfloat16")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class DataSetSpec(_Strict):
    """A named text set: a local file (jsonl/json/csv/parquet/txt) or a Hub dataset."""

    path: str = Field(description="local file (relative to the recipe) or a Hub dataset id")
    name: str | None = Field(None, description="Hub dataset configuration name")
    split: str = "train"
    revision: str | None = None
    text: str = Field("{text}", description="template over the record's fields, e.g. 'Q: {question}\\nA:'")
    where: dict[str, str | list[str]] | None = Field(None, description="keep records whose field equals / is in the value(s)")
    limit: Annotated[int, Field(gt=0)] | None = None

    @field_validator("text")
    @classmethod
    def _template(cls, v: str) -> str:
        from string import Formatter

        try:
            list(Formatter().parse(v))
        except ValueError as e:
            raise ValueError(f"bad template: {e}") from None
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


class Recipe(_Strict):
    model: str
    revision: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
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
            if self.key_space.calibrate and not self.key_space.retain_sets:
                raise ValueError("key_space.calibrate: calibration needs retain queries (key_space.retain)")
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
        if self.evaluate:
            need("evaluate.data", [self.evaluate.data])
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

    def model_ref(self) -> str:
        """A local directory (resolved against the recipe file) if it exists, else the Hub id."""
        local = self.resolve(self.model)
        return str(local) if local.exists() else self.model

    def out_dir(self) -> Path:
        """``export.out`` resolved against the recipe file, like every local path of a recipe."""
        return self.resolve(self.export.out).resolve()

    def profiled_sets(self) -> list[str]:
        """The sets the methods use (what ``profile`` streams); scorecard-only sets are skipped."""
        used = set()
        for spec in (self.neuron_adjust, self.prune):
            if spec:
                used.add(spec.forget)
                used.update(spec.retain_sets)
        if self.key_space:
            used.add(self.key_space.forget)
            used.update(self.key_space.retain_sets)
        eval_only = {self.evaluate.data} - used if self.evaluate else set()
        return [n for n in self.data if n not in eval_only]

    def to_metadata(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)


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
    except OSError as e:
        raise EditorError(f"cannot read recipe {path}: {e.strerror}") from None
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise EditorError(f"recipe {path}:{where} is not valid YAML") from None
    return parse_recipe(obj, base_dir=path.parent.resolve())
