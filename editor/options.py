"""Every command's options as one typed model (mergekit's ``MergeOptions`` pattern): ``editor.cli``
makes the click options from the fields — name, type, range, default and help (the field's
description) —, so no default is written twice; where the recipe has the same setting, the field
is the recipe model's own (``same``: its default and description). Light: no torch, no transformers.
"""

from __future__ import annotations

import copy
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

from editor.manifest import DEFAULT_SHARD
from editor.recipe import EvaluateSpec, ExportSpec, PushSpec, Recipe

PositiveInt = Annotated[int, Field(ge=1)]


def same(model: type[BaseModel], name: str, **change) -> FieldInfo:
    """The field ``name`` of a recipe model (default, description), for an option that sets the same thing."""
    field = copy.deepcopy(model.model_fields[name])
    for k, v in change.items():
        setattr(field, k, v)
    return field


def path(**kw) -> dict:
    """``json_schema_extra`` of a path option: click.Path's checks (exists, file_okay, dir_okay)."""
    return {"path": kw}


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class LongOptions(Options):
    """The long commands' (run, profile, export, eval) common options."""

    quiet: bool = Field(False, description="no progress bars")
    threads: PositiveInt | None = Field(
        None, description="CPU threads for torch (default: the usable cores the machine's load leaves free, or "
                          "OMP_NUM_THREADS; results can differ in the last bits between counts: pin it to rerun byte-identically)")


class ProfileOptions(LongOptions):
    out: str = Field(description="directory for stats.safetensors", json_schema_extra=path(file_okay=False))
    overwrite: bool = Field(False, description="replace an existing stats.safetensors")


class RunOptions(LongOptions):
    out: str | None = Field(None, description="checkpoint directory (default: the recipe's export.out)",
                            json_schema_extra=path(file_okay=False))
    overwrite: bool = Field(False, description="replace a non-empty destination")
    dry_run: bool = Field(False, description="validate against config.json and the data, print the plan; load no weights, "
                                             "write nothing")


Format = Literal["hf", "onnx"]


class ExportOptions(LongOptions):
    stats: str = Field(description="directory with stats.safetensors (from `profile`) or the file",
                       json_schema_extra=path(exists=True))
    out: str | None = Field(None, description="checkpoint directory (default: the recipe's export.out)",
                            json_schema_extra=path(file_okay=False))
    format: Format = Field(ExportSpec.model_fields["formats"].default[0], description="checkpoint format")
    max_shard_size: str = Field(DEFAULT_SHARD, description="largest safetensors shard (hf)")
    overwrite: bool = Field(False, description="replace a non-empty destination")


class EvalOptions(LongOptions):
    data: str | None = Field(None, description="JSONL records with prompt, answer, skill (or --benchmark)",
                             json_schema_extra=path(exists=True, dir_okay=False))
    benchmark: str | None = Field(None, description="the paper's benchmarks through lm-evaluation-harness instead of --data, "
                                                    "comma-separated: gsm8k, mbpp, mmlu, mlqa-LANG (pip install "
                                                    "'skill-editor[lmeval]')")
    benchmark_data: str | None = Field(None, description="read each benchmark's test records from DIR/<benchmark>.jsonl "
                                                         "instead of the Hub", json_schema_extra=path(exists=True, file_okay=False))
    paper: str | None = Field(None, description="the paper's cell to print beside the benchmark report, "
                                                "MODEL:FORGET:METHOD (e.g. llama-3-8b:gsm8k:na)")
    confirm_run_unsafe_code: bool = Field(False, description="let code benchmarks (mbpp) run the programs the model writes")
    format: Literal["auto", "raw", "chat", "both"] = same(
        Recipe, "format", description="the form the --data prompts and the ordinary prompts reach the model in: raw, chat "
                                      "(the tokenizer's chat template) or both; auto: both when the tokenizer has a chat "
                                      "template — the form users ask an instruct model in")
    attacks: str | None = same(EvaluateSpec, "attacks", description="a skill of --data: its requests wrapped in the shipped "
                                                                    "attack suite, the share refused per attack family")
    base: str | None = Field(None, description="base model dir (only for plain checkpoints)",
                             json_schema_extra=path(exists=True, file_okay=False))
    out: str | None = Field(None, description="write the scorecard JSON here", json_schema_extra=path(dir_okay=False))
    batch_size: PositiveInt = same(EvaluateSpec, "batch_size")
    max_new_tokens: PositiveInt | None = same(EvaluateSpec, "max_new_tokens")
    limit: PositiveInt | None = Field(None, description="score only the first N records (per benchmark task)")
    ordinary: str = same(EvaluateSpec, "ordinary",
                         description="ordinary prompts whose refusals the scorecard reports: 'default' (the shipped held-out "
                                     "part), 'none', or a JSONL file of records with 'text' (and optionally 'category')")
    ordinary_new_tokens: PositiveInt = same(EvaluateSpec, "ordinary_new_tokens")
    trust_remote_code: bool = Field(
        False, description="run code shipped with CHECKPOINT (or --base) when it differs from this tool's own runtime "
                           "(default: refuse; a checkpoint whose runtime is byte-identical is scored with the tool's own); "
                           "every file's sha256 is verified either way")


class RestoreOptions(Options):
    out: str = Field(description="directory for the base model", json_schema_extra=path(file_okay=False))
    overwrite: bool = Field(False, description="replace a non-empty destination")


class PushOptions(Options):
    repo_id: str = same(PushSpec, "repo_id", description="namespace/name on the Hub")
    public: bool = Field(not PushSpec.model_fields["private"].default,
                         description="make a new repository public (default: private; an existing one keeps its visibility)")
    revision: str | None = same(PushSpec, "revision", description="branch to push to (created if missing)")
    dry_run: bool = Field(False, description="verify and show the files, the model card and what the push would do; "
                                             "upload nothing")
