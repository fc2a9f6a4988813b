"""The real-model skill battery (SmolLM2-135M-Instruct): item tables, few-shot templates, splits."""
