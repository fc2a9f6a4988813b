"""The architecture table (one matcher) plus what only the tool needs: module lookup, the layer
count from a config, the load-time numeric check and the intermediate-neuron permutation.

The table itself lives in the shipped runtime file (``editor/runtime/modeling_skill_editor.py``)
so checkpoints and the tool agree on it; this module re-exports it.
"""

from __future__ import annotations

import torch
from torch import nn

from editor.errors import EditorError
from editor.hooks import hooks
from editor.runtime.modeling_skill_editor import ARCHITECTURES, ArchSpec, _d_ff, arch_spec, decoder_layers

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "arch_spec",
    "spec_for",
    "decoder_layers",
    "layer_module",
    "config_layers",
    "config_d_ff",
    "d_ff",
    "check_mapping",
    "permute_neurons",
    "resolve_layer",
]


def spec_for(config) -> ArchSpec:
    """The table entry for a loaded model's (or config's) ``model_type``; one-line error otherwise."""
    model_type = getattr(config, "model_type", None)
    try:
        return arch_spec(model_type)
    except ValueError as e:
        raise EditorError(str(e)) from None


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (``base_model``), falling back to the whole model."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` runs: its accelerate execution device when dispatched, else its weights'
    device (CPU for weights offloaded to ``meta``)."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    p = next(module.parameters(), None)
    return p.device if p is not None and p.device.type != "meta" else torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    return module_device(model.get_input_embeddings())


def layer_module(model: nn.Module, spec: ArchSpec, layer: int, role: str) -> nn.Module:
    """The module playing ``role`` ("pre", "up", "down", "act") in decoder layer ``layer``."""
    path = getattr(spec, role)
    if path is None:
        raise KeyError(f"architecture has no {role!r} module")
    return decoder_layers(model, spec)[layer].get_submodule(path)


def config_layers(config) -> int | None:
    """The number of decoder layers a config (or its text config) declares; None if it says nothing."""
    for c in (config, config.get_text_config() if hasattr(config, "get_text_config") else config):
        for name in ("num_hidden_layers", "n_layer", "num_layers"):
            n = getattr(c, name, None)
            if n:
                return int(n)
    return None


def config_d_ff(config) -> int | None:
    """The feed-forward width a config (or its text config) declares; None if it says nothing
    (GPT-2's ``n_inner: null`` means 4 × hidden: the caller that needs a number says so)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("intermediate_size", "ffn_dim", "n_inner"):
        n = getattr(c, name, None)
        if n:
            return int(n)
    return None


def d_ff(model: nn.Module, spec: ArchSpec, layer: int = 0) -> int:
    """The feed-forward width of a loaded model's layer, read from its down projection the way the
    shipped runtime reads it when it installs the patches."""
    return _d_ff(layer_module(model, spec, layer, "down"), spec)


def resolve_layer(layer: int, n_layers: int, field: str = "layer") -> int:
    """A possibly negative layer index → 0..n-1, or a one-line error naming the field."""
    if not -n_layers <= layer < n_layers:
        raise EditorError(f"{field}: layer {layer} is out of range for a model with {n_layers} layers")
    return layer % n_layers


def _pre_of(out: torch.Tensor, spec: ArchSpec, n: int) -> torch.Tensor:
    return out[..., :n] if spec.fused else out


@torch.inference_mode()
def check_mapping(model: nn.Module, spec: ArchSpec, model_type: str) -> None:
    """Confirm on a short random input that down-input == act(pre) [× up] in every layer.

    Fails with a clear message if a transformers release moved or renamed the modules. Every
    layer is checked (each has its own modules), on 2 × 7 tokens; only the decoder stack runs
    (``base_model``): the LM head takes no part in the mapping, and on a large vocabulary it would
    be the largest matmul of the check (262 144 × hidden for Gemma-3).
    """
    layers = decoder_layers(model, spec)
    captured: dict[tuple[int, str], torch.Tensor] = {}
    try:  # any failure (a module moved or renamed, a forward error) is a mapping failure
        regs = []
        for i, layer in enumerate(layers):
            for role in ("pre", "up", "down"):
                path = getattr(spec, role)
                if path is None:
                    continue
                mod = layer.get_submodule(path)
                if role == "down":
                    regs.append((mod, "forward_pre", lambda m, args, i=i: captured.__setitem__((i, "down"), args[0])))
                else:
                    regs.append((mod, "forward", lambda m, a, out, i=i, r=role: captured.__setitem__((i, r), out)))
        emb = model.get_input_embeddings()
        ids = torch.arange(7, device=emb.weight.device).remainder(emb.weight.shape[0])[None].repeat(2, 1)
        stack = getattr(model, "base_model", None)
        stack = stack if isinstance(stack, nn.Module) else model
        with hooks(regs):
            stack(input_ids=ids, attention_mask=torch.ones_like(ids))
    except Exception as e:  # noqa: BLE001
        raise EditorError(f"architecture check failed for {model_type!r}: {type(e).__name__}: {e}") from None
    for i, layer in enumerate(layers):
        if (i, "pre") not in captured or (i, "down") not in captured:
            raise EditorError(
                f"architecture check failed for {model_type!r}: layer {i}: modules {spec.pre!r}/{spec.down!r} were not called"
            )
        down_in = captured[(i, "down")].float()
        n = down_in.shape[-1]
        pre = captured[(i, "pre")]
        act = layer.get_submodule(spec.act)
        expect = act(_pre_of(pre, spec, n)).float()
        if spec.fused:
            expect = expect * pre[..., n:].float()
        elif spec.up is not None:
            expect = expect * captured[(i, "up")].float()
        expect = expect.reshape(down_in.shape)
        # bf16 / fp16 round act(pre) and the product separately: allow a few ulps of the dtype
        eps = torch.finfo(captured[(i, "down")].dtype).eps if captured[(i, "down")].is_floating_point() else 0.0
        tol = max(1e-3, 8 * eps) * (1 + expect.abs().max().item())
        if expect.shape != down_in.shape or (expect - down_in).abs().max().item() > tol:
            raise EditorError(
                f"architecture check failed for {model_type!r}: layer {i}: the down-projection input is not "
                f"act(pre){' × up' if spec.gated else ''}; this transformers release changed the MLP"
            )


def _permute_rows(module: nn.Module, perm: torch.Tensor, spec: ArchSpec, fused: bool) -> None:
    """Permute the output neurons of a pre/up module (Linear rows or Conv1D columns, + bias)."""
    w = module.weight
    if fused:
        n = w.shape[0] // 2 if spec.layout == "linear" else w.shape[1] // 2
        perm = torch.cat([perm, perm + n])
    p = perm.to(w.device)
    with torch.no_grad():
        if spec.layout == "conv1d":
            w.copy_(w[:, p])
        else:
            w.copy_(w[p])
        b = getattr(module, "bias", None)
        if b is not None:
            b.copy_(b[p.to(b.device)])


def permute_neurons(model: nn.Module, spec: ArchSpec, layer: int, perm: torch.Tensor) -> None:
    """Reorder layer ``layer``'s intermediate neurons so position j holds original neuron perm[j].

    gate/up rows (+ biases) and down columns move together: the function is unchanged.
    """
    lay = decoder_layers(model, spec)[layer]
    _permute_rows(lay.get_submodule(spec.pre), perm, spec, spec.fused)
    if spec.up is not None:
        _permute_rows(lay.get_submodule(spec.up), perm, spec, False)
    down = lay.get_submodule(spec.down)
    p = perm.to(down.weight.device)
    with torch.no_grad():
        if spec.layout == "conv1d":
            down.weight.copy_(down.weight[p])
        else:
            down.weight.copy_(down.weight[:, p])
