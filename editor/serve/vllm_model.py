"""``SkillEditorForCausalLM`` for vLLM: vLLM's own base model with the edit installed inside.

The checkpoint's base config (``text_config``) is handed to vLLM's registry, which builds its own
implementation of the base architecture (paged attention, fused gate/up projection, its kernels).
The edit is then installed on that module tree the way the shipped runtime installs it on the
transformers one: the pre-activation projection's class is swapped for a subclass whose output
goes through the runtime's own ``NeuronAdjust`` (same constants, same float64 arithmetic; the
selected neurons were permuted to the front, so the gate half of vLLM's merged ``gate_up_proj``
starts with them), and the down projection's class for one that records the key test
(``KeySpace`` / the pooled linear ``KeyScore`` weights). After each forward pass the per-token
tests are reduced to one row per request (vLLM's flattened batch, from the attention metadata's
``query_start_loc``) and published to the logits processor (``editor.serve.vllm_guard``).

Loading is fail-closed like the runtime: a missing, unexpected or mis-shaped patch tensor, or
patch tensors whose digest differs from ``config.json``'s ``patch_digest``, stop the load.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from editor.runtime.modeling_skill_editor import (
    FORMAT,
    FORMAT_VERSION,
    IntegrityError,
    KeyScore,
    KeySpace,
    NeuronAdjust,
    arch_spec,
    patch_digest,
)
from editor.serve.vllm_guard import GuardError, GuardSpec, StepResult, channel_for

from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix


@dataclass(frozen=True)
class VllmSpec:
    """Where vLLM's implementation keeps one decoder layer's MLP pieces (paths from the root of
    vLLM's ``*ForCausalLM`` module; ``pre`` of a gated MLP is vLLM's merged [gate | up] projection).
    ``tests/test_layout.py`` ties this table to the runtime's ``ARCHITECTURES``."""

    layers: str
    pre: str
    down: str


_GATED = VllmSpec(layers="model.layers", pre="mlp.gate_up_proj", down="mlp.down_proj")
# model_type -> vLLM module paths. The gated ones are merged [gate | up] projections in vLLM, so
# the runtime's "first n channels of the gate" are the first n channels of the merged output.
VLLM_ARCHITECTURES: dict[str, VllmSpec] = {
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma": _GATED,
    "gemma2": _GATED,
    "gemma3_text": _GATED,
    "granite": _GATED,
    "phi3": _GATED,
    "gpt2": VllmSpec(layers="transformer.h", pre="mlp.c_fc", down="mlp.c_proj"),
    "opt": VllmSpec(layers="model.decoder.layers", pre="fc1", down="fc2"),
}


def _unwrap(out):
    """vLLM's parallel linear layers return (output, bias-to-add-later); the edit needs the
    pre-activation with its bias, so a deferred bias is refused."""
    if isinstance(out, tuple):
        y, bias = out
        if bias is not None:
            raise IntegrityError("skill-editor (vLLM): a projection with a deferred bias (skip_bias_add) is not supported")
        return y, True
    return out, False


class _NeuronAdjusted:
    """Swapped in over vLLM's pre-activation projection: its output goes through NA."""

    def forward(self, *args, **kwargs):
        y, tupled = _unwrap(super().forward(*args, **kwargs))
        y = self.neuron_adjust(y, inplace=True)
        return (y, None) if tupled else y


class _KeyGuarded:
    """Swapped in over vLLM's down projection: its input (the key) is tested."""

    def forward(self, x, *args, **kwargs):
        self.key_space.observe(x)
        return super().forward(x, *args, **kwargs)


class _StepKeySpace(KeySpace):
    """The runtime's box, fed vLLM's flattened tokens: ``inside`` is per token [T]."""


class _StepKeyScore(KeyScore):
    """The runtime's linear-detector weights; ``observe`` max-pools the key per request row of
    the current step (``bind_step``) instead of per padded batch row."""

    def bind_step(self, rows: torch.Tensor | None, n_rows: int) -> None:
        self._step = (rows, n_rows)

    def observe(self, key: torch.Tensor) -> None:
        rows, n_rows = getattr(self, "_step", (None, 0))
        if rows is None:
            self.score = None
            return
        k = key[: rows.numel()]
        # pooled in the key's own dtype, then cast (as the runtime's KeyScore): a max is exact in any
        # dtype, and a step no longer holds a float32 copy of every token's key
        pooled = torch.full((n_rows, k.shape[-1]), float("-inf"), device=k.device, dtype=k.dtype)
        self.score = pooled.index_reduce_(0, rows, k, "amax").float()  # [R, d]: the step's pool, not yet a score


_SWAPPED: dict[tuple[type, type], type] = {}


def _swap(module: nn.Module, mixin: type) -> None:
    cls = type(module)
    new = _SWAPPED.get((mixin, cls))
    if new is None:
        new = type(f"{mixin.__name__.strip('_')}{cls.__name__}", (mixin, cls), {})
        _SWAPPED[(mixin, cls)] = new
    module.__class__ = new


class SkillEditorForCausalLM(nn.Module):
    """vLLM model class for ``architectures: ["SkillEditorForCausalLM"]`` checkpoints."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        edit = dict(getattr(config, "skill_editor", None) or {})
        _check_edit(edit)
        _check_engine(vllm_config)
        text = base_config(config)
        model_type = text.model_type
        if model_type not in VLLM_ARCHITECTURES:
            raise IntegrityError(
                f"skill-editor (vLLM): base architecture {model_type!r} is not supported by the vLLM plugin; "
                f"supported: {', '.join(sorted(VLLM_ARCHITECTURES))}"
            )
        self.edit = edit
        self.hf_spec = arch_spec(model_type)
        self.vspec = VLLM_ARCHITECTURES[model_type]
        archs = edit.get("base_architectures") or _default_architectures(model_type)
        self.model = init_vllm_registered_model(
            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"), hf_config=text, architectures=list(archs)
        )
        self.make_empty_intermediate_tensors = getattr(self.model, "make_empty_intermediate_tensors", None)
        self._targets: dict[str, torch.Tensor] = {}  # checkpoint patch name (base-relative) -> buffer
        self._guards: list[KeySpace] = []
        self._install(edit, int(getattr(text, "intermediate_size", 0) or 0))
        self.channel = channel_for(vllm_config)
        ks = edit.get("key_space")
        if ks:
            if not self.channel.guards:
                raise GuardError(
                    "skill-editor (vLLM): the key-space logits processor is not active in this engine "
                    "(speculative decoding or a platform without custom logits processors): refusing to serve unguarded"
                )
            self._ks = ks
        else:
            self._ks = None
        self._loaded = False

    # -- installation
    def _module(self, layer: int, path: str) -> nn.Module:
        return self.model.get_submodule(self.vspec.layers)[layer].get_submodule(path)

    def _install(self, edit: dict, d_ff_cfg: int) -> None:
        na = edit.get("neuron_adjust")
        if na:
            for layer_str, n in sorted(na["counts"].items(), key=lambda kv: int(kv[0])):
                layer = int(layer_str)
                pre = self._module(layer, self.vspec.pre)
                d_ff = _d_ff(self._module(layer, self.vspec.down), d_ff_cfg)
                _swap(pre, _NeuronAdjusted)
                device = next(pre.parameters()).device
                pre.neuron_adjust = NeuronAdjust(int(n), d_ff, mode=na["mode"], seed=int(na.get("seed", 0)), layer=layer).to(device)
                self._register(f"{self.hf_spec.layers}.{layer}.{self.hf_spec.pre}.neuron_adjust", pre.neuron_adjust)
        ks = edit.get("key_space")
        if ks:
            guard_cls = {"box": _StepKeySpace, "linear": _StepKeyScore}.get(ks.get("detector", "box"))
            if guard_cls is None:
                raise IntegrityError(f"skill-editor (vLLM): unknown key_space detector {ks.get('detector')!r}")
            for layer in ks["layers"]:
                layer = int(layer)
                down = self._module(layer, self.vspec.down)
                _swap(down, _KeyGuarded)
                device = next(down.parameters()).device
                down.key_space = guard_cls(_d_ff(down, d_ff_cfg)).to(device)
                self._guards.append(down.key_space)
                self._register(f"{self.hf_spec.layers}.{layer}.{self.hf_spec.down}.key_space", down.key_space)

    def _register(self, prefix: str, module: nn.Module) -> None:
        for name, buf in module.named_buffers(recurse=False):
            self._targets[f"{prefix}.{name}"] = buf

    # -- vLLM interface
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.model.compute_logits(hidden_states)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs):
        if not self._loaded:
            raise IntegrityError("skill-editor (vLLM): forward before the patch tensors were loaded and verified")
        if self._ks is None:
            return self.model(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        qsl = _query_start_loc()
        rows = None
        n_rows = 0
        if qsl is not None:
            n_rows = qsl.numel() - 1
            rows = torch.repeat_interleave(torch.arange(n_rows, device=positions.device), qsl.diff().to(positions.device))
        for g in self._guards:
            g.inside = None
            if isinstance(g, _StepKeyScore):
                g.bind_step(rows, n_rows)
        fid = self.channel.next_forward_id()
        self.channel.publish(None)
        hidden = self.model(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if qsl is not None:
            self.channel.publish(self._step_result(fid, qsl, positions))
        return hidden

    def _step_result(self, fid: int, qsl: torch.Tensor, positions: torch.Tensor) -> StepResult:
        n_rows = qsl.numel() - 1
        last = (qsl[1:] - 1).clamp(min=0).to(positions.device)
        seq_lens = positions[last].to(torch.int64) + 1
        inside = pooled = None
        if self._ks.get("detector", "box") == "linear":
            parts = [g.score for g in self._guards]
            if any(p is None for p in parts):
                raise GuardError("skill-editor (vLLM): a guarded layer did not see this step's keys")
            pooled = torch.cat(parts, dim=-1)
            for g in self._guards:
                g.score = None
        else:
            for g in self._guards:
                if g.inside is None:
                    raise GuardError("skill-editor (vLLM): a guarded layer did not see this step's keys")
                t = g.inside[last]
                inside = t if inside is None else (inside | t)
                g.inside = None
        # empty segments (padding rows) have no token: they never abstain
        empty = qsl.diff() == 0
        if inside is not None:
            inside = inside & ~empty.to(inside.device)
        return StepResult(forward_id=fid, seq_lens=seq_lens.cpu(), inside=None if inside is None else inside.cpu(),
                          pooled=None if pooled is None else pooled.cpu())

    # -- weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        patch: dict[str, torch.Tensor] = {}

        def base():
            for name, tensor in weights:
                rel = name[len("model."):] if name.startswith("model.") else name
                if ".neuron_adjust." in rel or ".key_space." in rel:
                    patch[rel] = tensor
                else:
                    yield rel, tensor

        loaded = self.model.load_weights(base())
        self._load_patch(patch)
        names = {f"model.{n}" for n in (loaded or ())}
        return names

    def _load_patch(self, patch: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self._targets) - set(patch))
        if missing:
            raise IntegrityError(f"skill-editor checkpoint is missing patch tensors: {', '.join(missing[:5])}")
        unexpected = sorted(set(patch) - set(self._targets))
        if unexpected:
            raise IntegrityError(f"skill-editor checkpoint has patch tensors this edit does not describe: {', '.join(unexpected[:5])}")
        expected = self.edit.get("patch_digest")
        if not expected:
            raise IntegrityError("skill-editor checkpoint has no patch_digest in config.json")
        got = patch_digest(patch)
        if got != expected:
            raise IntegrityError(
                f"skill-editor patch tensors do not match the digest in config.json (expected {expected[:12]}…, got {got[:12]}…)"
            )
        for name, tensor in patch.items():
            target = self._targets[name]
            if tuple(target.shape) != tuple(tensor.shape) or target.dtype != tensor.dtype:
                raise IntegrityError(f"skill-editor patch tensor {name}: {tuple(tensor.shape)} {tensor.dtype}, "
                                     f"expected {tuple(target.shape)} {target.dtype}")
            with torch.no_grad():
                target.copy_(tensor.to(target.device))
        self._publish_spec()
        self._loaded = True

    def _publish_spec(self) -> None:
        ks = self._ks
        if ks is None:
            return
        forced = [int(t) for t in (ks.get("refusal_ids") or [])]
        eos = _eos_ids(self.edit, self)
        if not forced or (eos and forced[-1] not in eos):
            forced = forced + eos[:1]
        if not forced:
            raise IntegrityError("skill-editor checkpoint has neither refusal ids nor an EOS id to stop abstaining requests")
        detector = ks.get("detector", "box")
        linear = []
        if detector == "linear":
            start = 0
            for g in self._guards:
                d = g.weight.numel()
                linear.append((slice(start, start + d), g.weight.detach().float().cpu(), g.bias.detach().float().cpu()))
                start += d
        self.channel.spec = GuardSpec(detector=detector, check=ks.get("check", "every_call"), forced=forced, linear=linear)


def _d_ff(down: nn.Module, fallback: int) -> int:
    size = getattr(down, "input_size", None) or getattr(down, "input_size_per_partition", None)
    return int(size or fallback)


def base_config(config):
    """The base model's config object. The plugin has vLLM read a checkpoint's config with the
    checkpoint's config class (``vllm_plugin``), whose ``text_config`` is the base config; anything
    else means the config was read as a plain base config, without the edit's class."""
    from transformers import PretrainedConfig

    text = getattr(config, "text_config", None)
    if not isinstance(text, PretrainedConfig):
        raise IntegrityError("skill-editor (vLLM): the checkpoint's config was not read with its own config class "
                             "(is the skill-editor plugin loaded in every vLLM process?)")
    return text


def _default_architectures(model_type: str) -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is None:
        raise IntegrityError(f"skill-editor (vLLM): no causal-LM class known for base model_type {model_type!r}")
    return [name]


def _eos_ids(edit: dict, model: SkillEditorForCausalLM) -> list[int]:
    eos = edit.get("eos_token_id")
    if eos is None:
        cfg = model.model.config if hasattr(model.model, "config") else None
        eos = getattr(cfg, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _query_start_loc() -> torch.Tensor | None:
    """The current batch's request boundaries (vLLM flattens requests into one token axis), from
    the attention metadata; None outside a real step (profiling / dummy runs)."""
    if not is_forward_context_available():
        return None
    meta = get_forward_context().attn_metadata
    if meta is None:
        return None
    if isinstance(meta, list):
        raise GuardError("skill-editor (vLLM): micro-batched (DBO) forward passes are not supported")
    for m in meta.values():
        qsl = getattr(m, "query_start_loc", None)
        if qsl is not None:
            return qsl
    raise GuardError(f"skill-editor (vLLM): attention backend {type(next(iter(meta.values()))).__name__} "
                     "exposes no query_start_loc; the per-request guard cannot be placed")


def _check_edit(edit: dict) -> None:
    """The runtime's own refusals (SkillEditorForCausalLM.__init__), for the same checkpoints."""
    if edit.get("format") != FORMAT:
        raise IntegrityError("not a skill-editor checkpoint: config.skill_editor.format is missing")
    if int(edit.get("version", 0)) > FORMAT_VERSION:
        raise IntegrityError(f"skill-editor patch format {edit.get('version')} is newer than this plugin ({FORMAT_VERSION})")
    ks = edit.get("key_space") or {}
    if ks.get("detector", "box") == "linear" and ks.get("check") != "prompt":
        raise IntegrityError("skill-editor checkpoint: the linear key_space detector needs key_space.check 'prompt'")


def _check_engine(vllm_config: VllmConfig) -> None:
    """Engine settings under which the per-request guard would be wrong are refused up front."""
    pc = vllm_config.parallel_config
    if pc.tensor_parallel_size > 1 or pc.pipeline_parallel_size > 1:
        raise IntegrityError("skill-editor (vLLM): tensor / pipeline parallelism is not supported "
                             "(the patch slices and the key test span the whole MLP); use data parallelism")
    if vllm_config.speculative_config is not None:
        raise IntegrityError("skill-editor (vLLM): speculative decoding is not supported (vLLM drops custom logits processors with it)")
