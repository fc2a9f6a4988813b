"""Applying plans to an in-memory model: permute neurons, install the shipped runtime's NA / KSD
modules and fill their constants, or prune; build the description of the result (``editor.manifest.Edit``); wrap
a patched base model in the checkpoint class (the very class a checkpoint loads as); and undo the
patch (``remove_patches``: the base model's function, for a scorecard's "before" column)."""

from __future__ import annotations

import torch
from torch import nn

from editor.manifest import AUTO_MAP, Edit
from editor.methods.key_space import KSDBounds, LinearShare
from editor.methods.neuron_adjust import NAPlan
from editor.model.arch import ArchSpec, decoder_layers, permute_neurons
from editor.model.tokens import eos_ids
from editor.plan import Plans
from editor.runtime.configuration_skill_editor import SkillEditorConfig
from editor.runtime.modeling_skill_editor import (
    KeySpaceGuardedMixin,
    NeuronAdjust,
    NeuronAdjustedMixin,
    SkillEditorForCausalLM,
    _rebind_dispatched,
    arch_spec,
    install_patches,
    patch_digest,
    patch_tensors,
)



def _installed_na(model: nn.Module, spec: ArchSpec, plan: NAPlan) -> bool:
    """Whether ``model`` already carries exactly ``plan`` (as ``apply_neuron_adjust`` leaves it);
    raises if it carries another Neuron Adjust."""
    layers = decoder_layers(model, spec)
    installed = {i: getattr(layer.get_submodule(spec.pre), "neuron_adjust", None) for i, layer in enumerate(layers)}
    installed = {i: m for i, m in installed.items() if isinstance(m, NeuronAdjust)}
    if not installed:
        return False
    same = set(installed) == set(plan.layers) and all(
        torch.equal(installed[i].permutation.cpu(), lp.permutation)
        and all(torch.equal(getattr(installed[i], k).cpu(), v) for k, v in lp.constants.items())
        for i, lp in plan.layers.items())
    if not same:
        raise ValueError("the model already carries a different Neuron Adjust patch")
    return True


@torch.no_grad()
def apply_neuron_adjust(model: nn.Module, spec: ArchSpec, model_type: str, plan: NAPlan) -> None:
    """Permute each layer's neurons so the selected ones come first, then install NA on them.
    A model that already carries this plan (the profile's NA-active pass installed it) is kept
    as it is, random generators included."""
    if _installed_na(model, spec, plan):
        return
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


def detector(guard: dict) -> str:
    """``box`` (hypercube bounds) or ``linear`` (the linear detector's shares): one kind per edit."""
    kinds = {isinstance(b, LinearShare) for b in guard.values()}
    if len(kinds) > 1:
        raise ValueError("key_space: one kind of guard per edit (hypercube bounds or linear shares)")
    return "linear" if kinds == {True} else "box"


@torch.no_grad()
def apply_key_space(model: nn.Module, spec: ArchSpec, model_type: str, bounds: dict[int, KSDBounds | LinearShare]) -> None:
    """Install the guard: hypercube bounds (``KSDBounds``) or the linear detector's per-layer
    shares (``LinearShare``)."""
    kind = detector(bounds)
    install_patches(model, model_type, {"key_space": {"layers": sorted(bounds), "detector": kind}})
    layers = decoder_layers(model, spec)
    for layer, b in bounds.items():
        ks = layers[layer].get_submodule(spec.down).key_space
        if kind == "linear":
            ks.weight.copy_(b.weight.to(ks.weight.device))
            ks.bias.fill_(float(b.bias))
        else:
            ks.lower.copy_(b.lower.to(ks.lower.device))
            ks.upper.copy_(b.upper.to(ks.upper.device))


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


def refusal_token_ids(tokenizer, refusal: str) -> list[int]:
    """The refusal text's tokens, then the tokenizer's end-of-sequence token."""
    return list(tokenizer(refusal, add_special_tokens=False)["input_ids"]) + eos_ids(tokenizer)[:1]


def build_edit(model_type: str, model: nn.Module | None, plans: Plans, *, recipe=None, num_layers: int | None = None,
             refusal: str | None = None, refusal_ids: list[int] | None = None, check: str = "every_call") -> Edit:
    """The edit of ``plans`` as installed on ``model`` (its patch digest; ``model`` None for the
    prune baseline's plain weights). With the ``recipe``: its set names, methods, refusal and
    ``check``; without it (an edit made in-process): ``refusal`` and ``check`` as given."""
    na = plans.neuron_adjust
    methods = recipe.methods if recipe is not None else [m for m, on in (("neuron_adjust", na is not None),
                                                                        ("key_space", bool(plans.key_space)),
                                                                        ("prune", plans.prune is not None)) if on]
    edit = Edit(arch=model_type, num_layers=num_layers, methods=methods)
    if na is not None:
        spec = recipe.neuron_adjust if recipe is not None else None
        edit.neuron_adjust = {"forget": spec and spec.forget, "retain": spec and spec.retain_sets,
                              **{k: v for k, v in na.summary().items() if k != "total"}}
    if plans.key_space:
        ks = recipe.key_space if recipe is not None else None
        layers = sorted(plans.key_space)
        edit.key_space = {"forget": ks and ks.forget, "layers": layers, "detector": detector(plans.key_space),
                          "refusal": ks.refusal if ks else refusal, "refusal_ids": list(refusal_ids or []),
                          "check": ks.check if ks else check, "plan": plans.key_space_info,
                          "profiled_with_neuron_adjust": na is not None}
        if edit.key_space["detector"] == "box":
            edit.key_space.update(k={str(i): plans.key_space[i].k for i in layers},
                                  scale={str(i): plans.key_space[i].scale for i in layers},
                                  dims={str(i): plans.key_space[i].dims for i in layers})
    if plans.prune is not None:
        pr = recipe.prune
        edit.prune = {"forget": pr.forget, "retain": pr.retain_sets, "top_percent": pr.top_percent, "score": pr.score,
                      "counts": {str(i): int(v.numel()) for i, v in sorted(plans.prune.items())}}
    if edit.patched:
        edit.patch_digest = patch_digest(patch_tensors(model))
    return edit


def apply_plans(recipe, model_type: str, num_layers: int, model: nn.Module, tokenizer, plans: Plans) -> Edit:
    """Patch ``model`` in place with every plan; return the edit's description."""
    spec = arch_spec(model_type)
    if plans.prune is not None:
        apply_prune(model, spec, plans.prune)
    if plans.neuron_adjust is not None:
        apply_neuron_adjust(model, spec, model_type, plans.neuron_adjust)
    refusal_ids = None
    if plans.key_space:
        apply_key_space(model, spec, model_type, plans.key_space)
        refusal_ids = refusal_token_ids(tokenizer, recipe.key_space.refusal)
    return build_edit(model_type, model, plans, recipe=recipe, num_layers=num_layers, refusal_ids=refusal_ids)


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
    """The checkpoint class around an already patched base model (no copy of the weights):
    ``edit`` is config.json's ``skill_editor`` dict (``Edit.config()``)."""
    with torch.device("meta"):
        wrapped = SkillEditorForCausalLM(checkpoint_config(model.config, edit))
    wrapped.model = model
    wrapped.generation_config = model.generation_config
    return wrapped.eval()


def _unswap_class(module: nn.Module, mixin: type) -> None:
    cls = type(module)
    if issubclass(cls, mixin):
        module.__class__ = [c for c in cls.__mro__ if c is not cls and not issubclass(c, mixin)][0]
        _rebind_dispatched(module)


def remove_patches(model: nn.Module, model_type: str) -> None:
    """Undo ``install_patches`` (the neuron permutation stays in the weights: same function)."""
    spec = arch_spec(model_type)
    for layer in decoder_layers(model, spec):
        pre = layer.get_submodule(spec.pre)
        down = layer.get_submodule(spec.down)
        if isinstance(pre, NeuronAdjustedMixin):
            del pre.neuron_adjust
            _unswap_class(pre, NeuronAdjustedMixin)
        if isinstance(down, KeySpaceGuardedMixin):
            del down.key_space
            _unswap_class(down, KeySpaceGuardedMixin)

