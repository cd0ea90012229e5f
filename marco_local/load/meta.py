"""Building a model's module tree on the meta device, for loaders that then fill every parameter from a file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_INITIALISERS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_", "zeros_", "ones_")


@contextmanager
def meta_device() -> Iterator[None]:
    """`torch.device("meta")` with torch's weight initialisers switched off while modules are constructed.

    Why: nn.Linear and nn.Embedding initialise their weights in their constructors; on the meta device that work is
    pointless, and its first call goes through torch's reference decompositions, which import torch._dynamo, sympy
    and mpmath (hundreds of modules: a second and tens of MiB of resident memory, for nothing). Loaders replace
    every parameter afterwards. Not thread-safe (it swaps functions of torch.nn.init): call it from the loading
    thread only.
    """
    saved = {name: getattr(nn.init, name) for name in _INITIALISERS}
    for name in _INITIALISERS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)
