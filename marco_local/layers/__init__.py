"""Modules that stand in for the model's `nn.Linear`, `nn.Embedding` and `Experts` with quantized weights: GGUF
blocks on the CPU kernels (`gguf`) and on CUDA (`gguf_cuda`), bitsandbytes weights (`bnb`)."""
