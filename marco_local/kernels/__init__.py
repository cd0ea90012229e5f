"""Compute kernels: the native C kernels for the CPU (`native`) and the Triton kernels for GGUF blocks on CUDA
(`triton_gguf`). They take tensors and raw blocks, and know nothing of models or files."""
