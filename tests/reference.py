"""Literal reference implementations written straight from DESIGN §3/§4, independent of the
code under test (no import from ``editor``): one text at a time, no padding, plain hooks."""

from __future__ import annotations

import torch

# where the pre-activation / key live, written out per architecture (independent of editor.model.arch)
PATHS = {
    "gpt2": ("transformer.h", "mlp.c_fc", "mlp.c_proj", False),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", False),
    "opt": ("model.decoder.layers", "fc1", "fc2", False),
    "phi": ("model.layers", "mlp.fc1", "mlp.fc2", False),
    "phi3": ("model.layers", "mlp.gate_up_proj", "mlp.down_proj", True),
}
DEFAULT = ("model.layers", "mlp.gate_proj", "mlp.down_proj", False)


def paths(model_type):
    return PATHS.get(model_type, DEFAULT)


@torch.no_grad()
def reference_stats(model, token_lists):
    """{layer: {"pre": [N, d] float64 rows, "key": [texts, d] float64 rows}} from single-text forwards."""
    layers_path, pre_path, down_path, fused = paths(model.config.model_type)
    layers = model.get_submodule(layers_path)
    rows = {i: {"pre": [], "key": []} for i in range(len(layers))}
    handles = []
    for i, layer in enumerate(layers):
        down = layer.get_submodule(down_path)
        d = down.weight.shape[0] if model.config.model_type == "gpt2" else down.weight.shape[1]

        def pre_hook(m, a, out, i=i, d=d):
            x = out[..., :d] if fused else out
            rows[i]["pre"].append(x.reshape(-1, d).double())

        def key_hook(m, a, i=i, d=d):
            rows[i]["key"].append(a[0].reshape(-1, d)[-1:].double())

        handles.append(layer.get_submodule(pre_path).register_forward_hook(pre_hook))
        handles.append(down.register_forward_pre_hook(key_hook))
    try:
        for ids in token_lists:
            model(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return {i: {k: torch.cat(v) for k, v in r.items()} for i, r in rows.items()}


@torch.no_grad()
def reference_pooled_keys(model, token_lists):
    """{layer: [texts, d]}: each text's key (the down projection's input) max-pooled over all of its
    tokens, from single-text forwards — what the pooled linear detector scores."""
    layers_path, _, down_path, _ = paths(model.config.model_type)
    layers = model.get_submodule(layers_path)
    rows = {i: [] for i in range(len(layers))}
    handles = [layer.get_submodule(down_path).register_forward_pre_hook(
        lambda m, a, i=i: rows[i].append(a[0].reshape(-1, a[0].shape[-1]).amax(dim=0).float()))
        for i, layer in enumerate(layers)]
    try:
        for ids in token_lists:
            model(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return {i: torch.stack(r) for i, r in rows.items()}


def summarize(x):
    return {
        "count": x.shape[0],
        "mean": x.mean(0),
        "std": x.std(0, unbiased=True),
        "min": x.min(0).values,
        "max": x.max(0).values,
    }
