"""Issue #15 item 7 (and #18 item 7): thread counts that do not oversubscribe, ``--threads`` and
``--quiet`` on every long command; recipes' absolute or ``~`` paths never end up in what the tool
writes (statistics, checkpoint, card), only paths relative to the recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import editor.threads as threads
from editor.cli import main
from tests.helpers import cli, tiny_project

LONG = ("run", "profile", "export", "eval")


@pytest.mark.parametrize("command", LONG)
def test_every_long_command_has_threads_and_quiet(command):
    out = CliRunner().invoke(main, [command, "--help"]).output
    assert "--threads" in out and "--quiet" in out


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    for var in threads.ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert threads.default_threads() == 2  # an idle 2-core machine: both cores
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    assert threads.default_threads() == 1  # others keep both cores busy: one thread, not two fighting them
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (10.0, 10.0, 10.0))
    assert threads.default_threads() == 54
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 4.0)  # a container's CPU quota caps it
    assert threads.default_threads() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting wins
    assert threads.default_threads() == 3


def test_threads_option_sets_torch_threads(make_project):
    recipe = make_project("threads", "neuron_adjust: {forget: forget, retain: retain, top_percent: 10, mode: expected}\n")
    try:
        cli("profile", recipe, "--out", recipe.parent / "st", "--quiet", "--threads", "2")
        assert torch.get_num_threads() == 2
        res = CliRunner().invoke(main, ["profile", str(recipe), "--out", str(recipe.parent / "st2"), "--threads", "0"])
        assert res.exit_code == 2 and "--threads" in res.output
    finally:
        torch.set_num_threads(1)


def test_export_quiet_prints_no_progress(make_project):
    recipe = make_project("quiet", "neuron_adjust: {forget: forget, retain: retain, top_percent: 10, mode: expected}\n")
    cli("profile", recipe, "--out", recipe.parent / "st", "--quiet", "--threads", "1")
    loud = cli("export", recipe, "--stats", recipe.parent / "st", "--out", recipe.parent / "a", "--threads", "1")
    quiet = cli("export", recipe, "--stats", recipe.parent / "st", "--out", recipe.parent / "b", "--quiet", "--threads", "1")
    assert "Writing model shards" in loud.output
    assert quiet.output.strip() == f"exported hf: {recipe.parent / 'b'}"


def test_absolute_and_home_paths_are_recorded_relative_to_the_recipe(tmp_path, monkeypatch):
    home = tmp_path / "home" / "alice"
    monkeypatch.setenv("HOME", str(home))
    proj = home / "work" / "proj"
    tiny_project(proj, "", export=None)  # the model and the data files
    recipe = proj / "recipes" / "abs.yaml"
    recipe.parent.mkdir()
    recipe.write_text(f"""\
model: {proj / 'model'}
dtype: float32
device: cpu
data:
  forget: {{path: "~/work/proj/forget.jsonl"}}
  retain: {{path: {proj / 'retain.jsonl'}}}
  card: {{path: ../eval.jsonl, text: "{{prompt}}"}}
profile: {{batch_size: 4, max_length: 32}}
neuron_adjust: {{forget: forget, retain: retain, top_percent: 10, mode: expected}}
key_space: {{forget: forget, layer: -1, scale: 2.0}}
evaluate: {{data: card}}
export: {{out: {proj / 'out'}}}
""")
    cli("run", recipe, "--quiet", "--threads", "1")
    written = [p for p in (proj / "out").rglob("*") if p.is_file()] + [proj / "out.stats" / "stats.safetensors"]
    assert len(written) > 5
    for p in written:
        data = p.read_bytes()
        leaks = (str(home).encode(), str(tmp_path).encode()) + (() if p.suffix == ".safetensors" else (b"~/",))
        for leak in leaks:
            assert leak not in data, (p.name, leak)
    import json

    manifest = json.loads((proj / "out" / "skill_editor.json").read_text())
    assert manifest["base_model"]["model"] == "../model"
    assert manifest["recipe"]["data"]["forget"]["path"] == "../forget.jsonl"
    assert manifest["recipe"]["data"]["retain"]["path"] == "../retain.jsonl"
    assert manifest["recipe"]["data"]["card"]["path"] == "../eval.jsonl"  # as written
    assert manifest["recipe"]["export"]["out"] == "../out"
    assert manifest["statistics"]["sets"]["forget"]["source"] == "../forget.jsonl"
    assert json.loads((proj / "out" / "config.json").read_text())["base_model_config"]["_name_or_path"] == "../model"
    assert Path(proj / "out" / "README.md").read_text().count("../model") >= 1
