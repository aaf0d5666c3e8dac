"""The client's own CPU: is the load generator, not the server, setting the pace?

One client process is one GIL, so its Python work cannot use much more than one core; a process at
``CPU_BOUND_PCT`` of a core is saturated. The runner and each fan-out worker measure themselves with
:class:`CpuSampler`; the gate (harness_fixtures.gating) and the host collector's series use the same
threshold through :func:`bound_fraction`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

CPU_BOUND_PCT = 90.0


def bound_fraction(samples_pct: Sequence[float]) -> float | None:
    """Share of samples (% of one core) at or above ``CPU_BOUND_PCT``; None without samples."""
    if not samples_pct:
        return None
    return round(sum(v >= CPU_BOUND_PCT for v in samples_pct) / len(samples_pct), 4)


class CpuSampler:
    """This process's CPU use (all threads), % of one core, once per ``interval_s`` on its own thread."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="harness-cpu", daemon=True)
        self._t0 = time.monotonic()
        self._c0 = time.process_time()

    def start(self) -> CpuSampler:
        self._t0, self._c0 = time.monotonic(), time.process_time()
        self._thread.start()
        return self

    def _run(self) -> None:
        t, c = self._t0, self._c0
        while not self._stop.wait(self.interval_s):
            t1, c1 = time.monotonic(), time.process_time()
            self.samples.append(round(100 * (c1 - c) / max(t1 - t, 1e-9), 1))
            t, c = t1, c1

    def stop(self) -> dict[str, Any]:
        """Stop; return {cpu_s, cpu_pct (mean), cpu_bound_fraction, cpu_samples}."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2 * self.interval_s)
        wall = max(time.monotonic() - self._t0, 1e-9)
        cpu = time.process_time() - self._c0
        return {
            "cpu_s": round(cpu, 3),
            "cpu_pct": round(100 * cpu / wall, 1),
            "cpu_bound_fraction": bound_fraction(self.samples),
            "cpu_samples": len(self.samples),
        }
