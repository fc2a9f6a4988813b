"""The vLLM general plugin (entry point group ``vllm.general_plugins``, name ``skill_editor``).

vLLM calls ``register()`` in every process it starts (front end, engine core, workers) before it
reads a model's config. It registers, without importing torch-heavy code:

* the model class ``SkillEditorForCausalLM`` (lazily, by name) with vLLM's ``ModelRegistry``;
* a config hook for that architecture (vLLM's ``MODELS_CONFIG_MAP``), run while the engine config
  is built: it turns off what would bypass or break the per-request guard — torch.compile / CUDA
  graphs (the guard keeps per-step Python state), and prefix caching for the pooled linear
  detector (a cached prefix would not be re-pooled) — and refuses prompt embeddings;
* the checkpoint's config class with transformers' ``AutoConfig`` (model_type ``skill_editor``),
  the same file the checkpoint ships, so ``vllm serve CKPT`` needs no ``--trust-remote-code``.
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
