"""The exporters, leaves of the pipeline: each writes one checkpoint format from an edited model,
its ``editor.manifest.Edit`` and the manifest the orchestrator built (``hf``: safetensors + the
shipped runtime; ``onnx``: a graph with the edit inside, validated by ONNX Runtime), with the
model card of ``card``."""
