"""The thread count follows the cores other programs leave free (marco_local/cpu_share.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from marco_local import cpu_share
from marco_local.cpu_share import CpuShare


class FakeMachine:
    """Two cores; each `advance` moves the clock by one second with the given idle and own CPU seconds."""

    def __init__(self) -> None:
        self.now, self.idle, self.own = 0.0, 0.0, 0.0

    def advance(self, idle: float, own: float) -> None:
        self.now += 1.0
        self.idle += idle
        self.own += own


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    m = FakeMachine()
    fake_psutil = SimpleNamespace(
        cpu_times=lambda: SimpleNamespace(idle=m.idle, iowait=0.0),
        Process=lambda: SimpleNamespace(cpu_times=lambda: SimpleNamespace(user=m.own, system=0.0)),
        Error=Exception,
    )
    monkeypatch.setattr(cpu_share, "psutil", fake_psutil)
    monkeypatch.setattr(cpu_share.time, "monotonic", lambda: m.now)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield m
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("idle", "own", "threads"),
    [
        (0.0, 2.0, 2),  # we had both cores
        (0.3, 1.5, 2),  # a light background job: 1.8 cores still ours
        (0.0, 1.3, 1),  # one busy program: two threads got 1.3 cores, one of them waiting
        (0.0, 0.4, 1),  # a loaded desktop (load 5 on 2 cores)
        (2.0, 0.0, 2),  # idle machine
    ],
)
def test_threads_follow_the_free_cores(machine: FakeMachine, idle: float, own: float, threads: int) -> None:
    share = CpuShare(interval=0.5)
    machine.advance(idle, own)
    share.tick()
    assert torch.get_num_threads() == threads
    share.restore()
    assert torch.get_num_threads() == 2


def test_no_change_before_the_interval_and_never_above_the_start(machine: FakeMachine) -> None:
    torch.set_num_threads(1)
    share = CpuShare(interval=2.0)
    machine.advance(2.0, 0.0)
    share.tick()  # one second: too early to judge
    assert share.free_cores() is None
    machine.advance(2.0, 0.0)
    share.tick()
    assert torch.get_num_threads() == 1  # two free cores, but the user's count was 1


def test_a_generation_restores_the_thread_count(machine: FakeMachine) -> None:
    from marco_local.generate import PromptCache, generate_step
    from marco_local.sampling import make_sampler

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, tokens, cache, last_only=False):
            machine.advance(0.0, 0.5)  # each step: a loaded machine
            return torch.zeros(1, 1, 8)

    cache = PromptCache(SimpleNamespace(reset=lambda: None, trim=lambda n: None, offset=0))
    steps = generate_step(Tiny(), [1, 2], cache, make_sampler(), max_tokens=5)
    seen = []
    for _ in steps:
        seen.append(torch.get_num_threads())
    assert seen[-1] == 1 and torch.get_num_threads() == 2
