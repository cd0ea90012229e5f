"""Fitting a model to the GPU when the user gave no memory option (runtime.fit_to_free_vram), as Ollama does: a MoE
model bigger than the free VRAM keeps only its hot experts there (`--gpu-mem auto`); one that fits, or a placement the
user chose, is left alone. The free VRAM is faked: the decision is plain arithmetic on `marco info`'s figures."""

from __future__ import annotations

import torch

from marco_local.inventory import model_info
from marco_local.offload import Placement
from marco_local.offload.budget import AUTO_GPU_MARGIN
from marco_local.runtime import fit_placement, fit_to_free_vram

GiB = 1 << 30


def test_a_model_that_fits_is_left_alone_and_one_that_does_not_gets_gpu_mem_auto():
    chosen = Placement(ctx=2048)
    assert fit_placement(chosen, 10 * GiB, 10 * GiB + AUTO_GPU_MARGIN) == (chosen, None)
    fitted, note = fit_placement(chosen, 16 * GiB, 8 * GiB)
    assert fitted == Placement(gpu_mem="auto", ctx=2048) and fitted.active
    assert "16.0 GiB" in note and "8.0 GiB is free" in note and "--gpu-mem auto" in note
    own = Placement(experts_resident="25%")
    assert fit_placement(own, 16 * GiB, 1 * GiB) == (own, None)  # the user's own placement wins


def test_the_need_is_the_smallest_all_on_gpu_placement(checkpoint, monkeypatch, q4_path):
    for spec in (str(checkpoint[0]), str(q4_path)):
        info = model_info(spec, ctx=512)
        need = min(p.fast_bytes for p in info.placements if p.name.startswith("all on GPU"))
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, n=need: (n + AUTO_GPU_MARGIN, 80 * GiB))
        assert fit_to_free_vram(spec, Placement(ctx=512), torch.device("cuda")) == (Placement(ctx=512), None)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, n=need: (n, 80 * GiB))
        fitted, note = fit_to_free_vram(spec, Placement(ctx=512), torch.device("cuda"))
        assert fitted.gpu_mem == "auto" and note
