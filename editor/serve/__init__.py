"""Serving a skill-editor checkpoint with an inference engine (issue #17, docs/SERVING.md).

``editor.serve.vllm_plugin`` is the vLLM general plugin (entry point ``vllm.general_plugins``): it
registers the checkpoint architecture ``SkillEditorForCausalLM`` with vLLM's model registry.
``editor.serve.vllm_model`` builds vLLM's own implementation of the base architecture and applies
Neuron Adjust and the Key Space Detection key test inside it; ``editor.serve.vllm_guard`` is the
v1 logits processor (entry point ``vllm.logits_processors``) that turns that test into a decision
per request and forces the refusal. Nothing here is imported unless vLLM loads it.
"""

ARCHITECTURE = "SkillEditorForCausalLM"
