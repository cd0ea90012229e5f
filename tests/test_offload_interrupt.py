"""Ctrl-C in the middle of an offloaded step (KeyboardInterrupt, raised between any two bytecodes) must not leave the
expert cache naming experts whose bytes never arrived: the next steps give the resident model's logits.

The interrupt is raised where it does the most harm, in the copy that follows the slot table's update (the table then
says the expert sits in a slot that still holds another one's bytes), on the module path (float32 checkpoint) and on
the native decoder's path (a q4_k_m GGUF with its experts in the file). The interrupted token is then fed again at
the same position, as a chat's next turn does.
"""

from __future__ import annotations

import pytest
import torch
from offload_gguf_fixtures import native_or_skip, one_thread  # noqa: F401 (autouse: one intra-op thread)

from marco_local.decode import forward
from marco_local.layers.kv_cache import make_cache
from marco_local.load.checkpoint import load_model
from marco_local.load.gguf import load_gguf
from marco_local.load.offloaded import load_offloaded
from marco_local.offload import Placement, install

PROMPT = [5, 17, 33, 2, 91, 120, 7, 64]
FEED = [11, 140, 23, 7, 300, 19, 88, 2, 45, 61, 130, 9]


@torch.inference_mode()
def steps(model, interrupt_at: int | None = None) -> torch.Tensor:
    """Teacher-forced logits [len(FEED), V]; with `interrupt_at`, that step's first expert copy raises
    KeyboardInterrupt once and the step is run again."""
    cache = make_cache(model, len(PROMPT) + len(FEED))
    model(torch.tensor([PROMPT]), cache)
    out = []
    for i, t in enumerate(FEED):
        if i == interrupt_at:
            interrupt_next_copy(model)
            with pytest.raises(KeyboardInterrupt):
                forward(model, torch.tensor([[t]]), cache)
        out.append(forward(model, torch.tensor([[t]]), cache)[0, -1].float())
    return torch.stack(out)


def interrupt_next_copy(model) -> None:
    """The next expert copy of any layer raises KeyboardInterrupt, once, before it copies a byte."""
    layers = model.offload.layers
    originals = {id(x.store): x.store.read_into for x in layers}

    def read_into(store, e, dst):
        for x in layers:  # once: every store back to its own method
            x.store.read_into = originals[id(x.store)]
        raise KeyboardInterrupt

    for x in layers:
        x.store.read_into = lambda e, dst, store=x.store: read_into(store, e, dst)


@pytest.mark.parametrize("prefetch", [False, True])
def test_an_interrupted_copy_on_the_module_path(checkpoint, prefetch):
    """With prefetch the interrupted copy may be the loader thread's: it surfaces when the next layer waits for it."""
    folder, _ = checkpoint
    want = steps(load_model(folder, dtype=torch.float32))
    model = load_offloaded(folder, Placement(experts_resident="2", prefetch=prefetch), dtype=torch.float32)
    got = steps(model, interrupt_at=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_interrupted_copy_on_the_native_decoder_path(q4_path):
    native_or_skip()
    want = steps(load_gguf(q4_path, dtype=torch.bfloat16)[0])
    model, _ = load_gguf(q4_path, dtype=torch.bfloat16, experts_in_file=True)
    install(model, Placement(experts_resident="3"), files=[q4_path])
    got = steps(model, interrupt_at=3)
    assert torch.equal(got, want)
