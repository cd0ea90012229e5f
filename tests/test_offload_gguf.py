"""Expert offloading of a quantized GGUF model (qlinear's QExperts: per-expert data in lists and plain attributes):
the same tokens and bit-identical logits with one slot and with a few, in bf16 (int4 kernels) and f32 (exact path)."""

from __future__ import annotations

import pytest
import torch
from offload_gguf_fixtures import (  # noqa: F401
    PROMPT,
    decode_logits,
    greedy,
    int4_kernels,
    native_or_skip,
    one_thread,
    prefill_logits,
    q4_path,
    q4_top4_path,
)

from marco_local.offload import Placement, install, offload_stats


@pytest.mark.parametrize(
    ("dtype", "kernels"), [(torch.bfloat16, "native"), (torch.bfloat16, "int4"), (torch.float32, "exact")]
)
def test_quantized_gguf_experts_offload_identically(q4_top4_path, dtype, kernels, request):
    """With fewer slots than a token's experts too: the int4 kernels (no C compiler, MARCO_NATIVE=0) once summed
    such a token in another order than the resident model and chose other tokens."""
    from marco_local.load.gguf import load_gguf

    if kernels == "int4":
        request.getfixturevalue("int4_kernels")

    plain, _ = load_gguf(q4_top4_path, dtype=dtype, device=torch.device("cpu"))
    want, logits, steps = greedy(plain), prefill_logits(plain), decode_logits(plain)
    for slots in ("1", "3"):
        model, _ = load_gguf(q4_top4_path, dtype=dtype, device=torch.device("cpu"))
        install(model, Placement(experts_resident=slots), files=[q4_top4_path])
        assert greedy(model) == want
        assert torch.equal(prefill_logits(model), logits)
        assert torch.equal(decode_logits(model), steps)
        assert offload_stats(model).slots_per_layer == int(slots)


def test_ram_budget_with_experts_held_in_ram_is_refused_clearly(q4_path, int4_kernels):
    from marco_local.errors import MarcoError
    from marco_local.load.gguf import load_gguf

    model, _ = load_gguf(q4_path, dtype=torch.bfloat16, device=torch.device("cpu"))
    with pytest.raises(MarcoError, match="cannot be kept with this model: its experts are held in RAM"):
        install(model, Placement(ram_mem="1GiB"), files=[q4_path])


def test_ram_budget_with_native_experts_reads_the_file(q4_path):
    """Native kernels keep a loaded GGUF's experts as views of the file: a RAM budget then reads them from there."""
    native_or_skip()
    from marco_local.load.gguf import load_gguf

    plain, _ = load_gguf(q4_path, dtype=torch.bfloat16)
    want = greedy(plain)
    model, _ = load_gguf(q4_path, dtype=torch.bfloat16)
    install(model, Placement(ram_mem="1GiB", ctx=64), files=[q4_path])
    assert greedy(model) == want
    model.offload.close()
