"""``skill-editor eval``: the scorecard of an exported checkpoint, with no prompt and no code of the
checkpoint run unless the user says so (issue #15, item 2), progress on stderr unless ``--quiet``."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from click.testing import CliRunner

from editor.cli import main
from tests.helpers import cli



@pytest.fixture(scope="module")
def ckpt(make_project):
    recipe = make_project("eval-cmd", """\
        neuron_adjust: {forget: forget, retain: retain, top_percent: 10, mode: expected, seed: 0}
        key_space: {forget: forget, layer: -1, scale: 2.0, refusal: "No."}
        """)
    cli("run", recipe, "--quiet", "--threads", "1")
    return recipe.parent / "out"


def _eval(*args):
    return CliRunner().invoke(main, ["eval", *map(str, args)], catch_exceptions=False)


def _modules() -> set[str]:
    return {m for m in sys.modules if m.startswith("transformers_modules")}


def test_eval_scores_with_the_tools_runtime_no_prompt_no_checkpoint_code(ckpt, no_prompt, tmp_path):
    before = _modules()
    res = _eval(ckpt, "--data", ckpt.parent / "eval.jsonl", "--out", tmp_path / "card.json", "--threads", "1")
    assert res.exit_code == 0, res.output
    assert "rel. drop" in res.output and "scoring edited" in res.output  # the table, and the progress bars
    card = json.loads((tmp_path / "card.json").read_text())
    assert set(card["after"]) == {"math", "other"} and card["n"] == 8
    assert _modules() == before  # the checkpoint's files were never imported
    quiet = _eval(ckpt, "--data", ckpt.parent / "eval.jsonl", "--quiet", "--threads", "1")
    assert quiet.exit_code == 0 and "scoring" not in quiet.output


def test_eval_refuses_changed_shipped_code_unless_trusted(ckpt, no_prompt, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(ckpt, changed)
    marker = tmp_path / "ran.txt"
    with open(changed / "modeling_skill_editor.py", "a", encoding="utf-8") as f:
        f.write(f"\nimport pathlib as _p\n_p.Path({str(marker)!r}).write_text('ran')\n")
    res = _eval(changed, "--data", ckpt.parent / "eval.jsonl", "--threads", "1")
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert line.count("\n") == 0 and line.startswith("error: ") and "--trust-remote-code" in line
    assert "modeling_skill_editor.py differs" in line
    assert not marker.exists()
    res = _eval(changed, "--data", ckpt.parent / "eval.jsonl", "--trust-remote-code", "--quiet", "--threads", "1")
    assert res.exit_code == 0, res.output
    assert marker.read_text() == "ran"  # the user asked for the checkpoint's own code: it ran
    assert "rel. drop" in res.output


def test_eval_refuses_a_plain_checkpoint_that_names_custom_code(ckpt, no_prompt, tmp_path):
    from editor.checkpoint import restore

    base = restore(ckpt, tmp_path / "base")
    plain = tmp_path / "plain"
    shutil.copytree(base, plain)
    cfg = json.loads((plain / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (plain / "config.json").write_text(json.dumps(cfg))
    res = _eval(plain, "--data", ckpt.parent / "eval.jsonl", "--base", base, "--threads", "1")
    assert res.exit_code == 2 and "auto_map" in res.output and "--trust-remote-code" in res.output, res.output
    ok = _eval(base, "--data", ckpt.parent / "eval.jsonl", "--base", base, "--quiet", "--threads", "1")
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize("rows, want", [
    # a record the tokenizer would choke on: the validator `run` uses, one line, the file's line number
    (['{"prompt": "1 + 1 =", "answer": "2"}', "", '{"prompt": 3, "answer": "4"}'], "--data: bad.jsonl line 3: prompt is int, not text"),
    (['{"prompt": "1 + 1 =", "answer": "2"}', '{"prompt": "x"}'], "--data: bad.jsonl line 2 has no field 'answer' (a scorecard record needs prompt and answer; fields: prompt)"),
    (['{"prompt": "1 + 1 =", "answer": "2"}', "", "", "not json"], "--data: bad.jsonl line 4 is not valid JSON"),
    (["[1, 2]"], "--data: bad.jsonl line 1 is not a JSON object"),
])
def test_eval_bad_records_are_one_line_numbered_by_file_line(ckpt, tmp_path, rows, want):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n", encoding="utf-8")
    res = _eval(ckpt, "--data", bad, "--quiet", "--threads", "1")
    assert res.exit_code == 2
    assert res.output.strip() == f"error: {want}"
