"""The ``skill-editor`` command line (click). Each command is a thin layer over ``editor.pipeline``
(run, profile, export) or one stage's module (eval, inspect, restore, push, lm-eval-command); every
user error becomes one line on stderr: exit 1 for a checkpoint that fails verification, 2 for any
other error (click's usage errors included).

Each command's options are one model of ``editor.options`` (``options``: the click options made
from its fields). What can be checked without torch (the options, the recipe file) is checked
before torch and transformers are imported: a bad call answers in a fraction of a second."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import types
import typing
from typing import Literal

import click
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from editor import __version__
from editor.errors import EditorError, VerificationError
from editor.options import (EvalOptions, ExportOptions, LongOptions, ProfileOptions, PushOptions, RestoreOptions,
                            RunOptions)
from editor.eval.lmeval import PAPER_TASKS
from editor.recipe import Dtype


def _libraries(bars: bool) -> None:
    """transformers' warnings off; its (and huggingface_hub's) progress bars on or off. Imports
    transformers: called where a command's heavy work begins, never before its validation."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if bars:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


def begin(opts: LongOptions | None = None) -> None:
    """The heavy part of a command starts: a long command's thread count (``editor.threads``: by
    default the usable cores the machine's load leaves free) and the libraries' progress bars
    (weights loaded and written: shown next to the tool's own unless ``--quiet``)."""
    if opts is not None:
        from editor.threads import set_threads

        set_threads(opts.threads)
    _libraries(bars=opts is not None and not opts.quiet)


def single_process(name: str) -> None:
    """Only ``profile`` is data-parallel; other commands under torchrun would run once per rank."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise EditorError(f"`{name}` runs in one process; under torchrun only `profile` is distributed (then `export --stats`)")


def load_recipe_first(path: str):
    """The recipe file, validated (``editor.recipe``: no torch) before anything heavy is imported."""
    from editor.recipe import load_recipe

    return load_recipe(path)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that ``finally`` blocks run (temporary directories
    are removed, locks released) before the process exits; not an ``Exception``, so no
    ``except Exception`` swallows it."""


def _terminate(signum, frame):
    raise Terminated()


def friendly(fn):
    """Turn EditorError into one line + exit 2 (``VerificationError``: exit 1); SIGTERM and Ctrl-C
    unwind the command (its cleanup runs) and exit 143 / 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            previous = signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread: leave signals alone
            previous = None
        try:
            return fn(*args, **kwargs)
        except EditorError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1 if isinstance(e, VerificationError) else 2)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except Terminated:
            click.echo("error: terminated", err=True)
            sys.exit(143)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


# ---------------------------------------------------------------------------------------------
# click options from an options model (mergekit's add_merge_options)
# ---------------------------------------------------------------------------------------------


def _click_type(field: FieldInfo, annotation):
    """The click type of a field: a flag, a choice (Literal), an int range (ge / gt), a path."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = args[0]
    metadata = list(field.metadata)
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *more = typing.get_args(annotation)
        for m in more:
            metadata += list(getattr(m, "metadata", [m]))
    if typing.get_origin(annotation) is Literal:
        return click.Choice(list(typing.get_args(annotation)))
    if annotation is int:
        low = [getattr(m, "ge", None) for m in metadata if getattr(m, "ge", None) is not None]
        low += [getattr(m, "gt") + 1 for m in metadata if getattr(m, "gt", None) is not None]
        return click.IntRange(min=max(low)) if low else click.INT
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "path" in extra:
        return click.Path(**extra["path"])
    return click.STRING


def options(model: type[BaseModel]):
    """The fields of ``model`` as click options (``--batch-size`` for ``batch_size``; help: the field's
    description; default: the field's, shown), collected into one ``opts`` instance of the model."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            values = {name: kwargs.pop(name) for name in model.model_fields if name in kwargs}
            try:
                opts = model(**values)
            except ValidationError as e:  # click's types checked the values already: a rule of the model
                err = e.errors()[0]
                raise click.BadParameter(err["msg"], param_hint=f"--{str(err['loc'][0]).replace('_', '-')}") from None
            return fn(*args, opts=opts, **kwargs)

        fields = sorted(model.model_fields.items(), key=lambda kv: kv[0] in LongOptions.model_fields)  # the common ones last
        for name, field in reversed(fields):
            decl = f"--{name.replace('_', '-')}"
            if field.annotation is bool:
                wrapper = click.option(decl, name, is_flag=True, help=field.description)(wrapper)
                continue
            kw = (dict(required=True) if field.is_required()
                  else dict(default=field.default, show_default=field.default is not None))
            wrapper = click.option(decl, name, type=_click_type(field, field.annotation), help=field.description,
                                   **kw)(wrapper)
        return wrapper

    return decorate


class OneLineGroup(click.Group):
    """click's usage errors (a missing or invalid option, a directory as the recipe, an unknown
    command) as one line ``error: ...`` on stderr, exit 2 — not the usage block; ``--help`` as ever."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(2)
        except click.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="skill-editor")
def main() -> None:
    """Remove one skill from a Hugging Face causal LM (Neuron Adjust, Key Space Detection) and
    export a self-contained checkpoint."""


RECIPE = click.argument("recipe", type=click.Path(dir_okay=False))
CHECKPOINT = click.argument("checkpoint", type=click.Path(file_okay=False, exists=True))


@main.command("profile")
@RECIPE
@options(ProfileOptions)
@friendly
def profile_cmd(recipe: str, opts: ProfileOptions) -> None:
    """Profile every named data set of RECIPE; writes OUT/stats.safetensors."""
    load_recipe_first(recipe)
    begin(opts)
    from editor.pipeline import profile_recipe

    path = profile_recipe(recipe, opts.out, overwrite=opts.overwrite, progress=not opts.quiet)
    click.echo(f"wrote {path}")


@main.command("run")
@RECIPE
@options(RunOptions)
@friendly
def run_cmd(recipe: str, opts: RunOptions) -> None:
    """The whole job on RECIPE: profile, edit, export, scorecard."""
    single_process("run")
    load_recipe_first(recipe)
    begin(opts)
    if opts.dry_run:
        from editor.dryrun import dry_run as plan

        click.echo(plan(recipe), nl=False)
        return
    from editor.pipeline import run_recipe

    summary = run_recipe(recipe, opts.out, overwrite=opts.overwrite, progress=not opts.quiet, echo=click.echo)
    for fmt, path in summary["out"].items():
        click.echo(f"exported {fmt}: {path}")


@main.command("eval")
@CHECKPOINT
@options(EvalOptions)
@friendly
def eval_cmd(checkpoint: str, opts: EvalOptions) -> None:
    """Forget/retain scorecard of CHECKPOINT, before vs after: exact match, abstention, relative drop,
    in raw and chat form; the share of ordinary and near-neighbour prompts it refuses, and with
    --attacks the share of attacked requests. With --benchmark, the paper's benchmarks instead: after /
    before per benchmark (a refused question counts wrong). Verifies every file's sha256 first (as
    inspect); runs no code shipped with the checkpoint unless --trust-remote-code."""
    from editor.io import atomic_write_json, check_file_destination

    if (opts.data is None) == (opts.benchmark is None):
        raise EditorError("eval: give --data or --benchmark (one of them)")
    if opts.out:
        check_file_destination(opts.out)
    begin(opts)
    if opts.benchmark is not None:
        from editor.eval.lmeval import evaluate_benchmarks, render_benchmarks

        card = evaluate_benchmarks(checkpoint, opts.benchmark, base=opts.base, trust_remote_code=opts.trust_remote_code,
                                   limit=opts.limit, batch_size=opts.batch_size, data_dir=opts.benchmark_data,
                                   unsafe_code=opts.confirm_run_unsafe_code, paper=opts.paper)
        click.echo(render_benchmarks(card))
    else:
        from editor.eval.scorecard import evaluate_checkpoint, render_scorecard

        card = evaluate_checkpoint(checkpoint, opts.data, base=opts.base, batch_size=opts.batch_size,
                                   max_new_tokens=opts.max_new_tokens, limit=opts.limit, ordinary=opts.ordinary,
                                   ordinary_new_tokens=opts.ordinary_new_tokens, trust_remote_code=opts.trust_remote_code,
                                   progress=not opts.quiet, format=opts.format, attacks=opts.attacks)
        click.echo(render_scorecard(card))
    if opts.out:
        atomic_write_json(opts.out, card)
        click.echo(f"wrote {opts.out}")


@main.command("export")
@RECIPE
@options(ExportOptions)
@friendly
def export_cmd(recipe: str, opts: ExportOptions) -> None:
    """Plan the edit of RECIPE from profiled statistics, patch the model and export a checkpoint."""
    single_process("export")
    load_recipe_first(recipe)
    begin(opts)
    from editor.pipeline import export_recipe

    path = export_recipe(recipe, opts.stats, opts.out, fmt=opts.format, overwrite=opts.overwrite,
                         max_shard_size=opts.max_shard_size)
    click.echo(f"exported {opts.format}: {path}")


@main.command("inspect")
@CHECKPOINT
@friendly
def inspect_cmd(checkpoint: str) -> None:
    """What CHECKPOINT edits (methods, layers, neurons, KSD), its provenance, and the sha256 of
    every file; exit 1 with one line per problem when anything is missing or changed. CHECKPOINT is
    an HF checkpoint or an ONNX export directory (model.onnx + external data)."""
    begin()
    from editor.checkpoint import describe, verify

    rep = verify(checkpoint)
    click.echo(describe(rep))
    if not rep.ok:
        for p in rep.problems:
            click.echo(f"error: {p}", err=True)
        sys.exit(1)


@main.command("restore")
@CHECKPOINT
@options(RestoreOptions)
@friendly
def restore_cmd(checkpoint: str, opts: RestoreOptions) -> None:
    """Write the exact base model of CHECKPOINT (neurons un-permuted, patch dropped) to OUT."""
    from editor.io import check_destination

    check_destination(opts.out, opts.overwrite)
    begin()
    from editor.checkpoint import restore

    path = restore(checkpoint, opts.out, overwrite=opts.overwrite)
    click.echo(f"restored base model: {path}")


@main.command("push")
@CHECKPOINT
@options(PushOptions)
@friendly
def push_cmd(checkpoint: str, opts: PushOptions) -> None:
    """Verify CHECKPOINT and upload it to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`).

    The repository (its revision) is made to mirror CHECKPOINT: files in it that are not in
    CHECKPOINT — stale shards of an earlier push, files added by hand — are DELETED in the same
    commit (.gitattributes is kept) and listed in the output. The visibility printed is the Hub's."""
    begin()
    from editor.hub import push

    push(checkpoint, opts.repo_id, private=not opts.public, revision=opts.revision, dry_run=opts.dry_run, echo=click.echo)


@main.command("lm-eval-command")
@click.argument("checkpoint")
@click.option("--tasks", default=",".join(PAPER_TASKS), show_default=True, help="comma-separated lm-eval task names")
@click.option("--batch-size", default="8", show_default=True, help="a positive integer, 'auto' or 'auto:N'")
@click.option("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the harness's own)")
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(typing.get_args(Dtype)))
@click.option("--num-fewshot", default=None, type=click.IntRange(min=0), help="override the tasks' few-shot count")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="only the first N examples per task")
@click.option("--output-path", default=None, help="where lm_eval writes its results")
@click.option("--log-samples", is_flag=True, help="also write every sample (needs --output-path)")
@friendly
def lm_eval_command_cmd(checkpoint, tasks, batch_size, device, dtype, num_fewshot, limit, output_path, log_samples) -> None:
    """Print the lm-evaluation-harness command that scores CHECKPOINT (an exported directory or a
    Hub repo id). Nothing is run (`eval --benchmark` scores in process)."""
    from editor.eval.lmeval import lm_eval_command

    cmd = lm_eval_command(checkpoint, tasks, batch_size=batch_size, device=device, dtype=dtype, num_fewshot=num_fewshot,
                          limit=limit, output_path=output_path, log_samples=log_samples)
    click.echo(cmd.shell())
