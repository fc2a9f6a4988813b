"""Applying plans to an in-memory model: permute neurons, install the shipped runtime's NA / KSD
modules and fill their constants, or prune. Also builds the ``skill_editor`` edit description and
wraps a patched base model in the checkpoint class (the same class a checkpoint loads as)."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from editor import __version__
from editor.arch import ArchSpec, decoder_layers, permute_neurons
from editor.methods import KSDBounds, LinearShare, NAPlan
from editor.runtime.configuration_skill_editor import SkillEditorConfig
from editor.runtime.modeling_skill_editor import (
    FORMAT,
    FORMAT_VERSION,
    SkillEditorForCausalLM,
    install_patches,
    patch_digest,
    patch_tensors,
)

AUTO_MAP = {
    "AutoConfig": "configuration_skill_editor.SkillEditorConfig",
    "AutoModelForCausalLM": "modeling_skill_editor.SkillEditorForCausalLM",
}


def plan_digest(plan: NAPlan) -> str:
    """A short digest of an NA plan (selection + constants), to tie KSD keys profiled under NA to it."""
    h = hashlib.sha256(json.dumps(plan.summary(), sort_keys=True).encode())
    for i in sorted(plan.layers):
        lp = plan.layers[i]
        h.update(lp.permutation.numpy().tobytes())
        for k in sorted(lp.constants):
            h.update(lp.constants[k].numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def apply_neuron_adjust(model: nn.Module, spec: ArchSpec, model_type: str, plan: NAPlan) -> None:
    """Permute each layer's neurons so the selected ones come first, then install NA on them."""
    for layer, lp in plan.layers.items():
        permute_neurons(model, spec, layer, lp.permutation)
    install_patches(model, model_type, {"neuron_adjust": {"mode": plan.mode, "seed": plan.seed,
                                                          "counts": {str(i): n for i, n in plan.counts.items()}}})
    layers = decoder_layers(model, spec)
    for layer, lp in plan.layers.items():
        na = layers[layer].get_submodule(spec.pre).neuron_adjust
        dev = na.a.device
        for k, v in lp.constants.items():
            getattr(na, k).copy_(v.to(dev))
        na.permutation.copy_(lp.permutation.to(dev))


@torch.no_grad()
def apply_key_space(model: nn.Module, spec: ArchSpec, model_type: str, bounds: dict[int, KSDBounds | LinearShare]) -> None:
    """Install the guard: hypercube bounds (``KSDBounds``) or the linear detector's per-layer
    shares (``LinearShare``), one kind per edit."""
    linear = _detector(bounds) == "linear"
    install_patches(model, model_type, {"key_space": {"layers": sorted(bounds), "detector": "linear" if linear else "box"}})
    layers = decoder_layers(model, spec)
    for layer, b in bounds.items():
        ks = layers[layer].get_submodule(spec.down).key_space
        if linear:
            ks.weight.copy_(b.weight.to(ks.weight.device))
            ks.bias.fill_(float(b.bias))
        else:
            ks.lower.copy_(b.lower.to(ks.lower.device))
            ks.upper.copy_(b.upper.to(ks.upper.device))


def _detector(guard: dict) -> str:
    kinds = {isinstance(b, LinearShare) for b in guard.values()}
    if len(kinds) > 1:
        raise ValueError("key_space: one kind of guard per edit (hypercube bounds or linear shares)")
    return "linear" if kinds == {True} else "box"


@torch.no_grad()
def apply_prune(model: nn.Module, spec: ArchSpec, selected: dict[int, torch.Tensor]) -> None:
    """Selective Pruning: zero the selected neurons' contribution (their down-projection weights)."""
    layers = decoder_layers(model, spec)
    for layer, idx in selected.items():
        if idx.numel() == 0:
            continue
        down = layers[layer].get_submodule(spec.down)
        i = idx.to(down.weight.device)
        if spec.layout == "conv1d":
            down.weight[i, :] = 0
        else:
            down.weight[:, i] = 0


def edit_description(model_type: str, na: NAPlan | None, ksd: dict[int, KSDBounds] | None,
                     refusal: str | None, refusal_ids: list[int] | None, model: nn.Module,
                     check: str = "every_call") -> dict:
    """The ``skill_editor`` dict of the checkpoint config, digest of the installed patch included."""
    edit = {"format": FORMAT, "version": FORMAT_VERSION, "tool_version": __version__, "arch": model_type,
            "neuron_adjust": None, "key_space": None}
    if na is not None:
        edit["neuron_adjust"] = {"mode": na.mode, "seed": na.seed, "score": na.score, "top_percent": na.top_percent,
                                 "counts": {str(i): n for i, n in sorted(na.counts.items())}}
    if ksd:
        ks: dict = {"layers": sorted(ksd)}
        if _detector(ksd) == "linear":
            ks.update(detector="linear", pool="max")
        else:
            ks.update(k={str(i): b.k for i, b in sorted(ksd.items())},
                      scale={str(i): b.scale for i, b in sorted(ksd.items())},
                      dims={str(i): b.dims for i, b in sorted(ksd.items())})
        ks.update(refusal=refusal, refusal_ids=list(refusal_ids or []), check=check)
        edit["key_space"] = ks
    edit["patch_digest"] = patch_digest(patch_tensors(model))
    return edit


def checkpoint_config(base_config, edit: dict) -> SkillEditorConfig:
    # The base config's `architectures` (e.g. LlamaForCausalLM) moves out of text_config into
    # skill_editor.base_architectures: converters and engines that take text_config's class name
    # (llama.cpp's convert_hf_to_gguf, multimodal-style loaders) would otherwise run the permuted
    # base weights as a plain model, silently without the edit (docs/SERVING.md).
    text = base_config.to_dict()
    base_archs = text.pop("architectures", None)
    if base_archs:
        edit = {**edit, "base_architectures": list(base_archs)}
    cfg = SkillEditorConfig(text_config=text, skill_editor=edit)
    cfg.auto_map = dict(AUTO_MAP)
    cfg.architectures = ["SkillEditorForCausalLM"]
    cfg.dtype = getattr(base_config, "dtype", None)
    return cfg


def wrap(model: nn.Module, edit: dict) -> SkillEditorForCausalLM:
    """The checkpoint class around an already patched base model (no copy of the weights)."""
    cfg = checkpoint_config(model.config, edit)
    return SkillEditorForCausalLM.from_patched(model, cfg)


def refusal_token_ids(tokenizer, refusal: str) -> list[int]:
    ids = list(tokenizer(refusal, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids
