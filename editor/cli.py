"""The ``skill-editor`` command line (click). Each command is a thin layer over ``editor.pipeline``
(run, profile, export) or one stage's module (eval, inspect, restore, push, lm-eval-command); every
user error becomes one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from typing import get_args

import click

from editor import __version__
from editor.errors import EditorError
from editor.eval.lmeval import PAPER_TASKS
from editor.recipe import Dtype


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


def single_process(name: str) -> None:
    """Only ``profile`` is data-parallel; other commands under torchrun would run once per rank."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise EditorError(f"`{name}` runs in one process; under torchrun only `profile` is distributed (then `export --stats`)")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that ``finally`` blocks run (temporary directories
    are removed, locks released) before the process exits; not an ``Exception``, so no
    ``except Exception`` swallows it."""


def _terminate(signum, frame):
    raise Terminated()


def friendly(fn):
    """Turn EditorError (and a few library errors) into one line + exit 2; SIGTERM and Ctrl-C
    unwind the command (its cleanup runs) and exit 143 / 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        try:
            previous = signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread: leave signals alone
            previous = None
        try:
            return fn(*args, **kwargs)
        except EditorError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
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


def long_command(fn):
    """``--quiet`` and ``--threads N`` of the long commands (run, profile, export, eval). Goes under
    ``@friendly``: the thread count (``editor.threads``: by default the usable cores the machine's
    load leaves free) is set before the command's work, and without ``--quiet`` the libraries'
    progress bars (weights loaded and written) show next to the tool's own."""

    @click.option("--quiet", is_flag=True, help="no progress bars")
    @click.option("--threads", type=click.IntRange(min=1), default=None,
                  help="CPU threads for torch (default: the usable cores the machine's load leaves free, or "
                       "OMP_NUM_THREADS; results can differ in the last bits between counts: pin it to rerun byte-identically)")
    @functools.wraps(fn)
    def wrapper(*args, threads: int | None = None, **kwargs):
        from editor.threads import set_threads

        set_threads(threads)
        if not kwargs.get("quiet"):
            try:
                from transformers.utils import logging as hf_logging

                hf_logging.enable_progress_bar()
            except Exception:  # noqa: BLE001
                pass
        return fn(*args, **kwargs)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="skill-editor")
def main() -> None:
    """Remove one skill from a Hugging Face causal LM (Neuron Adjust, Key Space Detection) and
    export a self-contained checkpoint."""


@main.command("profile")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="directory for stats.safetensors")
@click.option("--overwrite", is_flag=True, help="replace an existing stats.safetensors")
@friendly
@long_command
def profile_cmd(recipe: str, out: str, overwrite: bool, quiet: bool) -> None:
    """Profile every named data set of RECIPE; writes OUT/stats.safetensors."""
    from editor.pipeline import profile_recipe

    path = profile_recipe(recipe, out, overwrite=overwrite, progress=not quiet)
    click.echo(f"wrote {path}")


@main.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", "out", type=click.Path(file_okay=False), default=None, help="checkpoint directory (default: the recipe's export.out)")
@click.option("--overwrite", is_flag=True, help="replace a non-empty destination")
@click.option("--dry-run", is_flag=True, help="validate against config.json and the data, print the plan; load no weights, write nothing")
@friendly
@long_command
def run_cmd(recipe: str, out: str | None, overwrite: bool, quiet: bool, dry_run: bool) -> None:
    """The whole job on RECIPE: profile, edit, export, scorecard."""
    from editor.pipeline import run_recipe

    single_process("run")
    if dry_run:
        from editor.dryrun import dry_run as plan

        click.echo(plan(recipe), nl=False)
        return

    summary = run_recipe(recipe, out, overwrite=overwrite, progress=not quiet, echo=click.echo)
    for fmt, path in summary["out"].items():
        click.echo(f"exported {fmt}: {path}")


@main.command("eval")
@click.argument("checkpoint", type=click.Path(file_okay=False, exists=True))
@click.option("--data", default=None, type=click.Path(dir_okay=False), help="JSONL records with prompt, answer, skill")
@click.option("--benchmark", default=None,
              help="the paper's benchmarks through lm-evaluation-harness instead of --data, comma-separated: "
                   "gsm8k, mbpp, mmlu, mlqa-LANG (pip install 'skill-editor[lmeval]')")
@click.option("--benchmark-data", default=None, type=click.Path(file_okay=False, exists=True),
              help="read each benchmark's test records from DIR/<benchmark>.jsonl instead of the Hub")
@click.option("--paper", default=None, help="the paper's cell to print beside the report, MODEL:FORGET:METHOD (e.g. llama-3-8b:gsm8k:na)")
@click.option("--confirm-run-unsafe-code", is_flag=True, help="let code benchmarks (mbpp) run the programs the model writes")
@click.option("--base", default=None, type=click.Path(file_okay=False), help="base model dir (only for plain checkpoints)")
@click.option("--out", "out", default=None, type=click.Path(dir_okay=False), help="write the scorecard JSON here")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--max-new-tokens", default=None, type=click.IntRange(min=1))
@click.option("--limit", default=None, type=click.IntRange(min=1), help="score only the first N records (per benchmark task)")
@click.option("--ordinary", default="default", show_default=True,
              help="ordinary prompts whose refusals the scorecard reports: 'default' (the shipped held-out part), "
                   "'none', or a JSONL file of records with 'text' (and optionally 'category')")
@click.option("--ordinary-new-tokens", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--format", "fmt", default="auto", show_default=True, type=click.Choice(["auto", "raw", "chat", "both"]),
              help="the form the prompts reach the model in: raw, chat (the tokenizer's chat template), both; "
                   "auto: both when the tokenizer has a chat template")
@click.option("--attacks", default=None, metavar="SKILL",
              help="wrap SKILL's requests (from --data) in the shipped attack suite and report the share refused per family")
@click.option("--trust-remote-code", is_flag=True,
              help="run code shipped with CHECKPOINT (or --base) when it differs from this tool's own runtime "
                   "(default: refuse; a checkpoint whose runtime is byte-identical is scored with the tool's own)")
@friendly
@long_command
def eval_cmd(checkpoint, data, benchmark, benchmark_data, paper, confirm_run_unsafe_code, base, out, batch_size,
             max_new_tokens, limit, ordinary, ordinary_new_tokens, fmt, attacks, trust_remote_code, quiet) -> None:
    """Forget/retain scorecard of CHECKPOINT, before vs after: exact match, abstention, relative drop;
    and the share of ordinary prompts it refuses. With --benchmark, the paper's benchmarks instead:
    after / before per benchmark (a refused question counts wrong). Runs no code shipped with the
    checkpoint unless --trust-remote-code."""
    from editor.io import atomic_write_json, check_file_destination

    if (data is None) == (benchmark is None):
        raise EditorError("eval: give --data or --benchmark (one of them)")
    if out:
        check_file_destination(out)
    if benchmark is not None:
        from editor.eval.lmeval import evaluate_benchmarks, render_benchmarks

        card = evaluate_benchmarks(checkpoint, benchmark, base=base, trust_remote_code=trust_remote_code, limit=limit,
                                   batch_size=batch_size, data_dir=benchmark_data, unsafe_code=confirm_run_unsafe_code,
                                   paper=paper)
        click.echo(render_benchmarks(card))
    else:
        from editor.eval.scorecard import evaluate_checkpoint, render_scorecard

        card = evaluate_checkpoint(checkpoint, data, base=base, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   limit=limit, ordinary=ordinary, ordinary_new_tokens=ordinary_new_tokens,
                                   trust_remote_code=trust_remote_code, progress=not quiet, format=fmt, attacks=attacks)
        click.echo(render_scorecard(card))
    if out:
        atomic_write_json(out, card)
        click.echo(f"wrote {out}")


@main.command("export")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--stats", "stats", required=True, type=click.Path(exists=True), help="directory with stats.safetensors (from `profile`) or the file")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None, help="checkpoint directory (default: the recipe's export.out)")
@click.option("--format", "fmt", type=click.Choice(["hf", "onnx"]), default="hf", show_default=True, help="checkpoint format")
@click.option("--max-shard-size", default="5GB", show_default=True, help="largest safetensors shard (hf)")
@click.option("--overwrite", is_flag=True, help="replace a non-empty destination")
@friendly
@long_command
def export_cmd(recipe: str, stats: str, out: str | None, fmt: str, max_shard_size: str, overwrite: bool, quiet: bool) -> None:
    """Plan the edit of RECIPE from profiled statistics, patch the model and export a checkpoint."""
    single_process("export")
    from editor.pipeline import export_recipe

    path = export_recipe(recipe, stats, out, fmt=fmt, overwrite=overwrite, max_shard_size=max_shard_size)
    click.echo(f"exported {fmt}: {path}")


@main.command("inspect")
@click.argument("checkpoint", type=click.Path(file_okay=False, exists=True))
@friendly
def inspect_cmd(checkpoint: str) -> None:
    """What CHECKPOINT edits (methods, layers, neurons, KSD), its provenance, and the sha256 of
    every file; exit 1 with one line per problem when anything is missing or changed. CHECKPOINT is
    an HF checkpoint or an ONNX export directory (model.onnx + external data)."""
    from editor.checkpoint import describe, verify

    rep = verify(checkpoint)
    click.echo(describe(rep))
    if not rep.ok:
        for p in rep.problems:
            click.echo(f"error: {p}", err=True)
        sys.exit(1)


@main.command("restore")
@click.argument("checkpoint", type=click.Path(file_okay=False, exists=True))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="directory for the base model")
@click.option("--overwrite", is_flag=True, help="replace a non-empty destination")
@friendly
def restore_cmd(checkpoint: str, out: str, overwrite: bool) -> None:
    """Write the exact base model of CHECKPOINT (neurons un-permuted, patch dropped) to OUT."""
    from editor.checkpoint import restore

    path = restore(checkpoint, out, overwrite=overwrite)
    click.echo(f"restored base model: {path}")


@main.command("push")
@click.argument("checkpoint", type=click.Path(file_okay=False, exists=True))
@click.option("--repo-id", required=True, help="namespace/name on the Hub")
@click.option("--public", is_flag=True, help="make a new repository public (default: private; an existing one keeps its visibility)")
@click.option("--revision", default=None, help="branch to push to (created if missing)")
@click.option("--dry-run", is_flag=True, help="verify and show the files, the model card and what the push would do; upload nothing")
@friendly
def push_cmd(checkpoint: str, repo_id: str, public: bool, revision: str | None, dry_run: bool) -> None:
    """Verify CHECKPOINT and upload it to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`).

    The repository (its revision) is made to mirror CHECKPOINT: files in it that are not in
    CHECKPOINT — stale shards of an earlier push, files added by hand — are DELETED in the same
    commit (.gitattributes is kept) and listed in the output. The visibility printed is the Hub's."""
    from editor.hub import push

    push(checkpoint, repo_id, private=not public, revision=revision, dry_run=dry_run, echo=click.echo)


@main.command("lm-eval-command")
@click.argument("checkpoint")
@click.option("--tasks", default=",".join(PAPER_TASKS), show_default=True, help="comma-separated lm-eval task names")
@click.option("--batch-size", default="8", show_default=True, help="a positive integer, 'auto' or 'auto:N'")
@click.option("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the harness's own)")
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(get_args(Dtype)))
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
