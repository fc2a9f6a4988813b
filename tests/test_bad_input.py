"""Bad input is one line ``error: …``, exit 2, nothing written (issue #15, item 4): recipes that are
not UTF-8, destinations that cannot be written (checked before any work), scorecard sets without
prompt / answer, nonsense values (strict types, finite numbers, plain template fields)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from editor.cli import main
from tests.helpers import tiny_project, write_jsonl

BODY = """\
neuron_adjust: {forget: forget, retain: retain, top_percent: 10, mode: expected, seed: 0}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return tiny_project(tmp_path_factory.mktemp("bad"), BODY)


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def one_line(res, *words):
    assert res.exit_code == 2, (res.exit_code, res.output)
    line = res.output.strip()
    assert "\n" not in line and line.startswith("error: "), res.output
    assert "Traceback" not in res.output
    for w in words:
        assert w in line, line
    return line


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def variant(project: Path, name: str, **changes) -> Path:
    """A copy of the project's recipe with top-level / nested keys replaced ("a.b": value)."""
    r = yaml.safe_load(project.read_text())
    for key, value in changes.items():
        node = r
        *path, last = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    p = project.parent / name
    p.write_text(yaml.safe_dump(r))
    return p


def test_recipe_that_is_not_utf8(project):
    bad = project.parent / "latin1.yaml"
    bad.write_bytes(project.read_bytes() + "# café\n".encode("latin-1"))
    before = _tree(project.parent)
    for cmd in (["run", bad], ["profile", bad, "--out", project.parent / "st"], ["run", bad, "--dry-run"]):
        one_line(invoke(*cmd), "not UTF-8")
    assert _tree(project.parent) == before


@pytest.mark.parametrize("value, words", [
    (float("inf"), ["key_space.scale", "finite"]),
    (float("nan"), ["key_space.scale", "finite"]),
    (True, ["key_space.scale", "number"]),
    ("2", ["key_space.scale", "number"]),
])
def test_scale_must_be_a_finite_number(project, value, words):
    r = variant(project, "scale.yaml", **{"key_space": {"forget": "forget", "scale": value}})
    one_line(invoke("run", r, "--dry-run"), *words)


@pytest.mark.parametrize("key, value, words", [
    ("neuron_adjust.top_percent", True, ["top_percent", "number"]),
    ("neuron_adjust.top_percent", float("inf"), ["top_percent", "finite"]),
    ("neuron_adjust.seed", True, ["seed", "integer"]),
    ("neuron_adjust.seed", 1.5, ["seed", "integer"]),
    ("profile.batch_size", "8", ["batch_size", "integer"]),
    ("key_space.false_positive_budget", float("nan"), ["false_positive_budget", "finite"]),
    ("key_space.refusal", 42, ["refusal", "string"]),
    ("trust_remote_code", "yes please", ["trust_remote_code", "boolean"]),
])
def test_strict_types(project, key, value, words):
    changes = {key: value}
    if key.startswith("key_space."):
        changes["key_space.forget"] = "forget"
    one_line(invoke("run", variant(project, "strict.yaml", **changes), "--dry-run"), *words)


def test_an_int_is_a_valid_float(project):
    r = variant(project, "int.yaml", **{"neuron_adjust.top_percent": 10, "key_space": {"forget": "forget", "scale": 2}})
    res = invoke("run", r, "--dry-run")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("template, words", [
    ("{text.upper}", ["{text.upper}", "attribute"]),
    ("{text[0]}", ["text[0]", "needs a list"]),
    ("{text[x]}", ["{text[x]}"]),
    ("{0}", ["{0}"]),
    ("{text!r}", ["no conversions"]),
    ("{text:>40}", ["format specs"]),
])
def test_templates_take_plain_field_names(project, template, words):
    r = variant(project, "tpl.yaml", **{"data.forget": {"path": "forget.jsonl", "text": template}})
    one_line(invoke("run", r, "--dry-run"), *words)


def test_template_field_values_must_be_text(project):
    write_jsonl(project.parent / "lists.jsonl", [{"text": ["a", "b"], "tests": ["assert 1", "assert 2"]}] * 3)
    r = variant(project, "lists.yaml", **{"data.forget": {"path": "lists.jsonl", "text": "{text}"}})
    one_line(invoke("run", r, "--dry-run"), "text is a list, not text")
    ok = variant(project, "lists-ok.yaml", **{"data.forget": {"path": "lists.jsonl", "text": "{tests[1]}"}})
    assert invoke("run", ok, "--dry-run").exit_code == 0
    idx = variant(project, "lists-idx.yaml", **{"data.forget": {"path": "lists.jsonl", "text": "{tests[5]}"}})
    one_line(invoke("run", idx, "--dry-run"), "no [5]")


def test_evaluate_set_without_prompt_or_answer(project, monkeypatch):
    import editor.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    write_jsonl(project.parent / "noanswer.jsonl", [{"prompt": f"p{i}", "skill": "x"} for i in range(3)])
    r = variant(project, "ev.yaml", **{"data.card": {"path": "noanswer.jsonl", "text": "{prompt}"},
                                       "evaluate": {"data": "card"}})
    before = _tree(project.parent)
    for cmd in (["run", r], ["run", r, "--dry-run"]):
        one_line(invoke(*cmd), "evaluate.data", "'answer'")
    assert _tree(project.parent) == before


def test_destination_whose_parent_is_a_file_is_refused_before_any_work(project, monkeypatch):
    import editor.pipeline as pipeline

    monkeypatch.setattr(pipeline, "prepare", lambda *a, **k: pytest.fail("work started before the destination check"))
    blocker = project.parent / "afile"
    blocker.write_text("x")
    before = _tree(project.parent)
    one_line(invoke("run", project, "--out", blocker / "ckpt"), "afile is not a directory")
    one_line(invoke("run", project, "--out", blocker / "deeper" / "ckpt"), "afile is not a directory")
    one_line(invoke("profile", project, "--out", blocker / "stats"), "afile is not a directory")
    one_line(invoke("export", project, "--stats", project.parent, "--out", blocker / "ck"), "afile is not a directory")
    assert _tree(project.parent) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_destination_that_cannot_be_created(project, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        one_line(invoke("run", project, "--out", ro / "ckpt"), "not writable")
    finally:
        ro.chmod(0o755)


def test_eval_out_whose_parent_is_a_file(project, tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    write_jsonl(tmp_path / "ev.jsonl", [{"prompt": "a", "answer": "b"}])
    one_line(invoke("eval", project.parent / "model", "--data", tmp_path / "ev.jsonl", "--out", blocker / "card.json"),
             "f is not a directory")


def test_recover_touches_only_its_own_destinations_leftovers(tmp_path):
    import tempfile

    from editor.io import recover

    mine = Path(tempfile.mkdtemp(prefix=".ck.", suffix=".partial", dir=tmp_path))
    other = Path(tempfile.mkdtemp(prefix=".ck.v2.", suffix=".partial", dir=tmp_path))  # another export's, maybe live
    (tmp_path / "ck").mkdir()
    done = recover(tmp_path / "ck")
    assert not mine.exists() and other.exists() and len(done) == 1


# ---------------------------------------------------------------------------------------------
# issue #25: click's usage errors, odd destinations, missing models — one line each, and early
# ---------------------------------------------------------------------------------------------


def test_usage_errors_are_one_line(project, tmp_path):
    """click printed a 4-line usage block ending in ``Error: …``; now one line ``error: …``, exit 2."""
    afile = project.parent / "afile.txt"
    afile.write_text("x")
    cases = [
        (["run", project.parent], "is a directory"),                   # a directory as the recipe
        (["push", project.parent / "model"], "--repo-id"),             # push without --repo-id
        (["run", project, "--threads", "0"], "--threads"),
        (["run", project, "--threads", "-3"], "--threads"),
        (["run", project, "--threads", "abc"], "--threads"),
        (["run", project, "--out", afile], "is a file"),               # --out naming a file
        (["export", project, "--stats", tmp_path / "missing"], "does not exist"),  # --stats naming a missing path
        (["eval", project.parent / "model", "--data", tmp_path / "missing.jsonl"], "does not exist"),
        (["frobnicate"], "No such command"),
    ]
    for args, words in cases:
        line = one_line(invoke(*args), words)
        assert "Usage:" not in line and "Try " not in line, line
    for args in (["--help"], ["run", "--help"], ["push", "--help"]):
        res = invoke(*args)
        assert res.exit_code == 0 and "Usage:" in res.output


CHECK_IMPORTS = r"""
import sys
from editor.cli import main
try:
    main(sys.argv[1:], prog_name="skill-editor")
except SystemExit as e:
    print("exit", e.code, "torch" in sys.modules, "transformers" in sys.modules)
"""


def test_bad_calls_answer_before_torch_is_imported(project, tmp_path):
    """Nine seconds before the first output of any call (torch and transformers imported up front):
    a missing or bad recipe and a bad option are now refused before either is imported."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    unknown = variant(project, "unknown-key.yaml", colour="blue")
    for args in (["run", tmp_path / "nope.yaml"], ["run", bad], ["profile", unknown, "--out", tmp_path / "o"],
                 ["run", project, "--threads", "0"], ["export", project, "--stats", tmp_path / "nope"],
                 ["eval", project.parent / "model", "--data", tmp_path / "nope.jsonl"]):
        res = subprocess.run([sys.executable, "-c", CHECK_IMPORTS, *map(str, args)], capture_output=True, text=True,
                             timeout=120)
        assert res.stdout.strip() == "exit 2 False False", (args, res.stdout, res.stderr)
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc")
def test_a_destination_that_takes_no_files_says_so(project, tmp_path):
    """/proc/ck failed with "cannot create the lock file /proc/.ck.lock" — after the work, for profile and
    eval --out (a traceback). Now refused before any work, saying what is wrong with the destination."""
    write_jsonl(tmp_path / "ev.jsonl", [{"prompt": "a", "answer": "b", "skill": "s"}])
    for args in (["run", project, "--out", "/proc/ck"], ["profile", project, "--out", "/proc/ck"],
                 ["export", project, "--stats", project.parent, "--out", "/proc/ck"],
                 ["eval", project.parent / "model", "--data", tmp_path / "ev.jsonl", "--out", "/proc/card.json"]):
        one_line(invoke(*args), "/proc does not take new files")


def test_a_missing_local_model_directory_is_named(project):
    """It was reported as "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    r = variant(project, "missing-model.yaml", model="../no/such/model")
    for cmd in (["run", r], ["run", r, "--dry-run"]):
        line = one_line(invoke(*cmd), "local directory not found: ../no/such/model")
        assert "Repo id" not in line
