"""Benchmark scorers (GSM8K, MBPP sandbox, MLQA, MMLU), generation runner, relative drops, and the
lm-evaluation-harness command builder. Offline, CPU, hand-written cases."""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

import pytest
import torch

from editor.eval import scorers
from editor.errors import EditorError
from editor.eval.lmeval import PAPER_TASKS, lm_eval_command
from editor.eval.scorers import (
    execute_mbpp,
    extract_gsm8k_answer,
    extract_mbpp_code,
    gsm8k_gold,
    mlqa_match,
    normalize_answer,
    numbers_equal,
    score_gsm8k,
    score_mbpp,
    score_mlqa,
)

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "recipes" / "paper"

# ---------------------------------------------------------------------------------------------
# GSM8K
# ---------------------------------------------------------------------------------------------


def test_gsm8k_gold():
    assert gsm8k_gold("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72") == "72"
    assert gsm8k_gold("... #### 1,000") == "1000"
    assert gsm8k_gold("#### -3") == "-3"
    with pytest.raises(ValueError):
        gsm8k_gold("no final line")
    with pytest.raises(ValueError):
        gsm8k_gold("#### none")


@pytest.mark.parametrize(
    "text,want",
    [
        ("She has 5 + 4 = 9 toys. The answer is 9.", "9"),
        ("The answer is $1,234.50 in total.", "1234.50"),
        ("So the answer is: -3", "-3"),
        ("The answer is **42**.", "42"),
        ("First 12, then 7 more, so 19 in all.", "19"),  # no "The answer is": the last number
        ("The answer is 18.\n\nQ: Tom has 3 apples. The answer is 3.", "18"),
        ("He ends with 7.\nQ: A new question with 100 and 200", "7"),  # cut at the next exemplar
        ("", None),
        ("asdf ;; qwer ))(( no digits here", None),
        ("The answer is nothing", None),
    ],
)
def test_extract_gsm8k_answer(text, want):
    assert extract_gsm8k_answer(text) == want


def test_numbers_equal():
    assert numbers_equal("18.0", "18")
    assert numbers_equal("1,000", 1000)
    assert not numbers_equal("18", "18.5")
    assert not numbers_equal(None, "1")
    assert not numbers_equal("abc", "1")
    assert not numbers_equal("nan", "nan")


def test_score_gsm8k_abstention_and_garbage():
    golds = ["... #### 9", "... #### 33", "... #### 8", "... #### 5", "#### 7"]
    outs = [
        "5 + 4 = 9. The answer is 9.",  # right
        "The answer is 33.",  # right but abstained -> wrong
        "The answer is 9.",  # wrong
        "",  # no answer at all
        "\x00\x01 garbage ✓✓✓ \ufffd",  # garbage text
    ]
    res = score_gsm8k(outs, golds, abstained=[False, True, False, False, False])
    assert [r["correct"] for r in res["records"]] == [True, False, False, False, False]
    assert res["n"] == 5 and res["correct"] == 1
    assert res["accuracy"] == pytest.approx(0.2)
    assert res["abstained"] == pytest.approx(0.2)
    # gold as bare numbers works too; an abstention flag tensor is accepted
    res = score_gsm8k(["The answer is 3"], ["3"], abstained=torch.tensor([False]))
    assert res["correct"] == 1
    with pytest.raises(ValueError):
        score_gsm8k(["a"], ["#### 1", "#### 2"])


def test_gsm8k_prompt_is_the_8_shot_cot():
    p = scorers.gsm8k_prompt("How many?")
    assert p.count("Q: ") == 9 and p.count("The answer is") == 8
    assert p.startswith("Q: There are 15 trees in the grove.")
    assert p.endswith("\n\nQ: How many?\nA:")
    assert scorers.gsm8k_prompt("How many?", shots=False) == "Q: How many?\nA:"


# ---------------------------------------------------------------------------------------------
# MBPP: extraction and the sandbox (hostile outputs are mandatory cases)
# ---------------------------------------------------------------------------------------------

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


def test_extract_mbpp_code():
    assert extract_mbpp_code(ADD + "[DONE]\nmore text") == ADD.rstrip("\n")
    assert extract_mbpp_code("Here you go:\n```python\n" + ADD + "```\nExplanation") == ADD.rstrip("\n")
    assert extract_mbpp_code("") == ""
    assert extract_mbpp_code("[BEGIN]\n" + ADD + "[DONE]") == ADD.rstrip("\n")


def test_sandbox_pass_and_fail():
    ok = execute_mbpp(ADD, ADD_TESTS, timeout=10)
    assert ok.passed and ok.status == "passed", ok
    bad = execute_mbpp("def add(a, b):\n    return a - b\n", ADD_TESTS, timeout=10)
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.detail
    setup = execute_mbpp("def f():\n    return math.pi\n", ["assert f() > 3"], setup_code="import math", timeout=10)
    assert setup.passed, setup


def test_sandbox_infinite_loop_times_out_promptly():
    t0 = time.monotonic()
    res = execute_mbpp("def add(a, b):\n    while True:\n        pass\n", ADD_TESTS, timeout=2)
    elapsed = time.monotonic() - t0
    assert not res.passed and res.status == "timeout"
    assert elapsed < 6, elapsed


def test_sandbox_sleep_and_background_children_are_killed():
    code = "import subprocess\nsubprocess.Popen(['sleep', '100'])\n" + ADD
    t0 = time.monotonic()
    res = execute_mbpp(code, ADD_TESTS, timeout=5)
    assert res.passed, res  # a lingering grandchild neither blocks nor fails the run
    assert time.monotonic() - t0 < 5
    t0 = time.monotonic()
    res = execute_mbpp("import time\ntime.sleep(100)\n" + ADD, ADD_TESTS, timeout=2)
    assert res.status == "timeout" and time.monotonic() - t0 < 6


def test_sandbox_file_deletion_stays_inside_its_temp_dir(tmp_path, monkeypatch):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    monkeypatch.chdir(tmp_path)  # even from the caller's directory, the program runs elsewhere
    code = (
        "import os, shutil, tempfile\n"
        "roots = {os.getcwd(), os.path.expanduser('~'), tempfile.gettempdir(), os.environ.get('TMPDIR', '.')}\n"
        "assert len(roots) == 1, roots\n"
        "for root in roots:\n"
        "    for name in os.listdir(root):\n"
        "        p = os.path.join(root, name)\n"
        "        shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)\n"
        "open('junk.bin', 'wb').write(b'x' * 1000)\n"
        "print(os.getcwd())\n" + ADD
    )
    res = execute_mbpp(code, ADD_TESTS, timeout=10)
    assert res.passed, res
    assert sentinel.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sentinel.txt"]
    workdir = res.stdout.strip()
    assert workdir and workdir != str(tmp_path)
    assert not os.path.exists(workdir)  # the sandbox directory is removed afterwards


def test_sandbox_huge_output_is_capped():
    cap = 4096
    code = "import sys\nsys.stdout.write('x' * (20 * 1024 * 1024))\nsys.stderr.write('y' * (1024 * 1024))\n" + ADD
    res = execute_mbpp(code, ADD_TESTS, timeout=20, max_output_bytes=cap)
    assert res.passed, res.detail
    assert len(res.stdout) <= cap and len(res.stderr) <= cap
    assert res.truncated and res.output_bytes >= 21 * 1024 * 1024
    # an endless flood: killed at the timeout, still capped
    res = execute_mbpp("while True:\n    print('spam' * 1000)\n", ADD_TESTS, timeout=2, max_output_bytes=cap)
    assert res.status == "timeout" and len(res.stdout) <= cap


def test_sandbox_huge_memory_fails():
    res = execute_mbpp("x = bytearray(64 * 1024 ** 3)\n" + ADD, ADD_TESTS, timeout=10, memory_mb=512)
    assert not res.passed and "MemoryError" in res.detail, res
    t0 = time.monotonic()
    grow = "blocks = []\nwhile True:\n    blocks.append(bytearray(32 * 1024 * 1024))\n"
    res = execute_mbpp(grow + ADD, ADD_TESTS, timeout=10, memory_mb=512)
    assert not res.passed and res.status in ("failed", "no_result"), res
    assert time.monotonic() - t0 < 8


@pytest.mark.parametrize(
    "code,status",
    [
        ("", "failed"),  # no answer at all
        ("   \n\t\n", "failed"),
        ("this is not python at all :: {{{", "failed"),  # garbage text
        ("\x00\x01\x02", "failed"),
        ("import sys\nsys.exit(0)\n" + ADD, "failed"),  # exits 'successfully' before the asserts
        ("import os\nos._exit(0)\n" + ADD, "no_result"),
        ("raise KeyboardInterrupt\n", "failed"),
    ],
)
def test_sandbox_no_answer_garbage_and_early_exits(code, status):
    res = execute_mbpp(code, ADD_TESTS, timeout=10)
    assert not res.passed and res.status == status, res


def test_score_mbpp_extracts_and_counts_abstentions():
    records = [
        {"task_id": 1, "test_list": ADD_TESTS, "test_setup_code": ""},
        {"task_id": 2, "test_list": ADD_TESTS},
        {"task_id": 3, "test_list": ADD_TESTS},
        {"task_id": 4, "test_list": ADD_TESTS},
    ]
    outs = ["```python\n" + ADD + "```\n[DONE] trailing chatter", ADD, "", "Sorry, I can't help with that."]
    res = score_mbpp(outs, records, abstained=[False, True, False, False], timeout=10)
    assert [r["correct"] for r in res["records"]] == [True, False, False, False]
    assert res["records"][1]["status"] == "abstained"
    assert res["accuracy"] == pytest.approx(0.25) and res["abstained"] == pytest.approx(0.25)


def test_mbpp_prompt_format():
    rec = {"text": "Write a function to add two numbers.", "test_list": ADD_TESTS, "code": ADD}
    p = scorers.mbpp_prompt(rec)
    assert p == (
        "You are an expert Python programmer, and here is your task: Write a function to add two numbers. "
        "Your code should pass these tests:\n\n" + "\n".join(ADD_TESTS) + "\n[BEGIN]\n"
    )
    shot = scorers.mbpp_prompt(rec, shots=[rec])
    assert shot.endswith(p) and "[DONE]" in shot


# ---------------------------------------------------------------------------------------------
# MLQA
# ---------------------------------------------------------------------------------------------


def test_mlqa_normalization_and_substring():
    assert normalize_answer("  The Eiffel-Tower!! ", "en") == "eiffel tower"
    assert mlqa_match("It is the Eiffel Tower, in Paris.", ["Eiffel Tower"], "en")
    assert mlqa_match("la Torre Eiffel", {"answer_start": [3], "text": ["Torre Eiffel"]}, "es")
    assert mlqa_match("答案是北京。", ["北京"], "zh")
    assert mlqa_match("ＡＢＣ corp", "abc", None)  # NFKC: full-width letters
    assert not mlqa_match("", ["Paris"])  # no answer
    assert not mlqa_match("Paris", [""])  # an empty gold never matches
    assert not mlqa_match("London", ["Paris", "France"])
    assert not mlqa_match("!!! ,,, ...", ["Paris"])  # garbage


def test_score_mlqa_abstained():
    res = score_mlqa(["Paris", "Paris", "Rome"], [["Paris"], {"text": ["Paris"], "answer_start": [0]}, "Paris"],
                     abstained=[False, True, False], lang="en")
    assert [r["correct"] for r in res["records"]] == [True, False, False]
    assert res["accuracy"] == pytest.approx(1 / 3)


def test_mlqa_squad_records():
    squad = {"data": [{"title": "T", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "q1", "question": "Where is Paris?", "answers": [{"answer_start": 12, "text": "France"}]}]}]}]}
    recs = scorers.mlqa_squad_records(squad)
    assert recs == [{"id": "q1", "title": "T", "context": "Paris is in France.", "question": "Where is Paris?",
                     "answers": {"answer_start": [12], "text": ["France"]}}]
    assert scorers.mlqa_prompt(recs[0]) == "Context: Paris is in France.\nQuestion: Where is Paris?\nAnswer:"


# ---------------------------------------------------------------------------------------------
# the recipes probe with exactly the prompts the scorers evaluate with
# ---------------------------------------------------------------------------------------------


def _render(recipe_file: Path, set_name: str, record: dict) -> str:
    from editor.data import render
    from editor.recipe import load_recipe

    r = load_recipe(recipe_file)
    return render([record], r.data[set_name].text, set_name)[0]


@pytest.mark.parametrize("model", ["llama-3-8b", "llama-2-7b", "gemma-2b"])
def test_recipe_queries_match_scorer_prompts(model):
    q = {"question": "Tom has 3 apples and buys 2 more. How many apples does he have?", "answer": "#### 5"}
    assert _render(PAPER / f"{model}-forget-gsm8k-ksd.yaml", "gsm8k_queries", q) == scorers.gsm8k_prompt(q["question"])
    rec = {"text": "Write a function to add two numbers.", "test_list": ADD_TESTS + ["assert add(0, 0) == 0"], "code": ADD}
    assert _render(PAPER / f"{model}-forget-mbpp-ksd.yaml", "mbpp_queries", rec) == scorers.mbpp_prompt(rec)


def test_mlqa_recipe_queries_match_scorer_prompt():
    rec = {"context": "Paris is in France.", "question": "Where is Paris?", "answers": {"text": ["France"], "answer_start": [12]}}
    assert _render(PAPER / "llama-3-8b-forget-mlqa-de-ksd.yaml", "mlqa_de", rec) == scorers.mlqa_prompt(rec)


# ---------------------------------------------------------------------------------------------
# MMLU and generation on a tiny random model (mechanics only)
# ---------------------------------------------------------------------------------------------

MMLU_DEV = [
    {"question": f"Dev question {i}?", "choices": ["w", "x", "y", "z"], "answer": i % 4, "subject": "high_school_math"}
    for i in range(6)
]
MMLU_TEST = [
    {"question": "What is 2 + 2?", "choices": ["3", "4", "5", "22"], "answer": 1, "subject": "high_school_math"},
    {"question": "Which is a prime?", "choices": ["4", "6", "7", "9"], "answer": 2, "subject": "high_school_math"},
    {"question": "Capital of France?", "choices": ["Paris", "Rome", "Bonn", "Oslo"], "answer": 0, "subject": "geography"},
]


@pytest.fixture(scope="module")
def tiny():
    from tests.tiny import char_tokenizer, tiny_model

    return tiny_model("llama", seed=0), char_tokenizer()


def _manual_loglik(model, tok, prompt: str, cont: str) -> float:
    ids = tok(prompt + cont)["input_ids"]
    n_ctx = len(tok(prompt)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return sum(float(logp[p - 1, ids[p]]) for p in range(n_ctx, len(ids)))


@pytest.mark.parametrize("letter_format", [" {}", "{}"])  # two-token (space, letter) and one-token continuations
def test_mmlu_loglik_matches_unbatched(tiny, letter_format):
    model, tok = tiny
    res = scorers.evaluate_mmlu(model, tok, MMLU_TEST, MMLU_DEV, shots=5, batch_size=3, letter_format=letter_format)
    assert res["n"] == 3 and 0 <= res["accuracy"] <= 1
    for r, row in zip(MMLU_TEST, res["records"]):
        prompt = scorers.mmlu_prompt(r, [d for d in MMLU_DEV if d["subject"] == r["subject"]][:5])
        want = [_manual_loglik(model, tok, prompt, letter_format.format(x)) for x in "ABCD"]
        assert row["loglik"] == pytest.approx(want, abs=1e-3)
        assert row["prediction"] == "ABCD"[max(range(4), key=lambda i: (want[i], -i))]
    p = scorers.mmlu_prompt(MMLU_TEST[0], MMLU_DEV[:5])
    assert p.startswith("The following are multiple choice questions (with answers) about high school math.\n\n")
    assert p.count("Answer:") == 6 and p.endswith("D. 22\nAnswer:")


class _Abstaining(torch.nn.Module):
    """A stand-in for an edited checkpoint: forward and generate report every row as abstained."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.generation_config = model.generation_config

    def forward(self, **kw):
        out = self.inner(**kw)
        out["abstained"] = torch.ones(kw["input_ids"].shape[0], dtype=torch.bool)
        return out

    def generate(self, **kw):
        out = self.inner.generate(**kw)
        out["abstained"] = torch.ones(out.sequences.shape[0], dtype=torch.bool)
        return out


def test_mmlu_abstention_counts_wrong(tiny):
    model, tok = tiny
    res = scorers.evaluate_mmlu(_Abstaining(model), tok, MMLU_TEST, MMLU_DEV, batch_size=2)
    assert res["correct"] == 0 and res["abstained"] == 1.0


def test_generate_runner_order_flags_and_stops(tiny):
    model, tok = tiny
    prompts = ["Q: 1+1?\nA:", "Q: a much longer prompt here?\nA:", "Q: x?\nA:"]
    texts, flags = scorers.generate(model, tok, prompts, max_new_tokens=6, batch_size=2)
    assert len(texts) == 3 and flags == [False, False, False]
    for p, t in zip(prompts, texts):  # batched left-padded == one at a time
        alone, _ = scorers.generate(model, tok, [p], max_new_tokens=6, batch_size=1)
        assert alone[0] == t
    stop = texts[1][2:4] if len(texts[1]) >= 4 else None
    if stop:
        cut, _ = scorers.generate(model, tok, prompts[1:2], max_new_tokens=6, stop=[stop])
        assert stop not in cut[0] and texts[1].startswith(cut[0])
    _, flags = scorers.generate(_Abstaining(model), tok, prompts, max_new_tokens=2)
    assert flags == [True, True, True]


def test_evaluate_gsm8k_with_abstaining_model(tiny):
    model, tok = tiny
    recs = [{"question": "What is 2 + 2?", "answer": "#### 4"}]
    res = scorers.evaluate_gsm8k(_Abstaining(model), tok, recs, shots=False, max_new_tokens=3)
    assert res["abstained"] == 1.0 and res["correct"] == 0


# ---------------------------------------------------------------------------------------------
# relative drops and the paper's numbers
# ---------------------------------------------------------------------------------------------


def test_relative_report():
    rep = scorers.relative_report({"gsm8k": 0.5, "mbpp": 0.4, "mmlu": 0.6, "x": 0.0},
                                  {"gsm8k": 0.1, "mbpp": 0.4, "mmlu": 0.3, "x": 0.2}, forget="gsm8k")
    assert rep["gsm8k"]["role"] == "forget" and rep["mbpp"]["role"] == "retain"
    assert rep["gsm8k"]["relative"] == pytest.approx(0.2) and rep["gsm8k"]["drop"] == pytest.approx(0.8)
    assert rep["mbpp"]["drop"] == pytest.approx(0.0)
    assert rep["mmlu"]["drop"] == pytest.approx(0.5)
    assert rep["x"]["relative"] is None and rep["x"]["drop"] is None
    table = scorers.format_report(rep, scorers.paper_reference("llama-3-8b", "gsm8k", "na"))
    assert "0.390" in table and "n/a" in table


def test_paper_reference():
    assert scorers.paper_reference("llama-3-8b", "gsm8k", "na") == {"gsm8k": 0.39, "mbpp": 0.76, "mmlu": 0.96}
    assert scorers.paper_reference("gemma-2b", "mbpp", "ksd") == {"mbpp": 0.0, "gsm8k": 0.91, "mmlu": 1.0}
    assert scorers.paper_reference("llama-2-7b", "mbpp", "na")["gsm8k"] == 0.75
    assert scorers.paper_reference("nope", "gsm8k", "na") is None


# ---------------------------------------------------------------------------------------------
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
        (dict(checkpoint="a,b"), "comma"),
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
    res = CliRunner().invoke(main, ["lm-eval-command", "a,b"])
    assert res.exit_code == 2 and "comma" in res.output
