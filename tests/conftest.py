import builtins
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# GGUF models are read from their file, no dequantized copy written to the user's cache (tests/test_dequantized.py
# turns the copies on, in a temporary cache)
os.environ.setdefault("SKILL_EDITOR_DEQUANTIZED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import tiny_project  # noqa: E402

# Tiny models: one thread avoids OpenMP oversubscription (and xdist workers fighting over cores).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``qwen`` need the opt-in real model: skipped (one reason, one summary line) without it."""
    marked = [item for item in items if item.get_closest_marker("qwen")]
    if marked:
        from editor.model.packaged import QWEN_CODER_05B, installed

        if not installed(QWEN_CODER_05B):
            skip = pytest.mark.skip(reason="Qwen2.5-Coder-0.5B-Instruct is not installed (SKILL_EDITOR_QWEN=1 bash scripts/setup.sh)")
            for item in marked:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def make_project(tmp_path_factory):
    """``make_project(name, methods, **kw)``: a tiny end-to-end project (``tests.helpers.tiny_project``)
    in a fresh directory; returns its recipe path. Session-scoped, so module fixtures can use it."""

    def make(name: str, methods: str = "", **kw):
        return tiny_project(tmp_path_factory.mktemp(name), methods, **kw)

    return make


@pytest.fixture
def no_prompt(monkeypatch):
    """Fail the test if anything asked on stdin (transformers' "run the custom code? [y/N]"): the
    prompts are recorded, since transformers turns an exception of ``input`` into its own error."""
    asked = []

    def record(prompt=""):
        asked.append(prompt)
        raise EOFError

    monkeypatch.setattr(builtins, "input", record)
    yield asked
    assert not asked, f"prompted: {asked[0][:120]!r}"
