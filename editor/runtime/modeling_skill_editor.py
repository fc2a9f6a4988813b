"""Runtime of a skill-editor checkpoint: Neuron Adjust (NA) and Key Space Detection (KSD).

How to audit this file: it imports only ``torch`` and ``transformers``. It builds the base model
from ``config.text_config`` and changes it in two places only, per edited decoder layer:

* NA: the pre-activation module (``gate_proj``, ``fc1``, ``c_fc`` …) gets a child
  ``neuron_adjust`` (buffers ``a``, ``b``, ``c``, ``slope``, ``offset``, ``permutation``); its
  output's first ``n`` channels (the selected neurons, permuted to the front when the checkpoint was
  written) are remapped by ``neuron_adjust`` below. Modes: ``sample`` (seeded, one draw per
  element), ``expected``, ``hard``.
* KSD: the down projection gets a child ``key_space`` that tests its input (the key): a box
  (buffers ``lower`` / ``upper``: inside in every dimension at the row's last real token) or a
  linear score (buffers ``weight`` / ``bias``: the keys max-pooled over the call's real tokens,
  summed over the guarded layers, > 0). ``forward`` returns the decision as ``abstained`` (bool per
  row); ``generate`` stops abstained rows at once and answers them with ``refusal_ids``. The edit's
  ``key_space.check`` says which calls of ``generate`` decide: ``every_call`` (the prompt and each
  generated token) or ``prompt`` (the first call only).

Loading refuses a checkpoint whose patch tensors are missing or differ from
``config.skill_editor.patch_digest`` (sha256 of every patch tensor, see ``patch_digest``).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel, StoppingCriteria, StoppingCriteriaList
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # relative import inside a checkpoint (dynamic module) or the editor package
    from .configuration_skill_editor import SkillEditorConfig
except ImportError:  # pragma: no cover - loaded as a top-level module
    from configuration_skill_editor import SkillEditorConfig

FORMAT = "skill-editor/patch"
FORMAT_VERSION = 1
NA_MODES = ("sample", "expected", "hard")

# --------------------------------------------------------------------------------------------
# Architecture table: where the decoder layers are, which module outputs the neuron
# pre-activation, which module takes the key (down projection input).
#   layers: path from the *ForCausalLM root to the ModuleList of decoder layers
#   pre / up / down / act: paths from one decoder layer
#   layout: "linear" (weight [out, in]) or "conv1d" (GPT-2 Conv1D, weight [in, out])
#   fused: the pre module outputs [gate | up] (Phi-3 gate_up_proj); gate is the first half
#   flat: tokens are flattened to [batch*seq, d] inside the layer (OPT)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    layers: str
    pre: str
    down: str
    act: str
    up: str | None = None
    layout: str = "linear"
    fused: bool = False
    flat: bool = False

    @property
    def gated(self) -> bool:
        return self.up is not None or self.fused


_GATED = ArchSpec(layers="model.layers", pre="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj", act="mlp.act_fn")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma": _GATED,
    "gemma2": _GATED,
    "gemma3_text": _GATED,
    "olmo": _GATED,
    "olmo2": _GATED,
    "granite": _GATED,
    "phi3": ArchSpec(layers="model.layers", pre="mlp.gate_up_proj", down="mlp.down_proj", act="mlp.activation_fn", fused=True),
    "phi": ArchSpec(layers="model.layers", pre="mlp.fc1", down="mlp.fc2", act="mlp.activation_fn"),
    "gpt2": ArchSpec(layers="transformer.h", pre="mlp.c_fc", down="mlp.c_proj", act="mlp.act", layout="conv1d"),
    "gpt_neox": ArchSpec(layers="gpt_neox.layers", pre="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h", act="mlp.act"),
    "opt": ArchSpec(layers="model.decoder.layers", pre="fc1", down="fc2", act="activation_fn", flat=True),
}


def arch_spec(model_type: str) -> ArchSpec:
    """The table entry for ``model_type``; a ValueError naming the supported ones otherwise."""
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise ValueError(f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return spec


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return model.get_submodule(spec.layers)


def _d_ff(down: nn.Module, spec: ArchSpec) -> int:
    w = down.weight
    return int(w.shape[0] if spec.layout == "conv1d" else w.shape[1])


def _apply_keep_dtype(module: nn.Module, fn) -> nn.Module:
    """``Module._apply`` for the constant holders: buffers follow device moves but keep their
    dtype, so ``model.half()`` / ``model.to(torch.bfloat16)`` cannot round (or overflow) them."""
    for key, buf in module._buffers.items():
        if buf is None:
            continue
        moved = fn(buf)
        if moved.dtype != buf.dtype:
            moved = buf.to(device=moved.device)
        module._buffers[key] = moved
    return module


# --------------------------------------------------------------------------------------------
# Neuron Adjust
# --------------------------------------------------------------------------------------------


def neuron_adjust(x: torch.Tensor, a, b, c, slope, offset, mode: str, generator=None) -> torch.Tensor:
    """Apply NA to ``x[..., n]`` in the constants' precision (float64); constants broadcast over
    the last dimension.

    λ(x) = a x² + b x + c;  π = sigmoid(λ);  x' = slope·x + offset.
    Why float64: with a σ at its 1e-6 floor, a, b, c reach ~1e12 while λ near the means is ~10, so
    float32 constants (ulp of c ~1e4) decide and map such neurons at random.
    """
    xf = x.to(a.dtype)
    lam = (a * xf + b) * xf + c
    mapped = slope * xf + offset
    fire = lam >= 0
    if mode == "hard":
        out = torch.where(fire, mapped, xf)
    elif mode == "expected":
        out = xf + torch.where(fire, torch.sigmoid(lam), torch.zeros_like(lam)) * (mapped - xf)
    elif mode == "sample":
        u = torch.rand(xf.shape, generator=generator, device=xf.device, dtype=torch.float32)
        out = torch.where(fire & (u < torch.sigmoid(lam)), mapped, xf)
    else:
        raise ValueError(f"unknown neuron-adjust mode {mode!r}; expected one of {NA_MODES}")
    return out.to(x.dtype)


class NeuronAdjust(nn.Module):
    """Per-neuron NA constants of one layer, for its first ``n`` (permuted) intermediate neurons:
    ``CONSTANTS`` float64 [n] (kept float64 when the model is cast) and ``permutation`` int64
    [d_ff] (position j holds the base model's neuron ``permutation[j]``)."""

    CONSTANTS = ("a", "b", "c", "slope", "offset")
    TENSORS = CONSTANTS + ("permutation",)

    def __init__(self, n: int, d_ff: int, mode: str = "expected", seed: int = 0, layer: int = 0):
        super().__init__()
        for name in self.CONSTANTS:
            self.register_buffer(name, torch.zeros(n, dtype=torch.float64))
        self.register_buffer("permutation", torch.arange(d_ff, dtype=torch.int64))
        self.n = n
        self.mode = mode
        self.seed = seed
        self.layer = layer
        self._generators: dict[str, torch.Generator] = {}

    def extra_repr(self) -> str:
        return f"n={self.n}, mode={self.mode}"

    def _apply(self, fn, recurse=True):
        return _apply_keep_dtype(self, fn)

    def reset_rng(self, seed: int | None = None) -> None:
        if seed is not None:
            self.seed = seed
        self._generators = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed((int(self.seed) * 1_000_003 + 7919 * int(self.layer)) % (2**63 - 1))
            self._generators[key] = gen
        return gen

    def forward(self, y: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``inplace``: ``y`` is a fresh projection output nobody else holds (the patched module's
        own result), so the head may be overwritten instead of copying the whole tensor."""
        n = self.n
        if n == 0:
            return y
        gen = self._generator(y.device) if self.mode == "sample" else None
        head = neuron_adjust(y[..., :n], self.a, self.b, self.c, self.slope, self.offset, self.mode, gen)
        if not inplace or y.requires_grad or torch.compiler.is_exporting() or torch.compiler.is_compiling():
            return torch.cat([head, y[..., n:]], dim=-1)
        y[..., :n] = head
        return y


class NeuronAdjustedMixin:
    """Swapped in over the pre-activation module's class: its output goes through NA."""

    def forward(self, *args, **kwargs):
        return self.neuron_adjust(super().forward(*args, **kwargs), inplace=True)


# --------------------------------------------------------------------------------------------
# Key Space Detection
# --------------------------------------------------------------------------------------------


class Guard(nn.Module):
    """A test of one layer's key, run by ``observe`` in every forward call while ``enabled``
    (``generate`` switches it off once a ``check: prompt`` decision is taken); ``guard_decision``
    reads and clears what it recorded."""

    def __init__(self):
        super().__init__()
        self.enabled = True

    def _apply(self, fn, recurse=True):
        return _apply_keep_dtype(self, fn)

    def observe(self, key: torch.Tensor) -> None:
        raise NotImplementedError


class KeySpace(Guard):
    """The box: float32 ``lower`` / ``upper`` [d_ff] (±inf on unguarded dimensions). Records per
    token whether its key lies inside in every dimension (``inside``)."""

    TENSORS = ("lower", "upper")

    def __init__(self, d_ff: int):
        super().__init__()
        self.register_buffer("lower", torch.full((d_ff,), float("-inf"), dtype=torch.float32))
        self.register_buffer("upper", torch.full((d_ff,), float("inf"), dtype=torch.float32))
        self.inside: torch.Tensor | None = None

    def observe(self, key: torch.Tensor) -> None:
        if not self.enabled:
            return
        k = key.float()
        self.inside = ((k >= self.lower) & (k <= self.upper)).all(dim=-1)


class KeyScore(Guard):
    """One layer's share of the pooled linear detector: float32 ``weight`` [d_ff] and ``bias``
    [1]. Records per row ``weight · maxpool(key) + bias`` (``score``), the key max-pooled over the
    real tokens of the current call, so a query is judged by all of its tokens, not only the last.
    ``bind`` gives the call's attention mask (past + current columns; None: every token is real)."""

    TENSORS = ("weight", "bias")

    def __init__(self, d_ff: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(d_ff, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(1, dtype=torch.float32))
        self.score: torch.Tensor | None = None
        self._call: tuple | None = None

    def bind(self, attention_mask, batch: int, seq: int) -> None:
        self._call = (attention_mask, batch, seq)

    def observe(self, key: torch.Tensor) -> None:
        if not self.enabled:
            return
        if self._call is not None:
            mask, batch, seq = self._call
        else:  # not called through the checkpoint class: one call, every token real
            mask, batch, seq = (None, key.shape[0], key.shape[1]) if key.dim() == 3 else (None, 1, key.shape[0])
        k = key.reshape(batch, seq, -1)
        if mask is not None and mask.dim() == 2:
            real = mask[:, -seq:].to(device=k.device, dtype=torch.bool)
            k = k.masked_fill(~real[:, :, None], float("-inf"))
        # pooled in the key's own dtype, then cast: a max is exact in any dtype and float32 holds every
        # bfloat16 / float16 value, so the score is the same while the call holds one key-sized copy
        # (the masked one) instead of two float32 ones — 4x less for a half-precision model's prefill
        self.score = self.pooled_score(k.amax(dim=1))

    def pooled_score(self, pooled: torch.Tensor) -> torch.Tensor:
        """Per row ``weight · pooled + bias`` of keys already max-pooled ([rows, d_ff], any float dtype)."""
        pooled = pooled.float()
        # a row without real tokens pools to -inf: score it 0 (its decision is masked out anyway)
        pooled = torch.where(torch.isfinite(pooled), pooled, torch.zeros_like(pooled))
        return pooled @ self.weight + self.bias


class KeySpaceGuardedMixin:
    """Swapped in over the down projection's class: its input (the key) is tested."""

    def forward(self, hidden, *args, **kwargs):
        self.key_space.observe(hidden)
        return super().forward(hidden, *args, **kwargs)


GUARDS = {"box": KeySpace, "linear": KeyScore}
# the child modules that hold the patch tensors: ``<module path>.<PATCH>.<tensor>``
PATCHES = ("neuron_adjust", "key_space")


def guards_of(model: nn.Module) -> list[Guard]:
    return [m for m in model.modules() if isinstance(m, Guard)]


def last_real_index(attention_mask: torch.Tensor | None, batch: int, seq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the last real token of each row in the current chunk, and whether there is one.

    ``attention_mask`` covers past + current tokens; the current chunk is its last ``seq`` columns.
    Works with left and right padding.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.full((batch,), seq - 1, device=device, dtype=torch.long), torch.ones(batch, dtype=torch.bool, device=device)
    m = attention_mask[:, -seq:].to(device=device, dtype=torch.long)
    pos = torch.arange(1, seq + 1, device=device, dtype=torch.long)
    idx = (m * pos).argmax(dim=-1)
    return idx, m.sum(dim=-1) > 0


def guard_decision(guards: list[Guard], attention_mask, batch: int, seq: int, device) -> torch.Tensor | None:
    """Per row: some box holds the key of its last real token, or the linear scores summed over
    their layers are > 0; rows without a real token never abstain. None when no guard recorded
    anything (none installed, or all switched off). Clears what the guards recorded."""
    inside = None  # [batch, seq]: some guarded layer's box holds the token's key
    score = None  # [batch]: the linear detector's score, summed over its layers
    for g in guards:
        if isinstance(g, KeyScore):
            if g.score is not None:
                s = g.score.reshape(batch).to(device)
                score = s if score is None else score + s
            g.score = None
            g._call = None
        elif isinstance(g, KeySpace) and g.inside is not None:
            t = g.inside.reshape(batch, seq).to(device)
            g.inside = None
            inside = t if inside is None else (inside | t)
    if inside is None and score is None:
        return None
    idx, has = last_real_index(attention_mask, batch, seq, device)
    row = torch.zeros_like(has)
    if inside is not None:
        row = row | inside.gather(1, idx[:, None])[:, 0]
    if score is not None:
        row = row | (score > 0)
    return row & has


# --------------------------------------------------------------------------------------------
# Installing the patches (zero-initialised; loading the checkpoint's weights fills them)
# --------------------------------------------------------------------------------------------

_SWAPPED: dict[tuple[type, type], type] = {}


def _rebind_dispatched(module: nn.Module) -> None:
    """accelerate's dispatch hooks (``device_map``) call ``module._old_forward``, bound to the class
    the module had at dispatch time; point it at the current class's forward."""
    if "_old_forward" in module.__dict__:
        module._old_forward = type(module).forward.__get__(module)


def _swap_class(module: nn.Module, mixin: type) -> None:
    cls = type(module)
    if issubclass(cls, mixin):
        return
    new = _SWAPPED.get((mixin, cls))
    if new is None:
        new = type(f"{mixin.__name__.replace('Mixin', '')}{cls.__name__}", (mixin, cls), {})
        _SWAPPED[(mixin, cls)] = new
    module.__class__ = new
    _rebind_dispatched(module)


def install_patches(model: nn.Module, model_type: str, edit: dict) -> None:
    """Attach NA / KSD modules to ``model`` as the ``skill_editor`` dict of the config describes
    them: ``neuron_adjust.counts`` (neurons per layer), ``key_space.layers`` and ``detector``."""
    spec = arch_spec(model_type)
    layers = decoder_layers(model, spec)
    na = edit.get("neuron_adjust")
    if na:
        for layer_str, n in sorted(na["counts"].items(), key=lambda kv: int(kv[0])):
            layer = int(layer_str)
            pre = layers[layer].get_submodule(spec.pre)
            down = layers[layer].get_submodule(spec.down)
            _swap_class(pre, NeuronAdjustedMixin)
            # on the module's own device (GPU / device_map="auto" / meta at load time)
            pre.neuron_adjust = NeuronAdjust(int(n), _d_ff(down, spec), mode=na["mode"], seed=int(na.get("seed", 0)),
                                             layer=layer).to(down.weight.device)
    ks = edit.get("key_space")
    if ks:
        guard = GUARDS.get(ks.get("detector", "box"))
        if guard is None:
            raise ValueError(f"unknown key_space detector {ks.get('detector')!r}; expected one of {', '.join(GUARDS)}")
        for layer in ks["layers"]:
            down = layers[int(layer)].get_submodule(spec.down)
            _swap_class(down, KeySpaceGuardedMixin)
            down.key_space = guard(_d_ff(down, spec)).to(down.weight.device)


def patch_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every NA / KSD tensor of ``model`` by its state-dict name."""
    return {name: t for name, t in model.state_dict().items() if any(f".{p}." in name for p in PATCHES)}


def patch_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of the patch tensors, names sorted. Names are
    relative to the base model, so the digest is the same in-process and inside a checkpoint."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# The checkpoint model
# --------------------------------------------------------------------------------------------


# The KV cache's name in transformers' model outputs and ``forward`` keywords: ``cache`` from 5.24
# on (there ``past_key_values`` is a deprecated alias, to be removed in 5.40), ``past_key_values``
# before. Read from the installed release, so a checkpoint uses the supported name on every
# release of the declared range and never goes through the alias.
CACHE_KEY = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


@dataclass
class SkillEditorCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``abstained`` (bool [batch]) when KSD is on."""

    abstained: torch.Tensor | None = None


@dataclass(eq=False)
class Abstention(StoppingCriteria):
    """The abstention state of one ``generate`` call: ``forward`` records the guard's decisions
    in it, and as a stopping criterion it finishes every row that abstained."""

    check: str  # "every_call" or "prompt": which forward calls decide
    eos_ids: list[int]
    decided: bool = False  # a call has decided (with check "prompt", the later calls are not tested)
    rows: torch.Tensor | None = None  # [batch] bool: the rows that abstained
    ended: torch.Tensor | None = None  # [batch] bool: rows that reached EOS first; never abstain later
    _eos: torch.Tensor | None = field(default=None, repr=False)

    @property
    def skip_test(self) -> bool:
        return self.check == "prompt" and self.decided

    def record(self, abstained: torch.Tensor) -> None:
        self.decided = True
        now = abstained
        if self.ended is not None and self.ended.shape == abstained.shape:
            now = abstained & ~self.ended.to(abstained.device)
        self.rows = now if self.rows is None or self.rows.shape != abstained.shape else (self.rows | now)

    def __call__(self, input_ids, scores, **kwargs):
        rows = self.rows
        if rows is None:
            rows = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        rows = rows.to(input_ids.device)
        if self.eos_ids:
            if self._eos is None or self._eos.device != input_ids.device:
                self._eos = torch.tensor(self.eos_ids, device=input_ids.device)
            eos = torch.isin(input_ids[:, -1], self._eos) & ~rows
            self.ended = eos if self.ended is None else (self.ended.to(input_ids.device) | eos)
        return rows


class IntegrityError(RuntimeError):
    pass


# Engines that decode outside ``generate`` would run NA but drop the abstention: they are refused
# (fail closed), never served a partial edit. vLLM runs the whole edit with the project's plugin.
ENGINE_REFUSAL = (
    "skill-editor checkpoint: {engine} runs the model outside transformers' generate, which would skip "
    "the edit's abstention; serve it with vLLM and the skill-editor plugin (pip install 'skill-editor[vllm]' "
    "into vLLM's environment) or with transformers (trust_remote_code=True)"
)


class SkillEditorPreTrainedModel(PreTrainedModel):
    config_class = SkillEditorConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def _init_weights(self, module):
        # Base weights come from the checkpoint; patch buffers too (a missing one is an error).
        pass


class SkillEditorForCausalLM(SkillEditorPreTrainedModel, GenerationMixin):
    """A base causal LM with NA / KSD patches installed; loads with ``trust_remote_code=True``."""

    def __init__(self, config: SkillEditorConfig):
        # what the caller asked for (None = the base architecture's own default, e.g. eager for
        # Gemma-2, which has no sdpa); read before PreTrainedModel resolves it for this wrapper
        requested_attn = getattr(config, "_attn_implementation_internal", None)
        super().__init__(config)
        edit = config.skill_editor or {}
        if edit.get("format") != FORMAT:
            raise IntegrityError("not a skill-editor checkpoint: config.skill_editor.format is missing")
        if int(edit.get("version", 0)) > FORMAT_VERSION:
            raise IntegrityError(f"skill-editor patch format {edit.get('version')} is newer than this runtime ({FORMAT_VERSION})")
        ks = edit.get("key_space") or {}
        if ks.get("detector", "box") == "linear" and ks.get("check") != "prompt":
            raise IntegrityError("skill-editor checkpoint: the linear key_space detector needs key_space.check 'prompt'")
        if ks and "text_generation_server" in sys.modules:  # TGI's AutoModel fallback: its own decode loop
            raise IntegrityError(ENGINE_REFUSAL.format(engine="text-generation-inference"))
        base_cfg = config.text_config
        base_cfg._attn_implementation = requested_attn
        self.model = AutoModelForCausalLM.from_config(base_cfg, dtype=getattr(config, "dtype", None))
        install_patches(self.model, edit["arch"], edit)
        self._abstention: Abstention | None = None  # set while ``generate`` runs
        self.post_init()

    @classmethod
    def is_backend_compatible(cls):
        """Asked (only) by serving engines' Transformers backends — vLLM's — before they run the
        model with their own attention and sampling loop, which skips ``generate``: refuse."""
        raise IntegrityError(ENGINE_REFUSAL.format(engine="this engine's Transformers backend"))

    # -- plumbing delegated to the base model
    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.model.set_output_embeddings(value)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.model.prepare_inputs_for_generation(*args, **kwargs)

    # -- integrity
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = [k for k in info.get("missing_keys", []) if any(f".{p}." in k for p in PATCHES)]
        if missing:
            raise IntegrityError(f"skill-editor checkpoint is missing patch tensors: {', '.join(sorted(missing)[:5])}")
        model.verify_patch()
        return (model, info) if want_info else model

    def verify_patch(self) -> None:
        """Refuse to run if the patch tensors differ from the digest recorded in the config."""
        expected = (self.config.skill_editor or {}).get("patch_digest")
        if not expected:
            raise IntegrityError("skill-editor checkpoint has no patch_digest in config.json")
        got = patch_digest(patch_tensors(self.model))
        if got != expected:
            raise IntegrityError(
                f"skill-editor patch tensors do not match the digest in config.json (expected {expected[:12]}…, got {got[:12]}…)"
            )

    def reset_neuron_adjust_rng(self, seed: int | None = None) -> None:
        for m in self.modules():
            if isinstance(m, NeuronAdjust):
                m.reset_rng(seed)

    # -- forward / generate
    def _guards(self) -> list[Guard]:
        """The guards, found once (patches are installed before the first forward; a plain list,
        so they are not registered twice as submodules)."""
        guards = self.__dict__.get("_guard_list")
        if guards is None:
            guards = self.__dict__["_guard_list"] = guards_of(self.model)
        return guards

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                logits_to_keep=0, **kwargs):
        # ``position_ids`` and ``logits_to_keep`` are named in the signature: ``generate`` derives
        # position ids from the attention mask (left padding) and asks for the last position's
        # logits only for models whose ``forward`` declares them.
        state = self._abstention
        guards = self._guards()
        skip = state is not None and state.skip_test
        ref = input_ids if input_ids is not None else inputs_embeds
        batch, seq = ref.shape[0], ref.shape[1]
        for g in guards:
            g.enabled = not skip
            if isinstance(g, KeyScore):
                g.bind(attention_mask, batch, seq)
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, logits_to_keep=logits_to_keep, **kwargs)
        finally:
            for g in guards:
                g.enabled = True
        abstained = guard_decision(guards, attention_mask, batch, seq, out.logits.device)
        if state is not None and abstained is not None:
            state.record(abstained)
        return SkillEditorCausalLMOutput(
            loss=out.get("loss"),
            logits=out.logits,
            **{CACHE_KEY: out.get(CACHE_KEY)},
            hidden_states=out.get("hidden_states"),
            attentions=out.get("attentions"),
            abstained=abstained,
        )

    def generate(self, *args, **kwargs):
        ks = (self.config.skill_editor or {}).get("key_space")
        if not ks:
            return super().generate(*args, **kwargs)
        stops = list(kwargs.pop("stopping_criteria", None) or [])
        gc = kwargs.get("generation_config") or self.generation_config
        eos = kwargs.get("eos_token_id", getattr(gc, "eos_token_id", None))
        state = Abstention(ks.get("check", "every_call"),
                           [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None])
        self._abstention = state
        try:
            out = super().generate(*args, stopping_criteria=StoppingCriteriaList(stops + [state]), **kwargs)
        finally:
            self._abstention = None
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        rows = state.rows if state.rows is not None else torch.zeros(sequences.shape[0], dtype=torch.bool)
        rows = rows.to(sequences.device)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        prompt_len = input_ids.shape[1] if isinstance(input_ids, torch.Tensor) else 0
        sequences = self._refuse(sequences, rows, prompt_len, ks)
        if isinstance(out, torch.Tensor):
            return sequences
        out.sequences = sequences
        out["abstained"] = rows
        return out

    def _refuse(self, sequences: torch.Tensor, rows: torch.Tensor, prompt_len: int, ks: dict) -> torch.Tensor:
        """Replace the continuation of abstained rows by the refusal tokens (then padding)."""
        if not bool(rows.any()):
            return sequences
        refusal = torch.tensor(ks.get("refusal_ids") or [], dtype=sequences.dtype, device=sequences.device)
        pad = self.generation_config.pad_token_id
        if pad is None:
            pad = self.generation_config.eos_token_id
        if isinstance(pad, (list, tuple)):
            pad = pad[0]
        pad = 0 if pad is None else int(pad)
        width = max(sequences.shape[1], prompt_len + refusal.numel())
        if width > sequences.shape[1]:
            extra = torch.full((sequences.shape[0], width - sequences.shape[1]), pad, dtype=sequences.dtype, device=sequences.device)
            sequences = torch.cat([sequences, extra], dim=1)
        sequences = sequences.clone()
        idx = rows.nonzero()[:, 0]
        sequences[idx, prompt_len:] = pad
        sequences[idx, prompt_len : prompt_len + refusal.numel()] = refusal
        return sequences
