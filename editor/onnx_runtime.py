"""Greedy generation with ONNX Runtime for a directory written by ``editor.export.onnx``.

Needs only ``onnxruntime``, ``numpy`` and a tokenizer library (``transformers`` when installed, else
``tokenizers`` reading ``tokenizer.json``) — no torch::

    from editor.onnx_runtime import OnnxGenerator
    gen = OnnxGenerator("outputs/demo-onnx")
    gen.generate(["Q: What is 12 + 7?\\nA:", "Bonjour"], max_new_tokens=16)

Semantics match ``SkillEditorForCausalLM.generate(do_sample=False)``: left padding, a KV cache, a
row stops at its end-of-sequence token; a row whose ``abstained`` output fires (at the prompt or at
any generated token, before it finished) stops at once and its answer is the refusal text
recorded in ``skill_editor.json``. The other rows continue untouched.

Of ``editor`` it imports only the manifest's names (``editor.manifest``: standard library only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from editor.manifest import MANIFEST, ONNX_MODEL, read_manifest


class _Tok:
    """The exported tokenizer: ``transformers`` when available, else the ``tokenizers`` library."""

    def __init__(self, path: Path):
        self.hf = None
        self.raw = None
        try:
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(str(path))
        except ImportError:
            from tokenizers import Tokenizer

            self.raw = Tokenizer.from_file(str(path / "tokenizer.json"))

    def encode(self, text: str) -> list[int]:
        if self.hf is not None:
            return list(self.hf(text)["input_ids"])
        return list(self.raw.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=True)
        return self.raw.decode(ids, skip_special_tokens=True)


class OnnxGenerator:
    """Load ``model.onnx`` (+ ``model.onnx.data``), the tokenizer and ``skill_editor.json`` from ``path``."""

    def __init__(self, path, *, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        meta_path = self.path / MANIFEST
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} is missing: not a skill-editor ONNX export")
        self.meta = read_manifest(self.path)
        onnx_meta = self.meta.get("onnx") or {}
        self.num_layers = int(onnx_meta["num_layers"])
        self.past_shape = onnx_meta["past_shape"]
        self.dtype = np.float16 if onnx_meta.get("dtype") == "float16" else np.float32
        self.pad_token_id = int(onnx_meta.get("pad_token_id") or 0)
        self.eos_token_ids = set(int(x) for x in (onnx_meta.get("eos_token_id") or []))
        edit = self.meta.get("edit") or {}
        ks = edit.get("key_space") or {}
        self.refusal = onnx_meta.get("refusal") or ks.get("refusal") or ""
        # which calls decide (the runtime's rule): every call, or the first one (the prompt) only
        self.check = ks.get("check", "every_call")
        # which positions the graph returns logits for ("all" in exports before graph format 2)
        self.logits = onnx_meta.get("logits", "all")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path / ONNX_MODEL), sess_options=so,
                                            providers=providers or ["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.tokenizer = _Tok(self.path)

    # one forward call ------------------------------------------------------------------------
    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """(logits, present tensors, abstained) for one call; ``past=None`` starts a new cache. ``logits``
        is [batch, 1, vocab] for a graph exported with ``logits="last"`` (the default since the graph
        format 2: the last position's, which is every row's last real token under left padding) and
        [batch, sequence, vocab] for ``logits="all"`` (and format-1 exports); ``logits[:, -1]`` is the
        next-token distribution in both."""
        batch = input_ids.shape[0]
        if past is None:
            past = [np.zeros((batch, s[1], 0, *s[3:]), dtype=self.dtype) for s in self.past_shape]
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                "position_ids": position_ids.astype(np.int64)}
        for i in range(self.num_layers):
            feed[f"past_key_values.{i}.key"] = past[2 * i]
            feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
        out = dict(zip(self.output_names, self.session.run(None, feed)))
        present = [out[n] for n in self.output_names if n.startswith("present.")]
        return out["logits"], present, np.asarray(out["abstained"]).astype(bool)

    # generation ------------------------------------------------------------------------------
    def generate_ids(self, prompts_ids: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], list[bool]]:
        """Greedy continuation ids per row (without the prompt) and the per-row abstention flags."""
        batch = len(prompts_ids)
        width = max(len(p) for p in prompts_ids)
        ids = np.full((batch, width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        for r, p in enumerate(prompts_ids):
            if p:
                ids[r, width - len(p):] = p
                mask[r, width - len(p):] = 1
        pos = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)
        pos = np.where(mask == 0, 0, pos)  # as transformers' generate fills padding positions
        done = np.zeros(batch, dtype=bool)
        abstained = np.zeros(batch, dtype=bool)
        new: list[list[int]] = [[] for _ in range(batch)]
        past = None
        for step in range(max_new_tokens):
            logits, past, ab = self.step(ids, mask, pos, past)
            if step == 0 or self.check != "prompt":
                abstained |= ab & ~done
            done |= abstained
            if done.all():
                break
            nxt = logits[:, -1].argmax(-1).astype(np.int64)
            nxt = np.where(done, self.pad_token_id, nxt)
            for r in np.nonzero(~done)[0]:
                new[r].append(int(nxt[r]))
                if int(nxt[r]) in self.eos_token_ids:
                    done[r] = True
            if done.all():
                break
            ids = nxt[:, None]
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            pos = pos[:, -1:] + 1
        return new, abstained.tolist()

    def generate(self, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
        """Greedy continuation text per prompt; the refusal text for rows that abstained."""
        if not prompts:
            return []
        enc = [self.tokenizer.encode(p) for p in prompts]
        new, abstained = self.generate_ids(enc, max_new_tokens)
        return [self.refusal if ab else self.tokenizer.decode(ids) for ids, ab in zip(new, abstained)]
