"""Configuration of a skill-editor checkpoint.

Shipped verbatim inside every exported checkpoint (``auto_map``), so it imports only ``torch`` and
``transformers``. The base model's own configuration is kept whole as ``text_config`` (the name
``transformers`` looks up through ``get_text_config()``, so generation, caches and pipelines see
the base model's sizes); the edit itself is described by the ``skill_editor`` dict.

How ``config.json`` fails closed, by the file alone (no code of this checkpoint runs unless the
user passes ``trust_remote_code=True``):

* its top level is the base model's own configuration — ``model_type`` the base architecture's
  (e.g. ``llama``), its sizes — plus the keys below; ``base_model_config`` holds the same base
  configuration, which this class reads as ``text_config``. (Not under the name ``text_config`` in
  the file: a loader that reads the top level as a plain base config would take that dict for a
  sub-configuration — vLLM without the plugin fails on it with a message that does not name the
  checkpoint's architecture.) ``transformers`` knows the base ``model_type``, so
  ``AutoTokenizer.from_pretrained(checkpoint)`` resolves the config without offering to run this
  file (no ``[y/N]`` prompt) and ``AutoConfig`` without ``trust_remote_code`` gives the base config;
* ``transformers_weights`` (the weights file ``PreTrainedModel.from_pretrained`` must read) is a
  sentence, not a file name: every concrete class — ``LlamaForCausalLM``, ``LlamaModel`` … of any
  architecture — and ``AutoModelForCausalLM`` without ``trust_remote_code`` refuse the checkpoint
  with it before a model is allocated;
* ``auto_map`` names this class and ``SkillEditorForCausalLM`` (``architectures``): with
  ``trust_remote_code=True`` the edited model loads. In memory ``model_type`` is ``skill_editor``
  and ``transformers_weights`` unset, so the weights are read from ``model.safetensors`` as usual.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

# config.json's ``transformers_weights``: what every class but this checkpoint's own reads instead of a file name
LOAD_WITH_REMOTE_CODE = ("this is a skill-editor checkpoint (an edited model): load it with "
                         "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)")
# config.json's key for the base configuration (``text_config`` in memory; the module docstring says why)
BASE_CONFIG_KEY = "base_model_config"
# keys of config.json that belong to the file, not to this object (see the module docstring)
_FILE_ONLY = ("model_type", "transformers_weights")


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
        # config.json's fail-closed fields (see the module docstring) are not this object's own
        for key in _FILE_ONLY:
            kwargs.pop(key, None)
        base_in_file = kwargs.pop(BASE_CONFIG_KEY, None)
        if self.text_config is None and isinstance(base_in_file, dict):
            self.text_config = base_in_file
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

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        """config.json names the base architecture's ``model_type``; this class reads it as its own."""
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if isinstance(config_dict.get("skill_editor"), dict) and isinstance(config_dict.get(BASE_CONFIG_KEY), dict):
            config_dict["text_config"] = config_dict.pop(BASE_CONFIG_KEY)
        if isinstance(config_dict.get("skill_editor"), dict) and isinstance(config_dict.get("text_config"), dict):
            config_dict["model_type"] = cls.model_type
        return config_dict, kwargs

    def to_dict(self) -> dict[str, Any]:
        """What config.json holds: the base configuration's fields and ``model_type`` at the top
        level, this object's over them, and ``transformers_weights`` (the module docstring says why)."""
        out = super().to_dict()
        base = out.get("text_config")
        if not (isinstance(base, dict) and base.get("model_type")):
            return out
        top = {k: v for k, v in base.items() if k != "transformers_version"}
        top.update(out)
        top[BASE_CONFIG_KEY] = top.pop("text_config")
        top["model_type"] = base["model_type"]
        top["transformers_weights"] = LOAD_WITH_REMOTE_CODE
        return top
