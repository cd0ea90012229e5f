"""One decode token's experts on CUDA, Nano-shaped: the triton kernels (marco_local/kernels/triton_gguf.py) against the
dequantizing torch path, and the kernels' block sizes swept.

Layers of StackedGGUFExperts (232 experts, hidden 1024, width 384; gate/up Q4_K, down Q5_0 or Q8_0 as llama.cpp's
Q4_K_M writes Nano: rows of 384 are not K-quant rows) with valid random blocks (random bytes, the fp16 scales set to
small finite values), so no codec search runs. Each step is 28 layers' `_one_token` captured in a CUDA graph, as
the decoder runs it. Prints microseconds per layer and the kernels' effective bandwidth over the blocks read.

Usage: python bench/gguf_matvec.py [--layers 28] [--down Q5_0] [--sweep]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from marco_local.kernels import triton_gguf  # noqa: E402
from marco_local.layers.gguf_cuda import StackedGGUFExperts  # noqa: E402
from quant.ggml_codecs import codec_for  # noqa: E402

E, A, D, I = 232, 8, 1024, 384
HALF_AT = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,), "Q5_0": (0,), "Q4_0": (0,)}


def random_blocks(name: str, rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    codec = codec_for(name)
    n = E * rows * cols // codec.block_size
    raw = torch.randint(0, 256, (n, codec.type_size), dtype=torch.uint8, generator=g)
    for at in HALF_AT[name]:
        raw[:, at : at + 2] = (torch.rand(n, 1, generator=g) * 1e-2).half().view(torch.uint8)
    return raw.view(E, rows, -1)


def step_us(layers, x, ids, w, triton_on: bool, iters: int = 50) -> float:
    os.environ["MARCO_GGUF_TRITON"] = "1" if triton_on else "0"

    def step():
        for layer in layers:
            layer._one_token(x, ids, w)

    step()  # compile / warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters / len(layers)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--down", default="Q5_0", help="down_proj's type (rows of 384: Q5_0, Q8_0, Q4_0)")
    ap.add_argument("--sweep", action="store_true", help="BLOCK_N x num_warps of the kernels")
    args = ap.parse_args()
    dev, g = torch.device("cuda"), torch.Generator().manual_seed(0)
    types = ("Q4_K", "Q4_K", args.down)
    layers = []
    for _ in range(args.layers):
        raws = (random_blocks("Q4_K", I, D, g), random_blocks("Q4_K", I, D, g), random_blocks(args.down, D, I, g))
        codes = tuple(int(codec_for(t).ggml_type) for t in types)
        layers.append(StackedGGUFExperts(raws, codes, D, I, torch.bfloat16, dev))
    block_bytes = sum(layers[0]._buffers[f"{p}_raw"][0].nbytes for p in ("gate_proj", "up_proj", "down_proj")) * A
    x = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
    ids = torch.randperm(E, device=dev)[:A]
    w = torch.rand(1, A, device=dev)
    ref = torch.stack([layer._one_token(x, ids, w) for layer in layers[:2]]).float()
    os.environ["MARCO_GGUF_TRITON"] = "0"
    old = torch.stack([layer._one_token(x, ids, w) for layer in layers[:2]]).float()
    print(f"types {'/'.join(types)}; {block_bytes / 1e6:.2f} MB of blocks per layer; rel diff kernels vs torch path "
          f"{((ref - old).norm() / old.norm()).item():.2e} (bf16 weights there)")  # fmt: skip
    t_old = step_us(layers, x, ids, w, triton_on=False)
    t_new = step_us(layers, x, ids, w, triton_on=True)
    print(f"dequantize + matmul: {t_old:7.1f} us/layer")
    print(f"triton kernels:      {t_new:7.1f} us/layer  ({block_bytes / t_new / 1e3:.0f} GB/s over the blocks)")
    if args.sweep:
        for block_n in (8, 16, 32, 64):
            for warps in (2, 4, 8):
                triton_gguf.BLOCK_N, triton_gguf.NUM_WARPS = block_n, warps
                t = step_us(layers, x, ids, w, triton_on=True)
                print(f"  BLOCK_N {block_n:3d} num_warps {warps}: {t:7.1f} us/layer")


if __name__ == "__main__":
    main()
