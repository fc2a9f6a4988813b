"""The vLLM general plugin (entry point group ``vllm.general_plugins``, name ``skill_editor``).

vLLM calls ``register()`` in every process it starts (front end, engine core, workers) before it
reads a model's config. It registers, without importing torch-heavy code:

* the model class ``SkillEditorForCausalLM`` (lazily, by name) with vLLM's ``ModelRegistry``;
* a config hook for that architecture (vLLM's ``MODELS_CONFIG_MAP``), run while the engine config
  is built: it turns off what would bypass or break the per-request guard — torch.compile / CUDA
  graphs (the guard keeps per-step Python state), and prefix caching for the pooled linear
  detector (a cached prefix would not be re-pooled) — and refuses prompt embeddings;
* the checkpoint's config class with transformers' ``AutoConfig`` (model_type ``skill_editor``),
  the same file the checkpoint ships, so ``vllm serve CKPT`` needs no ``--trust-remote-code``;
* a step after vLLM's Hugging Face config parser: a checkpoint's config.json has the base
  architecture's own ``model_type`` at its top level (so that every plain loader fails closed, see
  the runtime's configuration file), which vLLM would read as a plain base config; a config that
  carries the edit (``skill_editor``) is read with the checkpoint's config class instead, as
  ``trust_remote_code`` would.
"""

from __future__ import annotations

import logging

from editor.serve import ARCHITECTURE

logger = logging.getLogger(__name__)

MODEL_CLASS = "editor.serve.vllm_model:SkillEditorForCausalLM"


def register() -> None:
    """Idempotent: vLLM may call it more than once per process."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from editor.runtime.configuration_skill_editor import SkillEditorConfig

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    MODELS_CONFIG_MAP[ARCHITECTURE] = _config_hook()
    AutoConfig.register("skill_editor", SkillEditorConfig, exist_ok=True)
    _read_edits_with_own_config(SkillEditorConfig)


def _read_edits_with_own_config(config_class) -> None:
    """Wrap vLLM's ``HFConfigParser.parse`` (once): a config dict with the edit (``skill_editor``)
    and the base configuration (``text_config``) becomes ``config_class``; others pass unchanged."""
    from vllm.transformers_utils.config import HFConfigParser

    from editor.runtime.configuration_skill_editor import BASE_CONFIG_KEY

    parse = HFConfigParser.parse
    if getattr(parse, "_skill_editor", False):
        return

    def parse_edit_aware(self, model, trust_remote_code, revision=None, code_revision=None, **kwargs):
        config_dict, config = parse(self, model, trust_remote_code, revision=revision, code_revision=code_revision,
                                    **kwargs)
        if isinstance(config_dict.get("skill_editor"), dict) and not isinstance(config, config_class) \
                and isinstance(config_dict.get(BASE_CONFIG_KEY, config_dict.get("text_config")), dict):
            config = config_class.from_dict(dict(config_dict), name_or_path=str(model))
        return config_dict, config

    parse_edit_aware._skill_editor = True
    HFConfigParser.parse = parse_edit_aware


def _config_hook():
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    class SkillEditorVllmConfig(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            mc = vllm_config.model_config
            edit = getattr(mc.hf_config, "skill_editor", None) or {}
            ks = edit.get("key_space") or {}
            if getattr(mc, "enable_prompt_embeds", False):
                raise ValueError("skill-editor (vLLM): prompt embeddings are refused (the guard needs the prompt's tokens)")
            if not mc.enforce_eager:
                logger.info("skill-editor: the edited model runs eagerly (no torch.compile / CUDA graphs)")
                mc.enforce_eager = True  # vLLM then sets compilation mode and cudagraph mode to NONE
            if ks.get("detector") == "linear" and vllm_config.cache_config.enable_prefix_caching:
                logger.info("skill-editor: prefix caching off (the linear detector pools every prompt token)")
                vllm_config.cache_config.enable_prefix_caching = False

    return SkillEditorVllmConfig
