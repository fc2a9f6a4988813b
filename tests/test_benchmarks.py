"""The paper's benchmarks through lm-evaluation-harness, in process over an exported checkpoint
(issue #24): the harness scores the edited model (the tool's runtime) and its base, every document
the edited model refuses counts as wrong — in log-likelihood tasks too, where the harness alone
never sees a refusal —, the relative report beside the paper's cell, and the recipes' KSD queries
equal to the prompts the harness sends. Offline: task data from local JSONL, no Hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from editor.errors import EditorError
from editor.eval import paper
from tests.helpers import FORGET, RETAIN, cli, write_jsonl

pytest.importorskip("lm_eval")

PAPER_RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "paper"


@pytest.fixture(scope="module")
def ckpt(make_project):
    """A tiny checkpoint whose KSD box holds the forget texts' keys (NA + KSD, tool's runtime)."""
    recipe = make_project("bench", """\
        neuron_adjust: {forget: forget, retain: retain, top_percent: 10, mode: expected, seed: 0}
        key_space: {forget: forget, layer: -1, scale: 2.0, refusal: "No."}
        """)
    cli("run", recipe, "--quiet", "--threads", "1")
    return recipe.parent / "out"


def _gsm8k_data(root: Path) -> Path:
    root.mkdir(exist_ok=True)
    write_jsonl(root / "gsm8k.jsonl", [{"question": f"What is {t.split(' =')[0]}?", "answer": f"So.\n#### {t.split('= ')[1]}"}
                                       for t in FORGET[:3]])
    return root


def _local_task(tmp_path: Path, name: str, body: dict, docs: list[dict]) -> str:
    data = write_jsonl(tmp_path / f"{name}.jsonl", docs)
    spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", **body}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return str(path)


def test_refused_documents_count_wrong_in_generation_and_loglikelihood(ckpt, tmp_path, monkeypatch):
    """A multiple-choice task whose right answer has by far the higher likelihood on forget texts:
    the harness's own accuracy sees no refusal; ours counts every refused document 0. The base model
    refuses nothing, and there the two agree."""
    from editor.eval import lmeval
    from editor.eval.scorecard import checkpoint_models

    docs = [{"prompt": t, "choices": [" " + t[-1], " ~~~~~~~~"], "gold": 0} for t in FORGET[:5]] + \
           [{"prompt": t, "choices": [" " + t[-1], " ~~~~~~~~"], "gold": 0} for t in RETAIN[:5]]
    mc = _local_task(tmp_path, "local_mc", {"output_type": "multiple_choice", "doc_to_text": "{{prompt}}",
                                            "doc_to_choice": "{{choices}}", "doc_to_target": "gold",
                                            "target_delimiter": "",
                                            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}, docs)
    gen = _local_task(tmp_path, "local_gen", {"output_type": "generate_until", "doc_to_text": "{{prompt}}",
                                              "doc_to_target": "{{prompt}}",
                                              "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 4},
                                              "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                                                               "higher_is_better": True}]},
                      [{"prompt": d["prompt"]} for d in docs])
    monkeypatch.setitem(paper.BENCHMARKS, "mc", paper.Benchmark("local_mc", "acc"))
    monkeypatch.setitem(paper.BENCHMARKS, "gen", paper.Benchmark("local_gen", "exact_match"))
    specs = {"mc": mc, "gen": gen}
    models = checkpoint_models(ckpt)
    _, edited, tok = next(models)
    after = lmeval.score_benchmarks(edited, tok, ["mc", "gen"], specs, batch_size=4)
    _, base, tok = next(models)
    before = lmeval.score_benchmarks(base, tok, ["mc", "gen"], specs, batch_size=4)
    for s in (*after.values(), *before.values()):
        assert s["n"] == 10
    # the edited model refuses the forget texts (its box was fitted on them), in both kinds of task
    assert after["mc"]["refused"] >= 0.4 and after["gen"]["refused"] >= 0.4
    # log-likelihood: the harness alone scores the refused documents as answered
    assert after["mc"]["score"] == pytest.approx(after["mc"]["harness"] - after["mc"]["refused"])
    assert after["mc"]["harness"] == 1.0
    # generation: the refusal text is already wrong for the harness; ours agrees
    assert after["gen"]["score"] <= after["gen"]["harness"]
    # the base model never refuses, and there our mean is the harness's
    for s in before.values():
        assert s["refused"] == 0 and s["score"] == pytest.approx(s["harness"])


def test_eval_benchmark_cli_relative_report(ckpt, tmp_path, no_prompt):
    data = _gsm8k_data(tmp_path / "bench")
    out = tmp_path / "card.json"
    res = cli("eval", ckpt, "--benchmark", "gsm8k", "--benchmark-data", data, "--paper", "llama-3-8b:gsm8k:ksd",
              "--limit", "2", "--out", out, "--quiet", "--threads", "1")
    assert "after/before" in res.output and "paper" in res.output and "0.160" in res.output
    card = json.loads(out.read_text())
    assert card["benchmarks"] == {"gsm8k": "gsm8k_cot"} and card["paper"]["cell"] == "llama-3-8b:gsm8k:ksd"
    assert card["before"]["gsm8k"]["n"] == 2 and card["report"]["gsm8k"]["role"] == "forget"
    assert card["before"]["gsm8k"]["score"] == card["before"]["gsm8k"]["harness"]


@pytest.mark.parametrize("args,msg", [
    (["--benchmark", "gsm8k,nope"], "unknown benchmark 'nope'"),
    (["--benchmark", "gsm8k", "--paper", "llama-3-8b:gsm8k"], "not a cell of the paper's table"),
    (["--benchmark", "mbpp"], "--confirm-run-unsafe-code"),
    (["--benchmark", "mmlu", "--benchmark-data", "."], "not one task file"),
    (["--benchmark", "mlqa-de", "--benchmark-data", "."], "mlqa-de.jsonl"),
    ([], "--data or --benchmark"),
    (["--benchmark", "gsm8k", "--data", "x.jsonl"], "--data or --benchmark"),
])
def test_eval_benchmark_bad_input_is_one_line(ckpt, args, msg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli("eval", ckpt, *args, "--quiet", ok=False)
    assert res.exit_code == 2
    line = res.output.strip()
    assert line.startswith("error: ") and "\n" not in line and msg in line, line


def test_paper_tables():
    assert paper.paper_reference("llama-3-8b", "gsm8k", "na") == {"gsm8k": 0.39, "mbpp": 0.76, "mmlu": 0.96}
    assert paper.paper_reference("gemma-2b", "mbpp", "ksd") == {"mbpp": 0.0, "gsm8k": 0.91, "mmlu": 1.0}
    assert paper.paper_reference("nope", "gsm8k", "na") is None
    assert paper.paper_cell("llama-2-7b:mbpp:na") == ("llama-2-7b", "mbpp", "na")
    rep = paper.relative_report({"gsm8k": 0.5, "mbpp": 0.4, "mmlu": 0.6, "x": 0.0},
                                {"gsm8k": 0.1, "mbpp": 0.4, "mmlu": 0.3, "x": 0.2}, forget="gsm8k")
    assert rep["gsm8k"]["role"] == "forget" and rep["mbpp"]["role"] == "retain"
    assert rep["gsm8k"]["relative"] == pytest.approx(0.2) and rep["gsm8k"]["drop"] == pytest.approx(0.8)
    assert rep["mmlu"]["drop"] == pytest.approx(0.5) and rep["x"]["relative"] is None
    table = paper.format_report(rep, paper.paper_reference("llama-3-8b", "gsm8k", "na"))
    assert "0.390" in table and "n/a" in table
    with pytest.raises(EditorError, match="at least one"):
        paper.benchmarks(" , ")


def test_mlqa_squad_records():
    obj = {"data": [{"title": "T", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "q1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]}]}]}]}
    assert paper.mlqa_squad_records(obj) == [{"id": "q1", "title": "T", "context": "Paris is in France.",
                                              "question": "Where is Paris?",
                                              "answers": {"answer_start": [12], "text": ["France"]}}]


# ---------------------------------------------------------------------------------------------
# the recipes' KSD queries are the prompts the harness sends (so the box holds the test queries)
# ---------------------------------------------------------------------------------------------


def _render(recipe_file: Path, set_name: str, record: dict) -> str:
    from editor.data import render
    from editor.recipe import load_recipe

    r = load_recipe(recipe_file)
    return render([record], r.data[set_name].text, set_name)[0]


def _harness_prompt(name: str, record: dict, tmp_path: Path) -> str:
    """The prompt lm-eval builds for ``record`` in the benchmark's task (its few-shot count)."""
    from lm_eval.tasks import get_task_dict

    from editor.eval.lmeval import task_manager, task_specs

    write_jsonl(tmp_path / f"{name}.jsonl", [record])
    spec = task_specs([name], tmp_path, tmp_path)[name]
    task = next(iter(get_task_dict([spec], task_manager()).values()))
    shots = paper.BENCHMARKS[name].num_fewshot
    task.set_config("num_fewshot", shots if shots is not None else task.config.num_fewshot or 0)
    return task.fewshot_context(task.test_docs()[0], task.config.num_fewshot)


def test_gsm8k_recipe_queries_are_the_harness_prompt(tmp_path):
    q = {"question": "Tom has 3 apples and buys 2 more. How many apples does he have?", "answer": "So.\n#### 5"}
    want = _harness_prompt("gsm8k", q, tmp_path)
    assert want.count("Q: ") == 9 and want.endswith("Q: " + q["question"] + "\nA:")  # 8 exemplars, then the question
    for model in ("llama-3-8b", "llama-2-7b", "gemma-2b"):
        assert _render(PAPER_RECIPES / f"{model}-forget-gsm8k-ksd.yaml", "gsm8k_queries", q) == want


def test_mbpp_recipe_queries_are_the_harness_prompt():
    """MBPP zero-shot (its task file imports evaluate's code_eval from the Hub, so its prompt
    template is read from the file and rendered as the harness renders it)."""
    from lm_eval.utils import apply_template

    from editor.eval.lmeval import task_manager

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    cfg = yaml.load(Path(task_manager().task_index["mbpp"].yaml_path).read_text(encoding="utf-8"), Loader=Loader)
    rec = {"text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
           "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(0, 0) == 0"]}
    want = apply_template(cfg["doc_to_text"], rec)
    assert paper.BENCHMARKS["mbpp"].num_fewshot == 0
    for model in ("llama-3-8b", "llama-2-7b", "gemma-2b"):
        assert _render(PAPER_RECIPES / f"{model}-forget-mbpp-ksd.yaml", "mbpp_queries", rec) == want


def test_mlqa_recipe_queries_are_the_harness_prompt(tmp_path):
    rec = {"id": "q1", "title": "T", "context": "Paris ist in Frankreich.", "question": "Wo ist Paris?",
           "answers": {"text": ["Frankreich"], "answer_start": [12]}}
    assert _render(PAPER_RECIPES / "llama-3-8b-forget-mlqa-de-ksd.yaml", "mlqa_de", rec) == _harness_prompt("mlqa-de", rec, tmp_path)
