"""A GGUF's experts kept as the file's blocks off the CPU (marco_local/layers/gguf_cuda.py), checked on the CPU.

The module is what CUDA runs (`load_gguf(..., cuda_experts="quantized" | "host")`); its code is plain torch ops on any
device, so the CPU checks its numbers: the experts' weights equal the dense load's bit for bit (same dequantization,
same cast), the model's logits match the dense model's (float32, 1e-5: other summation orders), and offloading it
(the "host" form, packed into a memory store) gives the resident model's tokens. The codecs' block functions must not
make CPU tensors of their own (a CUDA input would fail): run on the meta device, any such tensor raises.
"""

from __future__ import annotations

import pytest
import torch
from offload_gguf_fixtures import greedy, one_thread, prefill_logits  # noqa: F401 (one_thread: autouse)

from marco_local.formats.gguf import GGUFFile
from marco_local.layers.gguf_cuda import StackedGGUFExperts
from marco_local.load.gguf import build_model, load_gguf
from marco_local.offload import Placement, install, offload_stats
from quant.ggml_codecs import CODECS

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", list(CODECS))
def test_block_dequantization_stays_on_the_input_device(name):
    codec = CODECS[name]
    raw = torch.zeros(3, codec.type_size, dtype=torch.uint8, device="meta")
    out = codec._dequantize_blocks(raw)
    assert out.device.type == "meta" and out.shape == (3, codec.block_size)


def experts_of(model) -> list:
    return [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]


@torch.no_grad()
def test_quantized_experts_hold_the_file_bytes_and_dequantize_like_the_dense_load(q4_path):
    g = GGUFFile(q4_path)
    dense = build_model(g, dtype=torch.bfloat16, dense=True)
    quant = build_model(g, dtype=torch.bfloat16, dense=True, quantized_experts=CPU)
    for d, q in zip(experts_of(dense), experts_of(quant), strict=True):
        assert isinstance(q, StackedGGUFExperts) and q.gathers and not q.stacked
        assert q.gate_proj_raw.dtype == torch.uint8  # the blocks, not floats
        ids = torch.tensor([0, 3, 1])
        pairs = zip(q.gathered_weights(ids, torch.bfloat16), d.gathered_weights(ids, torch.bfloat16), strict=True)
        assert all(torch.equal(got, want) for got, want in pairs)
        assert torch.equal(q._dense("down_proj", 2, torch.bfloat16), d.down_proj[2])
        q.release_file_pages()  # a hint to the kernel: the file's pages are read back in when touched again
        assert torch.equal(q._dense("down_proj", 2, torch.bfloat16), d.down_proj[2])
    dense_bytes = sum(t.nbytes for e in experts_of(dense) for t in e.parameters())
    quant_bytes = sum(t.nbytes for e in experts_of(quant) for t in e.buffers())
    assert quant_bytes * 3 < dense_bytes  # q4_k_m: ~4.5 bits a weight against 16


@torch.no_grad()
def test_gathered_and_grouped_paths_agree(q4_path):
    """The decode path a CUDA step takes (gathered by id) against the grouped loop (prefill), float64 products."""
    quant = build_model(GGUFFile(q4_path), dtype=torch.float32, dense=True, quantized_experts=CPU)
    experts = experts_of(quant)[0]
    g = torch.Generator().manual_seed(0)
    D = experts.shapes["gate_proj"][1]
    x = torch.randn(1, D, generator=g)
    idx = torch.randperm(experts.num_experts, generator=g)[:2].view(1, 2)
    w = torch.rand(1, 2, generator=g)
    torch.testing.assert_close(experts.forward_gathered(x, idx, w), experts.forward_grouped(x, idx, w))


def test_quantized_experts_read_in_place(q4_path):
    """`--expert-misses direct` on GGUF blocks (what CUDA runs): the gather buffer's rows computed without a gather."""
    from test_offload_direct import check_direct_layer

    quant = build_model(GGUFFile(q4_path), dtype=torch.float32, dense=True, quantized_experts=CPU)
    check_direct_layer(experts_of(quant)[0], quant.config.num_experts_per_tok)


@pytest.mark.parametrize("monkey_group", [16, 3])
@torch.no_grad()
def test_a_prompt_through_quantized_experts_in_padded_groups(q4_path, monkeypatch, monkey_group):
    """Several tokens on CUDA: the padded batch, the experts dequantized a group at a time (3: groups that do not
    divide the experts), against the grouped loop."""
    from marco_local.models import qwen3_moe

    monkeypatch.setattr(qwen3_moe, "PADDED_GROUP", monkey_group)
    quant = build_model(GGUFFile(q4_path), dtype=torch.float32, dense=True, quantized_experts=CPU)
    experts = experts_of(quant)[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, experts.shapes["gate_proj"][1], generator=g)
    idx = torch.stack([torch.randperm(experts.num_experts, generator=g)[:2] for _ in range(20)])
    w = torch.rand(20, 2, generator=g)
    want = experts.forward_grouped(x, idx, w)
    torch.testing.assert_close(experts.forward_padded_gathered(x, idx, w), want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_model_with_quantized_experts_matches_the_dense_model(q4_path):
    g = GGUFFile(q4_path)
    dense = build_model(g, dtype=torch.float32, dense=True)
    quant = build_model(g, dtype=torch.float32, dense=True, quantized_experts=CPU)
    torch.testing.assert_close(prefill_logits(quant), prefill_logits(dense), rtol=1e-5, atol=1e-5)
    assert greedy(quant) == greedy(dense)


def test_quantized_experts_need_the_dense_modules(q4_path):
    with pytest.raises(ValueError, match="dense"):
        build_model(GGUFFile(q4_path), dense=False, quantized_experts=CPU)
    with pytest.raises(ValueError, match="cuda_experts"):
        load_gguf(q4_path, cuda_experts="fast")


@pytest.mark.parametrize("slots", ["1", "3"])
@torch.no_grad()
def test_host_experts_offload_to_the_resident_models_tokens(q4_path, slots):
    """What `marco run FILE.gguf --device cuda --gpu-mem ...` builds, on the CPU: the experts' blocks packed into a
    memory store (pinned on CUDA), slots holding quantized experts."""
    g = GGUFFile(q4_path)
    resident = build_model(g, dtype=torch.float32, dense=True, quantized_experts=CPU)
    want, logits = greedy(resident), prefill_logits(resident)
    model = build_model(g, dtype=torch.float32, dense=True, quantized_experts=CPU)
    released = []
    for block in experts_of(model):  # the file pages go back once a layer is copied into the store
        block.release_file_pages = lambda block=block: released.append(block)
    install(model, Placement(experts_resident=slots))
    assert len(released) == len(experts_of(resident))
    assert offload_stats(model).slots_per_layer == int(slots)
    layer = model.offload.layers[0]
    assert layer.layout.expert_bytes < 3 * 4 * layer.inner.shapes["gate_proj"][0] * layer.inner.shapes["gate_proj"][1]
    assert greedy(model) == want
    torch.testing.assert_close(prefill_logits(model), logits, rtol=1e-6, atol=1e-6)
