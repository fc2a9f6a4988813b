"""Configuration of a skill-editor checkpoint.

Shipped verbatim inside every exported checkpoint (``auto_map``), so it imports only ``torch`` and
``transformers``. The base model's own configuration is kept whole as ``text_config`` (the name
``transformers`` looks up through ``get_text_config()``, so generation, caches and pipelines see
the base model's sizes); the edit itself is described by the ``skill_editor`` dict.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig


class SkillEditorConfig(PretrainedConfig):
    """A base causal-LM config plus the description of a Neuron Adjust / Key Space Detection edit.

    ``skill_editor`` keys: ``format`` ("skill-editor/patch"), ``version``, ``arch`` (base
    ``model_type``), ``neuron_adjust`` (``{"mode", "seed", "counts": {layer: n}}`` or None),
    ``key_space`` (``{"layers": [...], "refusal", "refusal_ids", "check"}`` or None; ``check``:
    ``every_call`` (default) or ``prompt``, which forward calls of ``generate`` decide), ``patch_digest``
    (sha256 of every patch tensor, checked at load).
    """

    model_type = "skill_editor"
    text_config: Any = None
    skill_editor: dict | None = None

    def __post_init__(self, **kwargs):
        if isinstance(self.text_config, dict):
            base = dict(self.text_config)
            model_type = base.pop("model_type", None)
            if model_type is None:
                raise ValueError("skill-editor config: text_config has no model_type")
            base.pop("transformers_version", None)
            self.text_config = AutoConfig.for_model(model_type, **base)
        if self.skill_editor is None:
            self.skill_editor = {}
        super().__post_init__(**kwargs)
        if self.text_config is not None:
            for name in ("eos_token_id", "bos_token_id", "pad_token_id", "tie_word_embeddings", "vocab_size"):
                value = getattr(self.text_config, name, None)
                if value is not None and getattr(self, name, None) is None:
                    setattr(self, name, value)
