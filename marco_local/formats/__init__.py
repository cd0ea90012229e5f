"""Model files read into typed values: safetensors checkpoints (`checkpoint`), GGUF files (`gguf`) and the
tokenizers they carry (`gguf_tokenizer`). Bytes from strangers are validated here, at the boundary."""
