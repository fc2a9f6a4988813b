"""A checkpoint fails closed by its files alone (issue #15, items 1 and 2), for every architecture
family of the runtime's table: every concrete class of the base architecture refuses it before a
model is allocated; ``AutoTokenizer.from_pretrained(checkpoint)`` loads with no ``[y/N]`` prompt and
no code of the checkpoint; only ``trust_remote_code=True`` gives the edited model.

The checkpoints are written the way ``editor.export.hf`` writes them (the patched model wrapped in
the checkpoint class, ``save_pretrained``, the runtime files, the tokenizer), from tiny random
models of ``tests.tiny``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.configuration_auto import model_type_to_module_name

from editor.manifest import RUNTIME_DIR, RUNTIME_FILES
from editor.patch import wrap
from editor.runtime.configuration_skill_editor import LOAD_WITH_REMOTE_CODE
from editor.runtime.modeling_skill_editor import (FORMAT, FORMAT_VERSION, ARCHITECTURES, decoder_layers, install_patches,
                                                  patch_digest, patch_tensors)
from tests.tiny import ALL_ARCHS, VOCAB, char_tokenizer, tiny_model

assert sorted(ARCHITECTURES) == ALL_ARCHS  # every family of the table is built below


def write_checkpoint(arch: str, out: Path) -> torch.Tensor:
    """A patched checkpoint of a tiny ``arch`` model: KSD on the last layer (a box holding every
    key: every row abstains), saved as the exporter saves it. Returns its logits on a fixed input."""
    model = tiny_model(arch)
    spec = ARCHITECTURES[arch]
    last = len(decoder_layers(model, spec)) - 1
    install_patches(model, arch, {"key_space": {"layers": [last], "detector": "box"}})
    edit = {"format": FORMAT, "version": FORMAT_VERSION, "arch": arch, "neuron_adjust": None,
            "key_space": {"layers": [last], "refusal_ids": [5, 6], "check": "every_call", "detector": "box"},
            "patch_digest": patch_digest(patch_tensors(model))}
    wrapped = wrap(model, edit)
    wrapped.save_pretrained(str(out))
    for name in RUNTIME_FILES:
        shutil.copyfile(RUNTIME_DIR / name, out / name)
    char_tokenizer().save_pretrained(str(out))
    with torch.no_grad():
        return wrapped(input_ids=torch.tensor([[1, 10, 20, 30]])).logits


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fail-closed")
    return {arch: (root / arch, write_checkpoint(arch, root / arch)) for arch in ALL_ARCHS}


def concrete_classes(arch: str) -> list[type]:
    """Every model class ``transformers`` defines for ``arch``'s family (its modeling module)."""
    name = model_type_to_module_name(arch)
    mod = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    return [c for _, c in sorted(vars(mod).items())
            if inspect.isclass(c) and issubclass(c, PreTrainedModel) and c.__module__ == mod.__name__]


@pytest.fixture
def no_allocation(monkeypatch):
    """Fail the test if any ``transformers`` model object is constructed."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} was allocated")

    monkeypatch.setattr(PreTrainedModel, "__init__", refuse)


def _dynamic_modules() -> set[str]:
    return {m for m in sys.modules if m.startswith("transformers_modules")}


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_every_concrete_class_refuses_the_checkpoint(checkpoints, arch, no_allocation, no_prompt):
    ckpt, _ = checkpoints[arch]
    classes = concrete_classes(arch)
    assert any(c.__name__.endswith(("ForCausalLM", "LMHeadModel")) for c in classes), classes
    for cls in classes:
        with pytest.raises(ValueError) as err:
            cls.from_pretrained(str(ckpt))
        assert LOAD_WITH_REMOTE_CODE in str(err.value), (cls.__name__, str(err.value)[:300])
    # the Auto class without trust_remote_code (None: not asked; False: refused) gets the same answer
    for trust in (None, False):
        kw = {} if trust is None else {"trust_remote_code": trust}
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            AutoModelForCausalLM.from_pretrained(str(ckpt), **kw)
    # a different family's class too (the base config is not found inside the checkpoint's config)
    other = "gpt2" if arch != "gpt2" else "llama"
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        concrete_classes(other)[0].from_pretrained(str(ckpt))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_tokenizer_and_config_load_with_no_prompt_and_no_checkpoint_code(checkpoints, arch, no_prompt):
    ckpt, _ = checkpoints[arch]
    before = _dynamic_modules()
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    assert tok("ab")["input_ids"] == [1, 4 + ord("a") - 32, 4 + ord("b") - 32]
    cfg = AutoConfig.from_pretrained(str(ckpt))  # without trust_remote_code: the base config, right sizes
    assert cfg.model_type == arch and type(cfg).__module__.startswith("transformers.")
    base = json.loads((ckpt / "config.json").read_text())["base_model_config"]
    assert cfg.vocab_size == base["vocab_size"] == VOCAB
    assert _dynamic_modules() == before  # no file of the checkpoint was imported


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_trust_remote_code_loads_the_edited_model(checkpoints, arch, tmp_path):
    ckpt, logits = checkpoints[arch]
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), trust_remote_code=True).eval()
    assert type(model).__name__ == "SkillEditorForCausalLM" and model.config.model_type == "skill_editor"
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 10, 20, 30]]))
    assert torch.equal(out.logits, logits) and out.abstained.tolist() == [True]
    # a save_pretrained round trip keeps the file's fail-closed fields
    model.save_pretrained(str(tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == json.loads((ckpt / "config.json").read_text())
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        concrete_classes(arch)[0].from_pretrained(str(tmp_path / "again"))
    assert getattr(transformers, type(model).__name__, None) is None  # the checkpoint's own class, not a library one
