"""marco-local: run Marco-MoE (qwen3_moe) language models on your own computer."""

__version__ = "0.1.0"
