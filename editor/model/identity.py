"""What identifies the model a set of statistics was profiled on (recorded in ``stats.safetensors``
as ``identity``, checked by ``export --stats``): a dict of fields, compared field by field, so new
fields (a model file's sha256, a background set's fingerprint …) slot in without a format change.

* ``model`` / ``revision``: the recipe's reference as written (informative: compared only when the
  weights' fingerprint is missing on either side — the same model may be named differently);
* ``model_type``, ``num_layers``, ``hidden_size``, ``d_ff``, ``vocab_size``: the architecture;
* ``dtype``: the dtype the weights were loaded in (statistics depend on it);
* ``max_length``: the profile's truncation (statistics depend on it);
* ``weights``: ``weights_fingerprint`` of the loaded base model (before any edit).

The data sets are identified by the fingerprints every set already records (``sets``).
"""

from __future__ import annotations

import hashlib
import json

import torch

from editor.model.arch import config_d_ff, config_layers

SAMPLES = 4096  # elements read per tensor by the weights' fingerprint


def model_identity(recipe, config, dtype: torch.dtype) -> dict:
    """The fields known from the recipe and config.json (no weights)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    d_ff = config_d_ff(config)
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None)
    return {
        "model": recipe.recorded_model,
        "revision": recipe.revision,
        "model_type": getattr(config, "model_type", None),
        "num_layers": config_layers(config),
        "hidden_size": int(hidden) if hidden else None,
        "d_ff": int(d_ff) if d_ff else None,
        "vocab_size": getattr(c, "vocab_size", None),
        "dtype": str(dtype).removeprefix("torch."),
        "max_length": recipe.profile.max_length,
    }


@torch.no_grad()
def weights_fingerprint(model) -> str | None:
    """sha256 over every tensor of the state dict: its name, dtype, shape and ``SAMPLES`` elements
    evenly strided over it. Two models that differ anywhere in training differ here; reading a
    few KB per tensor keeps it cheap at any size. None when weights are off the module (accelerate
    offload keeps them on the ``meta`` device)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if t.device.type == "meta":
            return None
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLES)
        sample = flat[::step][:SAMPLES].to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return h.hexdigest()
