"""The lm-evaluation-harness command line for a checkpoint (built, never run): quoting, code
tasks, options, and one-line refusals — a local path that does not exist included (issue #25)."""

from __future__ import annotations

import shlex

import pytest

from editor.errors import EditorError
from editor.eval.lmeval import PAPER_TASKS, lm_eval_command
from tests.helpers import cli


# lm-evaluation-harness command (built, never run)
# ---------------------------------------------------------------------------------------------


def test_lm_eval_command_basic(tmp_path):
    ck = tmp_path / "my checkpoint"
    ck.mkdir()
    cmd = lm_eval_command(str(ck), tasks="gsm8k_cot,mmlu", batch_size=16, device="cuda")
    assert cmd.argv == [
        "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={ck.resolve()},trust_remote_code=True,dtype=bfloat16",
        "--tasks", "gsm8k_cot,mmlu", "--batch_size", "16", "--device", "cuda",
    ]
    assert cmd.env == {}
    # quoting: the shell line splits back into exactly the argv
    assert shlex.split(cmd.shell()) == cmd.argv
    assert "'" in cmd.shell()  # the space in the path is quoted


def test_lm_eval_command_code_tasks_and_options(tmp_path):
    cmd = lm_eval_command("me/llama3-8b-forget-gsm8k", tasks=PAPER_TASKS, batch_size="auto", num_fewshot=0,
                          limit=100, output_path=str(tmp_path / "out dir"), log_samples=True,
                          gen_kwargs={"do_sample": True, "temperature": 0.7}, seed=1, dtype=None)
    a = cmd.argv
    assert a[a.index("--model_args") + 1] == "pretrained=me/llama3-8b-forget-gsm8k,trust_remote_code=True"
    assert a[a.index("--tasks") + 1] == "gsm8k_cot,mbpp,mmlu"
    assert a[a.index("--batch_size") + 1] == "auto"
    assert a[a.index("--gen_kwargs") + 1] == "do_sample=True,temperature=0.7"
    assert "--confirm_run_unsafe_code" in a and "--log_samples" in a
    assert cmd.env == {"HF_ALLOW_CODE_EVAL": "1"}
    words = shlex.split(cmd.shell())
    assert words[0] == "HF_ALLOW_CODE_EVAL=1" and words[1:] == a
    assert "--confirm_run_unsafe_code" not in lm_eval_command("x/y", tasks=["mmlu"]).argv
    assert "--confirm_run_unsafe_code" not in lm_eval_command("x/y", tasks=["mbpp"], unsafe_code=False).argv


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(checkpoint="a,b"), "no such checkpoint"),
        (dict(checkpoint="x/y", tasks=""), "at least one task"),
        (dict(checkpoint="x/y", tasks="gsm8k; rm -rf /"), "bad task"),
        (dict(checkpoint="x/y", batch_size=0), "positive"),
        (dict(checkpoint="x/y", batch_size="lots"), "batch size"),
        (dict(checkpoint="x/y", device="gpu0"), "device"),
        (dict(checkpoint="x/y", dtype="int8"), "dtype"),
        (dict(checkpoint="x/y", log_samples=True), "output_path"),
        (dict(checkpoint="x/y", model_args={"pretrained": "z"}), "override"),
        (dict(checkpoint=""), "required"),
    ],
)
def test_lm_eval_command_rejects(kwargs, msg):
    with pytest.raises(EditorError, match=msg):
        lm_eval_command(**kwargs)


def test_lm_eval_command_cli(tmp_path):
    from click.testing import CliRunner

    from editor.cli import main

    ck = tmp_path / "ck"
    ck.mkdir()
    res = CliRunner().invoke(main, ["lm-eval-command", str(ck), "--tasks", "mmlu", "--batch-size", "4", "--device", "cuda:1"])
    assert res.exit_code == 0, res.output
    words = shlex.split(res.output.strip())
    assert words == ["lm_eval", "--model", "hf", "--model_args", f"pretrained={ck.resolve()},trust_remote_code=True,dtype=bfloat16",
                     "--tasks", "mmlu", "--batch_size", "4", "--device", "cuda:1"]


@pytest.mark.parametrize("path", ["/no/such/dir", "./missing", "../a/b/c", "~/nope/x"])
def test_lm_eval_command_missing_directory_is_one_line(path):
    res = cli("lm-eval-command", path, "--tasks", "gsm8k", ok=False)
    assert res.exit_code == 2
    assert res.output.strip() == f"error: lm-eval: no such checkpoint directory: {path} (nor a Hub repo id, namespace/name)"


def test_lm_eval_command_refuses_a_comma_in_the_path(tmp_path):
    ck = tmp_path / "a,b"
    ck.mkdir()
    with pytest.raises(EditorError, match="comma"):
        lm_eval_command(str(ck))
