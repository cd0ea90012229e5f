"""Our qwen3_moe against transformers in float32: full forward, cached decoding, batches, greedy generation."""

from __future__ import annotations

import pytest
import torch

from marco_local.generate import PromptCache, generate_step
from marco_local.layers.kv_cache import make_cache
from marco_local.load.checkpoint import load_model
from marco_local.sampling import make_sampler

REL_TOL = 1e-4  # max |ours - ref| / max |ref| over all logits, float32

SHAPES = {
    # name: overrides of the fixture config
    "gqa2-topknorm-tied": {},
    "gqa1-notopknorm-untied": dict(num_key_value_heads=4, norm_topk_prob=False, tie_word_embeddings=False),
    "gqa4-denselayer": dict(num_key_value_heads=1, mlp_only_layers=[1]),
    "sparse-step2": dict(decoder_sparse_step=2, num_experts=6, num_experts_per_tok=3),
    "sharded": dict(max_shard_size="60KB"),
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, make_checkpoint):
    folder, ref = make_checkpoint(request.param, seed=len(request.param), **SHAPES[request.param])
    return folder, ref, load_model(folder, dtype=torch.float32)


def test_sharded_fixture_really_is_sharded(make_checkpoint):
    folder, _ = make_checkpoint("sharded", seed=len("sharded"), **SHAPES["sharded"])
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 1


@torch.no_grad()
def test_full_forward_matches_transformers(pair):
    _, ref, ours = pair
    ids = torch.randint(0, ours.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    expected = ref(ids).logits
    got = ours(ids, make_cache(ours, 32, batch_size=3))
    assert rel_err(got, expected) < REL_TOL


@torch.no_grad()
def test_incremental_decoding_matches_transformers(pair):
    _, ref, ours = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    expected = ref(ids).logits
    cache = make_cache(ours, 32, batch_size=2)
    pieces = [ours(ids[:, :5], cache)]  # prefill, then token by token
    pieces += [ours(ids[:, t : t + 1], cache) for t in range(5, 12)]
    pieces.append(ours(ids[:, 12:], cache))  # a chunk after a cached prefix (the chat-continuation path)
    assert cache.offset == 20
    assert rel_err(torch.cat(pieces, dim=1), expected) < REL_TOL


@torch.no_grad()
def test_greedy_generation_matches_transformers(pair):
    folder, ref, ours = pair
    prompt = torch.randint(0, ours.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    out = ref.generate(prompt, do_sample=False, max_new_tokens=64, min_new_tokens=64, eos_token_id=None, pad_token_id=0)
    expected = out[0, 7:].tolist()
    steps = generate_step(ours, prompt[0].tolist(), PromptCache(make_cache(ours, 80)), make_sampler(0.0), max_tokens=64)
    assert list(steps) == expected


def test_bf16_close_to_float32(checkpoint):
    folder, ref = checkpoint
    ours = load_model(folder)  # default dtype
    assert ours.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, ours.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = ours(ids, make_cache(ours, 16)).float()
        expected = ref(ids).logits
    assert rel_err(got, expected) < 0.1  # bf16 keeps ~3 significant digits through 3 layers


@pytest.mark.parametrize("tokens", [1, 3, 40])
@torch.no_grad()
def test_gathered_and_padded_experts_match_the_grouped_loop(tokens):
    """The CUDA paths (gathered for decode, padded batches for a prompt) against the grouped loop, in float64: same
    sums in another order. 40 tokens over 10 experts: uneven groups, every expert used."""
    from marco_local.models.qwen3_moe import Experts

    g = torch.Generator().manual_seed(tokens)
    experts = Experts(num_experts=10, hidden=16, intermediate=8).double()
    for p in experts.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(tokens, 16, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(tokens)])
    weights = torch.rand(tokens, 4, generator=g, dtype=torch.float64)
    want = experts(x, idx, weights)  # CPU: the grouped loop
    torch.testing.assert_close(experts.forward_gathered(x, idx, weights), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(experts.forward_padded(x, idx, weights), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(experts.forward_padded_gathered(x, idx, weights), want, rtol=1e-12, atol=1e-12)
    assert experts.stacked
    skewed = torch.tensor([[0, 1, 2, 3]] * tokens)  # every token to the same experts: padding 10/4 x (40 tokens)
    torch.testing.assert_close(
        experts.forward_padded(x, skewed, weights), experts(x, skewed, weights), rtol=1e-12, atol=1e-12
    )


@torch.no_grad()
def test_a_skewed_routing_takes_the_grouped_loop(monkeypatch):
    """forward_padded's memory guard: 64 experts, 8 tokens all routed to experts 0 and 1 would pad 64 x 8 rows for
    16 pairs (32x > PADDED_LIMIT): the grouped loop runs instead, with the same result."""
    from marco_local.models.qwen3_moe import Experts

    experts = Experts(num_experts=64, hidden=8, intermediate=4).double()
    for p in experts.parameters():
        p.copy_(torch.randn(p.shape, dtype=torch.float64))
    x, idx, weights = torch.randn(8, 8, dtype=torch.float64), torch.tensor([[0, 1]] * 8), torch.rand(8, 2).double()
    want = experts.forward_grouped(x, idx, weights)
    calls = []
    monkeypatch.setattr(Experts, "forward_grouped", lambda self, *a: calls.append(1) or want)
    assert experts.forward_padded(x, idx, weights) is want and calls == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sign_folded_rope_is_rotate_half_bit_for_bit(dtype):
    """The decode step's RoPE (a roll and the sign in the table) against rotate-half RoPE: the same products, the sum
    rounded once or twice (addcmul may fuse it), so within one unit in the last place of the dtype."""
    from marco_local.models.qwen3_moe import RotaryEmbedding, rope_signed, rotate_half, signed_sin

    cos, sin = RotaryEmbedding(16, 10000.0, None)(5, 3, dtype, torch.device("cpu"))
    x = torch.randn(1, 4, 3, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    want = x * cos + rotate_half(x) * sin
    ulp = torch.finfo(dtype).eps * want.abs().max().item()
    torch.testing.assert_close(rope_signed(x, cos, signed_sin(sin)), want, rtol=0, atol=ulp)


@torch.no_grad()
def test_fused_qkv_projection_keeps_the_numbers_and_the_bytes(checkpoint):
    """fuse_qkv: one projection whose rows the q/k/v parameters view (no second copy), same logits."""
    folder, _ = checkpoint
    model = load_model(folder, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    want = model(ids, make_cache(model, 8))
    numel = sum(p.numel() for p in model.parameters())
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.fuse_qkv() and attn.fuse_qkv()  # idempotent
        assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()
        assert attn.v_proj.weight.data_ptr() + attn.v_proj.weight.nbytes == attn.qkv_weight[-1:].data_ptr() + (
            attn.qkv_weight[-1:].nbytes
        )
    assert sum(p.numel() for p in model.parameters()) == numel
    torch.testing.assert_close(model(ids, make_cache(model, 8)), want, rtol=1e-6, atol=1e-6)


def test_only_plain_linears_of_one_dtype_fuse(checkpoint):
    folder, _ = checkpoint
    attn = load_model(folder, dtype=torch.float32).model.layers[0].self_attn
    attn.k_proj.half()
    assert not attn.fuse_qkv() and attn.qkv_weight is None


@torch.no_grad()
def test_fused_gate_up_keeps_the_numbers_and_the_bytes():
    """fuse_gate_up: gate and up become views of one [E, 2I, D] stack; the single-token gathered path (one gather,
    one product for both) and every other path give the unfused results (float64)."""
    from marco_local.models.qwen3_moe import Experts

    g = torch.Generator().manual_seed(3)
    experts = Experts(num_experts=6, hidden=16, intermediate=8).double()
    for p in experts.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x1, x3 = torch.randn(1, 16, generator=g, dtype=torch.float64), torch.randn(3, 16, generator=g, dtype=torch.float64)
    idx1, idx3 = torch.tensor([[4, 0, 2]]), torch.tensor([[1, 5, 3], [0, 1, 2], [5, 4, 3]])
    w1, w3 = torch.rand(1, 3, generator=g, dtype=torch.float64), torch.rand(3, 3, generator=g, dtype=torch.float64)
    want = [experts.forward_gathered(x1, idx1, w1), experts.forward_grouped(x3, idx3, w3)]
    numel = sum(p.numel() for p in experts.parameters())
    assert experts.fuse_gate_up() and experts.fuse_gate_up()
    assert experts.gate_proj.data_ptr() == experts.gate_up.data_ptr()
    assert sum(p.numel() for p in experts.parameters()) == numel
    got = [experts.forward_gathered(x1, idx1, w1), experts.forward_grouped(x3, idx3, w3)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(experts.forward_padded(x3, idx3, w3), want[1], rtol=1e-12, atol=1e-12)


def test_only_plain_experts_fuse_gate_up(q4_path):
    from marco_local.formats.gguf import GGUFFile
    from marco_local.layers.gguf_cuda import StackedGGUFExperts
    from marco_local.load.gguf import build_model

    model = build_model(GGUFFile(q4_path), dense=True, quantized_experts=torch.device("cpu"))
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, StackedGGUFExperts) and not experts.fuse_gate_up() and experts.gate_up is None
