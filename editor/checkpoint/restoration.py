"""``skill-editor restore``: the exact base model of a patched HF checkpoint — the neuron
permutation undone, the patch tensors dropped, the base config — streamed shard by shard. Reads
the files only (the checkpoint's shipped code never runs); ONNX exports cannot be restored (the
graph does not keep the permutation)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from editor.checkpoint.verification import NA_PATCH, _patch_names, _strip, is_patch_tensor, require_ok, verify, weight_files
from editor.errors import EditorError
from editor.io import atomic_directory, check_destination
from editor.manifest import CARD, CONFIG, DEFAULT_SHARD, EDIT_KEY, INDEX, MANIFEST, RUNTIME_FILES
from editor.methods.neuron_adjust import inverse_permutation
from editor.runtime.configuration_skill_editor import BASE_CONFIG_KEY
from editor.runtime.modeling_skill_editor import arch_spec

def _index(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    return t.index_select(dim, idx).contiguous()


def unpermute_plan(spec, layer: int, perm: torch.Tensor, shapes: dict[str, tuple]) -> dict[str, tuple[int, torch.Tensor]]:
    """Undo ``editor.model.arch.permute_neurons`` for one layer, as an index per tensor (names
    relative to the base model, ``shapes``: every tensor's shape): {name: (dim, index)} — position
    j holds original neuron perm[j]; ``index_select(dim, index)`` puts every neuron back in place."""
    inv = inverse_permutation(perm.to(torch.int64))
    prefix = f"{spec.layers}.{layer}."
    plan: dict[str, tuple[int, torch.Tensor]] = {}

    def rows(path: str, fused: bool) -> None:
        w_name = prefix + path + ".weight"
        if w_name not in shapes:
            raise EditorError(f"restore: tensor {w_name} not found")
        out_dim = 1 if spec.layout == "conv1d" else 0
        idx = inv
        if fused:
            half = shapes[w_name][out_dim] // 2
            idx = torch.cat([inv, inv + half])
        plan[w_name] = (out_dim, idx)
        b_name = prefix + path + ".bias"
        if b_name in shapes:
            plan[b_name] = (0, idx)

    rows(spec.pre, spec.fused)
    if spec.up is not None:
        rows(spec.up, False)
    d_name = prefix + spec.down + ".weight"
    if d_name not in shapes:
        raise EditorError(f"restore: tensor {d_name} not found")
    plan[d_name] = (0 if spec.layout == "conv1d" else 1, inv)
    return plan


# safetensors' dtype names (``get_slice(...).get_dtype()``) → torch, to plan shards without loading
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def restore(ckpt, out, *, overwrite: bool = False, max_shard_size=DEFAULT_SHARD, verify_first: bool = True) -> Path:
    """Write the exact base model of a patched checkpoint to ``out`` (atomically): neurons back
    in their original order, patch tensors dropped, the base config (plain architecture),
    tokenizer and generation config. Loads without custom code. Streams: the output shards are
    planned from the tensors' shapes, and each is read, un-permuted and written before the next,
    so memory holds one output shard (``max_shard_size``), not the model."""
    from transformers import AutoConfig

    ckpt = Path(ckpt)
    out = check_destination(out, overwrite)
    if out.resolve() == ckpt.resolve():
        raise EditorError("restore: --out must differ from the checkpoint")
    rep = verify(ckpt)
    if rep.format == "onnx":
        raise EditorError(f"restore: {ckpt} is an ONNX export; restore works on HF checkpoints "
                          f"(the graph does not keep the neuron permutation): restore the HF export of the same recipe")
    if verify_first and not rep.ok:
        require_ok(rep, "restore: ")
    if not rep.patched:
        kind = ((rep.manifest or {}).get("edit") or {}).get("methods") or []
        if "prune" in kind:
            raise EditorError("restore: a pruned checkpoint cannot be restored (the pruned weights are zeroed, not kept)")
        raise EditorError(f"restore: {ckpt} is a plain checkpoint; there is no patch to undo")
    cfg = rep.config
    edit = cfg.get(EDIT_KEY) or {}
    # the base configuration: BASE_CONFIG_KEY since format 2 of config.json, text_config before
    text = dict(cfg.get(BASE_CONFIG_KEY) or cfg.get("text_config") or {})
    model_type = text.pop("model_type", None) or edit.get("arch")
    if not model_type:
        raise EditorError(f"restore: config.json has no {BASE_CONFIG_KEY}.model_type")
    spec = arch_spec(model_type)
    sources, shapes, perms = _index_weights(ckpt, spec, edit)
    plan: dict[str, tuple[int, torch.Tensor]] = {}
    for layer, perm in perms.items():
        plan.update(unpermute_plan(spec, layer, perm, {k: v.shape for k, v in shapes.items()}))
    for k in ("_name_or_path", "transformers_version"):
        text.pop(k, None)
    if edit.get("base_architectures") and not text.get("architectures"):
        text["architectures"] = list(edit["base_architectures"])  # kept out of the base config (patch.checkpoint_config)
    base_config = AutoConfig.for_model(model_type, **text)
    skip = {CONFIG, MANIFEST, CARD, INDEX, *RUNTIME_FILES}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        _write_streaming(tmp, sources, shapes, plan, max_shard_size)
        base_config.save_pretrained(str(tmp))
        for p in sorted(ckpt.iterdir()):
            if p.is_file() and p.name not in skip and not p.name.endswith(".safetensors") and not p.name.startswith("."):
                shutil.copyfile(p, tmp / p.name)
    return Path(out)


def _index_weights(ckpt: Path, spec, edit: dict):
    """Without loading the weights: where each base tensor lives ({name: (file, key)}), its shape
    and dtype (meta tensors), and the NA permutations (small) of the edited layers."""
    from safetensors import safe_open

    files = weight_files(ckpt)
    if not files:
        raise EditorError(f"{ckpt}: no model.safetensors (or shard index) found")
    sources: dict[str, tuple[Path, str]] = {}
    shapes: dict[str, torch.Tensor] = {}
    perm_names = {name: int(i) for i in ((edit.get("neuron_adjust") or {}).get("counts") or {})
                  for name in _patch_names(spec, i, spec.pre, NA_PATCH, ("permutation",))}
    perms: dict[int, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    name = _strip(k)
                    if name in perm_names:
                        perms[perm_names[name]] = st.get_tensor(k)
                    if is_patch_tensor(name):
                        continue
                    sl = st.get_slice(k)
                    dtype = _ST_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise EditorError(f"restore: tensor {k} has an unsupported dtype {sl.get_dtype()}")
                    sources[name] = (f, k)
                    shapes[name] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
        except FileNotFoundError:
            raise EditorError(f"{ckpt}: weight file {f.name} is missing") from None
        except EditorError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise EditorError(f"{ckpt}: cannot read {f.name}: {e}") from None
    missing = sorted(n for n, i in perm_names.items() if i not in perms)
    if missing:
        raise EditorError(f"restore: permutation {missing[0]} is missing")
    return sources, shapes, dict(sorted(perms.items()))


def _write_streaming(tmp: Path, sources: dict, shapes: dict, plan: dict, max_shard_size) -> None:
    """Write the base state dict shard by shard (the shard plan and file names of
    ``huggingface_hub``, as ``save_pretrained`` names them); only one output shard in memory."""
    from contextlib import ExitStack

    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors import safe_open
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(shapes, max_shard_size=max_shard_size)
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for filename, names in split.filename_to_tensors.items():
            shard = {}
            for name in names:
                f, key = sources[name]
                if f not in handles:
                    handles[f] = stack.enter_context(safe_open(str(f), framework="pt"))
                t = handles[f].get_tensor(key)
                if name in plan:
                    dim, idx = plan[name]
                    t = _index(t, dim, idx)
                shard[name] = t.contiguous()
            save_file(shard, str(tmp / filename), metadata={"format": "pt"})
            del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
