"""The CPU threads a generation uses follow the cores other programs leave free.

Why: each native kernel call and torch op splits its work over all threads and ends in a barrier. When a browser or
a build takes cores, the OS deschedules one of our threads and every other thread waits at the next barrier for a
whole time slice, so decode collapses far below the CPU share we still get. Fewer threads than busy cores have no
one to wait for.

`CpuShare.tick()` is called once per generated token; every `interval` seconds it measures the cores that were idle
plus the cores this process used, over that interval, and sets torch's thread count (which the native kernels also
take) to that many, between 1 and the count it started with. It never raises above the user's choice.
"""

from __future__ import annotations

import math
import time

import psutil
import torch


class CpuShare:
    def __init__(self, interval: float = 0.25) -> None:
        self.max_threads = torch.get_num_threads()
        self.interval = interval
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        if self.max_threads <= 1:
            return None
        try:
            system = psutil.cpu_times()
            own = psutil.Process().cpu_times()
        except (OSError, psutil.Error):
            return None
        idle = system.idle + getattr(system, "iowait", 0.0)
        return time.monotonic(), idle, own.user + own.system

    def free_cores(self) -> float | None:
        """Cores idle or used by us since the last sample (None before `interval` has passed, or where unknown)."""
        if self._last is None or time.monotonic() - self._last[0] < self.interval:
            return None
        now = self._sample()
        if now is None:
            return None
        wall, idle, own = (b - a for a, b in zip(self._last, now, strict=True))
        self._last = now
        return (idle + own) / wall if wall > 0 else None

    def tick(self) -> None:
        free = self.free_cores()
        if free is None:
            return
        # a core counts once most of it is ours to take: 1.75 free cores of 2 is two threads, 1.3 is one
        threads = max(1, min(self.max_threads, math.floor(free + 0.25)))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def restore(self) -> None:
        """Back to the thread count the generation started with."""
        if torch.get_num_threads() != self.max_threads:
            torch.set_num_threads(self.max_threads)
