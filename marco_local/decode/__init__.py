"""Fast one-token decode steps, used instead of the model's layer loop where they apply: the native CPU decoder
(`native`) and CUDA graphs (`cuda_graphs`)."""
