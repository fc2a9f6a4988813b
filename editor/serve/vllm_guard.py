"""Key Space Detection per request in vLLM: the channel from the model to a v1 logits processor.

vLLM runs many requests in one flattened forward pass and samples outside the model, so the
abstention that ``generate`` does in the shipped runtime is split in two here:

* the model (``editor.serve.vllm_model``) tests the key of every scheduled token and publishes,
  after each forward pass, one row per request of the batch (the order of the logits rows): the
  position + 1 of the row's last scheduled token, and either the box test at that token or the
  row's keys max-pooled over the step's tokens (linear detector);
* ``SkillEditorGuard`` (a ``vllm.v1.sample.logits_processor.LogitsProcessor``, loaded by vLLM
  from the ``vllm.logits_processors`` entry point) keeps per-request state across steps — prompt
  length, running pool across prefill chunks, the decision, how much of the refusal was emitted —
  and, for an abstaining request, masks every logit but the next refusal token (then EOS).

Both halves live in the worker process; they meet in a ``GuardChannel`` keyed by the engine's
``VllmConfig.instance_id``. Decision rules are the runtime's (DESIGN §3): box — abstain when the
key at the request's last prompt token lies in the box of some guarded layer; ``check:
every_call`` — also at every generated token fed back; linear — the sum over layers of
``weight · max-pool(prompt keys) + bias`` > 0, decided once the last prompt chunk has run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from editor.serve import ARCHITECTURE

try:
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates
except ImportError as exc:  # pragma: no cover - only imported by vLLM itself
    raise ImportError("editor.serve.vllm_guard needs vLLM (pip install 'skill-editor[vllm]' into vLLM's environment)") from exc

if TYPE_CHECKING:
    from vllm.config import VllmConfig


class GuardError(RuntimeError):
    """The per-request decision could not be taken: the engine stops rather than answer unguarded."""


@dataclass
class GuardSpec:
    """What the model tells the logits processor once, at load: the rule and the refusal."""

    detector: str  # "box" | "linear"
    check: str  # "prompt" | "every_call"
    forced: list[int]  # refusal ids, ending with EOS
    # linear detector: per guarded layer (slice into the pooled vector, weight [d], bias [1])
    linear: list[tuple[slice, torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class StepResult:
    """One forward pass, one entry per request row (the order of the logits rows)."""

    forward_id: int
    seq_lens: torch.Tensor  # int64 [R]: position of the row's last scheduled token + 1
    inside: torch.Tensor | None  # bool [R]: box test at that token (any guarded layer)
    pooled: torch.Tensor | None  # float32 [R, D]: the step's keys max-pooled per row (-inf: none)
    _lists: tuple | None = None

    def lists(self) -> tuple[list[int], list[bool] | None]:
        if self._lists is None:
            self._lists = (self.seq_lens.tolist(), None if self.inside is None else self.inside.tolist())
        return self._lists


class GuardChannel:
    """Per engine (worker process): the spec published by the model, the result of the last
    forward pass, and the guards (logits processors) that consume it."""

    def __init__(self) -> None:
        self.spec: GuardSpec | None = None
        self.result: StepResult | None = None
        self.forward_id = 0
        self.guards: list["SkillEditorGuard"] = []

    def publish(self, result: StepResult | None) -> None:
        self.result = result

    def next_forward_id(self) -> int:
        self.forward_id += 1
        return self.forward_id


_CHANNELS: dict[str, GuardChannel] = {}


def channel_for(vllm_config: "VllmConfig") -> GuardChannel:
    return _CHANNELS.setdefault(str(vllm_config.instance_id), GuardChannel())


def is_skill_editor(vllm_config: "VllmConfig") -> bool:
    mc = vllm_config.model_config
    if mc is None:
        return False
    archs = list(getattr(mc.hf_config, "architectures", None) or [])
    return getattr(mc.hf_config, "model_type", None) == "skill_editor" or ARCHITECTURE in archs


def has_key_space(vllm_config: "VllmConfig") -> bool:
    edit = getattr(vllm_config.model_config.hf_config, "skill_editor", None) or {}
    return bool(edit.get("key_space"))


@dataclass
class _Request:
    prompt_len: int
    decided: bool = False
    abstain: bool = False
    emitted: int = 0  # refusal tokens forced so far
    pool: torch.Tensor | None = None  # linear detector: running max over the prompt's chunks


class SkillEditorGuard(LogitsProcessor):
    """Forces the refusal for the requests whose key falls in the guard; inert for other models.

    Not argmax-invariant (it decides greedy outputs), so vLLM applies it to every step, after its
    built-in processors (min_tokens, logit_bias): the forced token wins over them.
    """

    def __init__(self, vllm_config: "VllmConfig", device: torch.device, is_pin_memory: bool) -> None:
        self.active = is_skill_editor(vllm_config) and has_key_space(vllm_config)
        self.reqs: dict[int, _Request] = {}
        self.channel = channel_for(vllm_config) if self.active else None
        self.consumed = 0
        if self.channel is not None:
            self.channel.guards.append(self)

    def is_argmax_invariant(self) -> bool:
        return not self.active

    def _spec(self) -> GuardSpec:
        spec = self.channel.spec if self.channel is not None else None
        if spec is None:
            raise GuardError("skill-editor: the model did not publish its key-space guard (fail closed)")
        return spec

    def _new_request(self, params, prompt_tok_ids, output_tok_ids) -> _Request:
        if prompt_tok_ids is None:
            raise GuardError("skill-editor: a request without prompt token ids cannot be guarded (prompt embeddings are refused)")
        req = _Request(prompt_len=len(prompt_tok_ids))
        if output_tok_ids:
            # resumed after preemption: the decision was taken before; an abstaining request is
            # recognised by its output, which is a prefix of the forced refusal
            forced = self._spec().forced
            out = list(output_tok_ids)
            req.decided = True
            if len(out) <= len(forced) and out == forced[: len(out)]:
                req.abstain, req.emitted = True, len(out)
        return req

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if self.active:
            process_dict_updates(self.reqs, batch_update, self._new_request)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.active or not self.reqs:
            return logits
        spec = self._spec()
        result = self.channel.result
        fresh = result is not None and result.forward_id > self.consumed
        rows: list[int] = []
        toks: list[int] = []
        n_rows = logits.shape[0]
        for idx, req in self.reqs.items():
            if idx >= n_rows:
                raise GuardError(f"skill-editor: request row {idx} outside the {n_rows} logits rows")
            if not req.abstain and not (req.decided and spec.check == "prompt"):
                if not fresh:
                    raise GuardError("skill-editor: no key-space result for this step (fail closed)")
                req.abstain = self._decide(req, idx, result, spec)
            if req.abstain:
                rows.append(idx)
                toks.append(spec.forced[min(req.emitted, len(spec.forced) - 1)])
                req.emitted += 1
        if fresh:
            self.consumed = result.forward_id
        if rows:
            r = torch.tensor(rows, device=logits.device)
            logits[r] = float("-inf")
            logits[r, torch.tensor(toks, device=logits.device)] = 0.0
        return logits

    def _decide(self, req: _Request, idx: int, result: StepResult, spec: GuardSpec) -> bool:
        seq_lens, inside = result.lists()
        if idx >= len(seq_lens):
            raise GuardError(f"skill-editor: the forward pass reported {len(seq_lens)} rows, row {idx} missing")
        if spec.detector == "linear":
            row = result.pooled[idx]
            req.pool = row.clone() if req.pool is None else torch.maximum(req.pool, row)
        if seq_lens[idx] < req.prompt_len:  # a prefill chunk before the last one: nothing to decide
            return False
        if req.decided:  # every_call: the generated token fed back in this step
            return bool(inside[idx])
        req.decided = True
        if spec.detector == "linear":
            pool = torch.where(torch.isfinite(req.pool), req.pool, torch.zeros_like(req.pool))
            req.pool = None
            score = None
            for sl, weight, bias in spec.linear:  # the runtime's order and arithmetic (KeyScore)
                s = pool[sl] @ weight + bias
                score = s if score is None else score + s
            return bool((score > 0).item())
        return bool(inside[idx])
