"""Loaders: build a model on the meta device (`meta`) and fill it from a file: safetensors checkpoints
(`checkpoint`), GGUF files (`gguf`), bitsandbytes folders (`bnb`)."""
