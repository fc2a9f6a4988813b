"""The EleutherAI lm-evaluation-harness command for an exported checkpoint — built, never run.

``lm_eval`` is not a dependency of skill-editor (it pulls in a large tree); this module only
writes the command line a user runs where the harness is installed::

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
  ``editor.eval.scorers.evaluate_mmlu`` counts abstentions as wrong.
* Code tasks execute model-written programs: the harness wants ``HF_ALLOW_CODE_EVAL=1`` and (from
  lm-eval 0.4.8) ``--confirm_run_unsafe_code``; both are added for them (``unsafe_code=None``).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from editor.errors import EditorError

# the paper's benchmarks in the harness: 8-shot CoT GSM8K (Wei et al. exemplars), MBPP, 5-shot MMLU
PAPER_TASKS = ("gsm8k_cot", "mbpp", "mmlu")
CODE_TASK_PATTERN = re.compile(r"(mbpp|humaneval|apps|ds1000|code)", re.IGNORECASE)
_TASK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
_DTYPES = ("auto", "float32", "float16", "bfloat16")


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
    if dtype is not None and dtype not in _DTYPES:
        raise EditorError(f"lm-eval: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
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
