"""Count the kernels of one captured CUDA decode step, on the CPU: where the CUDA graph's time goes.

Replayed from a CUDA graph, a Marco-Nano-shaped step costs about 2.5-3 us per kernel node whatever the kernel does
(they are tiny: one token), so the step's time is close to its node count times that. This script runs the graphed
decoder's segment (marco_local/decode/cuda_graphs.py) eagerly on a small random qwen3_moe model on the CPU, with the
experts on the single-token gathered path a CUDA step takes, and counts the aten ops that launch a kernel (view ops
excluded), per layer and in all, grouped by op. An RMSNorm counts as one kernel (F.rms_norm's fused kernel on
CUDA; on the CPU it decomposes into eight). SDPA counts as one (on CUDA the step's call takes the memory-efficient
kernel: no GQA expansion, an additive mask).

    python bench/decode_ops.py [--layers 28]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from marco_local.config import ModelConfig  # noqa: E402
from marco_local.decode.cuda_graphs import GraphedDecoder  # noqa: E402
from marco_local.layers.kv_cache import make_cache  # noqa: E402
from marco_local.models.qwen3_moe import Experts, Qwen3MoeForCausalLM, RMSNorm  # noqa: E402

VIEWS = {
    "view",
    "_unsafe_view",
    "reshape",
    "expand",
    "transpose",
    "t",
    "select",
    "slice",
    "unsqueeze",
    "squeeze",
    "permute",
    "as_strided",
    "alias",
    "detach",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "_reshape_alias",
}


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if self.paused or name in VIEWS or (name == "to" and out is args[0]):  # a `to` that changes nothing is free
            return out
        self.ops[name] += 1
        return out


def count_norms_as_fused(counter: OpCounter) -> None:
    """On CUDA an RMSNorm is one fused kernel (F.rms_norm); on the CPU it decomposes: count it as the one."""
    plain = RMSNorm.forward

    def forward(self, x):
        counter.paused = True
        try:
            return plain(self, x)
        finally:
            counter.paused = False
            counter.ops["rms_norm (fused on CUDA)"] += 1

    RMSNorm.forward = forward


def count(layers: int) -> collections.Counter[str]:
    cfg = ModelConfig(
        model_type="qwen3_moe",
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=16,
        num_experts_per_tok=8,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    decoder = GraphedDecoder(model, min_window=16)
    cache = make_cache(model, 64)
    cache.keys.zero_(), cache.values.zero_()
    model(torch.tensor([[1, 2, 3]]), cache)
    # the CUDA choice for one token (Experts.forward: the grouped loop reads back to the host)
    Experts.forward = Experts.forward_gathered
    decoder._bind(cache)
    decoder.masks[16] = torch.zeros(1, 1, 1, 16, dtype=torch.bfloat16)
    decoder.pos.fill_(cache.offset)
    plain = RMSNorm.forward
    with torch.inference_mode(), OpCounter() as counter:
        count_norms_as_fused(counter)
        try:
            decoder._segment(0, cache, 16)
        finally:
            RMSNorm.forward = plain
    return counter.ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    args = parser.parse_args()
    one, many = count(1), count(args.layers)
    per_layer = collections.Counter({op: many[op] - one[op] for op in many})
    per_layer = +collections.Counter({op: n / (args.layers - 1) for op, n in per_layer.items()})
    total = sum(many.values())
    print(f"{total} kernels per step at {args.layers} layers; {sum(per_layer.values()):.0f} per layer:")
    for op, n in per_layer.most_common():
        print(f"  {n:5.1f}  {op}")
    print(f"outside the layers: {total - sum(per_layer.values()) * args.layers:.0f}")


if __name__ == "__main__":
    main()
