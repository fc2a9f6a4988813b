"""The paper's benchmarks through EleutherAI's lm-evaluation-harness: in process over the loaded
checkpoint (``evaluate_benchmarks``, ``skill-editor eval CKPT --benchmark gsm8k,mbpp``; the
optional extra ``skill-editor[lmeval]``), or as the command line to run elsewhere
(``lm_eval_command``, ``skill-editor lm-eval-command``)::

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True,dtype=bfloat16 \
        --tasks gsm8k_cot,mbpp,mmlu --batch_size 8 --device cuda

Every piece is quoted with ``shlex`` so paths with spaces or shell characters survive. The
harness splits ``--model_args`` on commas, so a checkpoint path with a comma is refused.

Notes for edited checkpoints:

* ``trust_remote_code=True`` is always passed: the checkpoint's modeling code (NA/KSD) must run;
  without it the checkpoint refuses to load (fail closed).
* Generative tasks (``gsm8k_cot``, ``mbpp``, MLQA) go through ``generate``: a KSD abstention
  returns the refusal text, which the harness scores as wrong — as the paper counts it.
  Log-likelihood tasks (``mmlu``) read logits only, so the harness never sees an abstention;
  in process (``evaluate_benchmarks``) every refused document counts as wrong, those too.
* Code tasks execute model-written programs: the harness wants ``HF_ALLOW_CODE_EVAL=1`` and (from
  lm-eval 0.4.8) ``--confirm_run_unsafe_code``; both are added for them (``unsafe_code=None``).
"""

from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, get_args

from editor.errors import EditorError
from editor.eval.paper import BENCHMARKS
from editor.recipe import Dtype

# the paper's benchmarks in the harness (``editor.eval.paper.BENCHMARKS``)
PAPER_TASKS = tuple(BENCHMARKS[n].task for n in ("gsm8k", "mbpp", "mmlu"))
CODE_TASK_PATTERN = re.compile(r"(mbpp|humaneval|apps|ds1000|code)", re.IGNORECASE)
_TASK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?")


@dataclass
class LmEvalCommand:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        """One shell line: ``VAR=value … lm_eval …``, every word quoted."""
        prefix = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        return " ".join(prefix + [shlex.quote(a) for a in self.argv])

    def __str__(self) -> str:
        return self.shell()


def _tasks(tasks: str | Sequence[str]) -> list[str]:
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    items = [t.strip() for t in items if t and t.strip()]
    if not items:
        raise EditorError("lm-eval: at least one task is required")
    for t in items:
        if not _TASK.match(t):
            raise EditorError(f"lm-eval: bad task name {t!r} (letters, digits, '_', '-', '.')")
    return list(dict.fromkeys(items))


def _kv(key: str, value) -> str:
    if isinstance(value, bool):
        value = str(value)
    value = str(value)
    if "," in value:
        raise EditorError(f"lm-eval: {key} {value!r} contains a comma, which lm_eval's --model_args cannot carry")
    return f"{key}={value}"


def lm_eval_command(
    checkpoint: str,
    tasks: str | Sequence[str] = PAPER_TASKS,
    *,
    batch_size: int | str = 8,
    device: str | None = None,
    dtype: str | None = "bfloat16",
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    output_path: str | None = None,
    log_samples: bool = False,
    gen_kwargs: dict | None = None,
    seed: int | None = None,
    model_args: dict | None = None,
    unsafe_code: bool | None = None,
    executable: str = "lm_eval",
) -> LmEvalCommand:
    """The harness invocation for ``checkpoint`` (a local export directory or a Hub repo id).

    A local directory is made absolute; ``gen_kwargs`` (e.g. ``{"do_sample": True,
    "temperature": 0.7}``) become the harness's ``--gen_kwargs``; ``unsafe_code`` None adds
    ``--confirm_run_unsafe_code`` and ``HF_ALLOW_CODE_EVAL=1`` exactly when a code task is listed.
    """
    if not checkpoint or not str(checkpoint).strip():
        raise EditorError("lm-eval: a checkpoint directory or Hub repo id is required")
    ck = str(checkpoint)
    local = Path(ck).expanduser()
    if local.exists():
        if not local.is_dir():
            raise EditorError(f"lm-eval: {ck} is not a directory")
        ck = str(local.resolve())
    elif not _HUB_ID.fullmatch(ck):
        raise EditorError(f"lm-eval: no such checkpoint directory: {ck} (nor a Hub repo id, namespace/name)")
    task_list = _tasks(tasks)
    if isinstance(batch_size, str):
        if not re.fullmatch(r"auto(:\d+)?", batch_size):
            if not batch_size.isdigit():
                raise EditorError(f"lm-eval: batch size must be a positive integer, 'auto' or 'auto:N', got {batch_size!r}")
            batch_size = int(batch_size)
    if isinstance(batch_size, int) and batch_size <= 0:
        raise EditorError(f"lm-eval: batch size must be positive, got {batch_size}")
    if device is not None and not _DEVICE.match(device):
        raise EditorError(f"lm-eval: device must be cpu, mps, cuda or cuda:N, got {device!r}")
    if dtype is not None and dtype not in get_args(Dtype):
        raise EditorError(f"lm-eval: dtype must be one of {', '.join(get_args(Dtype))}, got {dtype!r}")
    if num_fewshot is not None and num_fewshot < 0:
        raise EditorError(f"lm-eval: num_fewshot must be >= 0, got {num_fewshot}")
    if limit is not None and not limit > 0:
        raise EditorError(f"lm-eval: limit must be > 0, got {limit}")

    margs = [_kv("pretrained", ck), "trust_remote_code=True"]
    if dtype is not None:
        margs.append(_kv("dtype", dtype))
    for k, v in (model_args or {}).items():
        if k in ("pretrained", "trust_remote_code"):
            raise EditorError(f"lm-eval: model_args may not override {k}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(k)):
            raise EditorError(f"lm-eval: bad model_args key {k!r}")
        margs.append(_kv(k, v))

    argv = [executable, "--model", "hf", "--model_args", ",".join(margs), "--tasks", ",".join(task_list),
            "--batch_size", str(batch_size)]
    if device is not None:
        argv += ["--device", device]
    if num_fewshot is not None:
        argv += ["--num_fewshot", str(int(num_fewshot))]
    if limit is not None:
        argv += ["--limit", str(limit)]
    if gen_kwargs:
        for k in gen_kwargs:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(k)):
                raise EditorError(f"lm-eval: bad gen_kwargs key {k!r}")
        argv += ["--gen_kwargs", ",".join(_kv(k, v) for k, v in gen_kwargs.items())]
    if seed is not None:
        argv += ["--seed", str(int(seed))]
    if output_path is not None:
        argv += ["--output_path", str(output_path)]
    if log_samples:
        if output_path is None:
            raise EditorError("lm-eval: log_samples needs an output_path")
        argv += ["--log_samples"]
    code = any(CODE_TASK_PATTERN.search(t) for t in task_list) if unsafe_code is None else unsafe_code
    env = {}
    if code:
        argv += ["--confirm_run_unsafe_code"]
        env["HF_ALLOW_CODE_EVAL"] = "1"
    return LmEvalCommand(argv, env)


# ---------------------------------------------------------------------------------------------
# in process: the loaded checkpoint scored by the harness, abstentions counted as wrong
# ---------------------------------------------------------------------------------------------


def _harness():
    """The harness's evaluator and HF model class, or one line saying how to install them."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EditorError("--benchmark needs lm-evaluation-harness: pip install 'skill-editor[lmeval]'") from None
    return simple_evaluate, HFLM, TaskManager


@functools.lru_cache(maxsize=1)
def task_manager():
    """The harness's task index (it reads every task file it ships: built once per process)."""
    _, _, TaskManager = _harness()
    return TaskManager()


def _guarded(model) -> bool:
    """Whether ``model`` can abstain: an edited model with Key Space Detection."""
    return bool(((getattr(getattr(model, "config", None), "skill_editor", None) or {}).get("key_space")))


def _lm(model, tokenizer, batch_size: int):
    """lm-eval's ``HFLM`` over ``model`` that records which documents the model refused:
    generation reads the ``abstained`` flags of the edited model's own ``generate`` (a refusal
    mid-answer included); a log-likelihood request reads logits only, so its context — the
    question — is put to the guard in one prompt pass (``generate_texts``, one new token)."""
    from editor.eval.scorecard import generate_texts

    _, HFLM, _ = _harness()

    class GuardedLM(HFLM):
        def __init__(self):
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            self.guard = _guarded(model)
            self.refused: set[tuple[str, str]] = set()
            self._batch: list[str] = []
            self._flags: dict[str, bool] = {}

        def _mark(self, requests, refused) -> None:
            for r in requests:
                if r.args[0] in refused:
                    self.refused.add((r.task_name, str(r.doc_id)))

        def tok_batch_encode(self, strings, *args, **kwargs):
            self._batch = list(strings)  # the rows of the next _model_generate
            return super().tok_batch_encode(strings, *args, **kwargs)

        def _model_generate(self, context, max_length, stop, **kwargs):
            if not self.guard:
                return super()._model_generate(context, max_length, stop, **kwargs)
            out = super()._model_generate(context, max_length, stop, return_dict_in_generate=True, **kwargs)
            for text, flag in zip(self._batch, out["abstained"].reshape(-1).tolist()):
                self._flags[text] = self._flags.get(text, False) or bool(flag)
            return out.sequences

        def generate_until(self, requests, disable_tqdm: bool = False):
            self._flags = {}
            out = super().generate_until(requests, disable_tqdm)
            self._mark(requests, {t for t, f in self._flags.items() if f})
            return out

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            out = super().loglikelihood(requests, disable_tqdm)
            if self.guard:
                contexts = list(dict.fromkeys(r.args[0] for r in requests))
                _, flags = generate_texts(self.model, self.tokenizer, contexts, batch_size=batch_size, max_new_tokens=1)
                self._mark(requests, {c for c, f in zip(contexts, flags) if f})
            return out

    return GuardedLM()


def task_specs(names: Sequence[str], data_dir=None, tmp: Path | None = None) -> dict[str, str]:
    """Each benchmark's lm-eval task: its registered name, or — with ``data_dir`` — a task file in
    ``tmp`` that includes the registered one and reads the test documents from
    ``DATA_DIR/<benchmark>.jsonl`` (records in the Hub data set's schema: a local copy, MLQA's
    fallback, or small data for an offline check)."""
    if data_dir is None:
        return {n: BENCHMARKS[n].task for n in names}
    import yaml

    index = task_manager().task_index
    specs = {}
    for n in names:
        b = BENCHMARKS[n]
        entry = index.get(b.task)
        if entry is None or entry.yaml_path is None or entry.kind.name != "TASK":
            raise EditorError(f"--benchmark-data: {n} is the harness's {b.task!r}, which is not one task file "
                              f"(it reads its data from the Hub or the cache)")
        data = Path(data_dir) / f"{n}.jsonl"
        if not data.is_file():
            raise EditorError(f"--benchmark-data: no {data} (the {n} test records, one JSON object per line)")
        spec = tmp / f"{n}.yaml"
        spec.write_text(yaml.safe_dump({
            "include": str(Path(entry.yaml_path).resolve()), "task": b.task,
            "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
            "test_split": "test", "validation_split": None, "training_split": None}), encoding="utf-8")
        specs[n] = str(spec)
    return specs


def _score(results: dict, bench, refused: set[tuple[str, str]]) -> dict:
    """The benchmark's score: the mean of its metric over every document of its task(s) (a group's
    subtasks pooled, as the harness weighs MMLU), a refused document counting 0."""
    values, n_refused = [], 0
    for task, rows in results["samples"].items():
        for s in rows:
            if s.get("filter", "none") != bench.filter:
                continue
            gone = (task, str(s["doc_id"])) in refused
            n_refused += gone
            values.append(0.0 if gone else float(s[bench.metric]))
    if not values:
        raise EditorError(f"lm-eval scored no document of {bench.task} with {bench.metric} ({bench.filter})")
    harness = results["results"].get(bench.task, {}).get(f"{bench.metric},{bench.filter}")
    return {"score": sum(values) / len(values), "n": len(values), "refused": n_refused / len(values),
            "harness": None if harness is None else float(harness)}


def score_benchmarks(model, tokenizer, names: Sequence[str], specs: dict[str, str], *, limit: int | None = None,
                     batch_size: int = 8, unsafe_code: bool = False) -> dict[str, dict]:
    """``{benchmark: {"score", "n", "refused", "harness"}}`` of ``model`` (``specs`` from
    ``task_specs``); ``harness`` is the harness's own aggregate, which does not see abstentions in
    log-likelihood tasks; ``score`` counts every refused document as wrong."""
    import logging

    simple_evaluate, _, _ = _harness()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = _lm(model, tokenizer, batch_size)
    manager = task_manager()
    out = {}
    for n in names:
        b = BENCHMARKS[n]
        results = simple_evaluate(model=lm, tasks=[specs[n]], num_fewshot=b.num_fewshot, limit=limit, log_samples=True,
                                  task_manager=manager, confirm_run_unsafe_code=unsafe_code)
        out[n] = _score(results, b, lm.refused)
    return out


def evaluate_benchmarks(checkpoint, names, *, base: str | None = None, trust_remote_code: bool = False,
                        limit: int | None = None, batch_size: int = 8, data_dir=None, unsafe_code: bool = False,
                        paper: str | None = None) -> dict:
    """The paper's relative report of an exported checkpoint: every benchmark scored by the
    harness on the edited model and on its own base model (``scorecard.checkpoint_models``: the
    tool's runtime, or the checkpoint's code with ``trust_remote_code``), after / before and the
    drop; with ``paper`` (``MODEL:FORGET:METHOD``) the paper's cell beside it and the roles."""
    import os
    import tempfile

    import torch

    from editor.eval.paper import benchmarks, paper_cell, paper_reference, relative_report
    from editor.eval.scorecard import checkpoint_models

    names = benchmarks(names)
    cell = paper_cell(paper) if paper else None
    code = [n for n in names if BENCHMARKS[n].code]
    if code and not unsafe_code:
        raise EditorError(f"{', '.join(code)} runs the programs the model writes (evaluate's code_eval, in a "
                          f"subprocess with its reliability guard, not a sandbox): pass --confirm-run-unsafe-code, "
                          f"preferably inside a container or VM")
    _harness()
    with tempfile.TemporaryDirectory(prefix="skill-editor-tasks-") as tmp:
        specs = task_specs(names, data_dir, Path(tmp))
        models = checkpoint_models(checkpoint, base=base, trust_remote_code=trust_remote_code)
        if code:
            os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # evaluate's code_eval refuses to run without it
        scores = {}
        with torch.inference_mode():
            for side, model, tok in models:
                scores[side] = score_benchmarks(model, tok, names, specs, limit=limit, batch_size=batch_size,
                                                unsafe_code=unsafe_code)
                del model
    report = relative_report({n: s["score"] for n, s in scores["before"].items()},
                             {n: s["score"] for n, s in scores["after"].items()}, forget=cell[1] if cell else ())
    card = {"checkpoint": str(checkpoint), "limit": limit, "benchmarks": {n: BENCHMARKS[n].task for n in names},
            "before": scores["before"], "after": scores["after"], "report": report}
    if cell:
        card["paper"] = {"cell": ":".join(cell), "relative": paper_reference(*cell)}
    return card


def render_benchmarks(card: dict) -> str:
    """The relative report as a table (the paper's cell beside it when named) and the share of
    documents the edited model refused."""
    from editor.eval.paper import format_report

    ref = (card.get("paper") or {}).get("relative")
    lines = [format_report(card["report"], ref)]
    refused = {n: s["refused"] for n, s in card["after"].items() if s["refused"]}
    if refused:
        lines.append("refused by the edited model (counted wrong): "
                     + ", ".join(f"{n} {100 * r:.1f}%" for n, r in refused.items()))
    return "\n".join(lines)
