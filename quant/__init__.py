"""Tensor quantization for marco-local: GGML block codecs, GGUF name tables and writers (model-agnostic)."""
