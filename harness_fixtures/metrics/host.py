"""Host CPU and memory, and the benchmark client's own CPU use, sampled with psutil.

Series: `cpu_pct` (all cores, 0-100), `cpu_max_core_pct` (busiest core), `mem_used_mib`, `mem_pct`,
`client_cpu_pct` (the client process, in % of ONE core), `client_rss_mib`, and with
`include_children` `client_children_cpu_pct`. Whether the client saturated a core is measured by the
client processes themselves (harness_fixtures.client.cpu); these series draw the picture.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from .base import BaseCollector

__all__ = ["HostCollector"]


class HostCollector(BaseCollector):
    """Samples host and client-process CPU/memory every `interval_s` seconds.

    :param interval_s: seconds between samples.
    :param pid: the client process to watch (default: this process).
    :param include_children: also sum the CPU % of the process's children (e.g. client workers).
    :param name: source name in the timeline.
    """

    def __init__(
        self,
        interval_s: float = 1.0,
        pid: int | None = None,
        *,
        include_children: bool = False,
        name: str = "host",
    ) -> None:
        super().__init__(name, interval_s=interval_s, stop_timeout_s=2.0)
        self.pid = os.getpid() if pid is None else pid
        self.include_children = include_children
        self._proc: Any = None
        self._children: dict[int, Any] = {}

    def _setup(self) -> str | None:
        try:
            import psutil
        except ImportError as exc:
            return f"psutil not installed: {exc}"
        self._proc = psutil.Process(self.pid)
        # cpu_percent(None) measures since the previous call: prime every counter now so the first
        # sample covers the first interval instead of reading 0.0.
        psutil.cpu_percent(None)
        psutil.cpu_percent(None, percpu=True)
        self._proc.cpu_percent(None)
        return None

    def _sample(self) -> Iterable[tuple[str, float]]:
        import psutil

        out: list[tuple[str, float]] = [("cpu_pct", psutil.cpu_percent(None))]
        per_core = psutil.cpu_percent(None, percpu=True)
        if per_core:
            out.append(("cpu_max_core_pct", max(per_core)))
        vm = psutil.virtual_memory()
        out += [("mem_used_mib", vm.used / 2**20), ("mem_pct", vm.percent)]
        try:
            with self._proc.oneshot():
                out.append(("client_cpu_pct", self._proc.cpu_percent(None)))
                out.append(("client_rss_mib", self._proc.memory_info().rss / 2**20))
        except psutil.NoSuchProcess:
            # The client process has finished (its test ended before our last tick): the host
            # series still count, the client's simply end.
            return out
        if self.include_children:
            out.append(("client_children_cpu_pct", self._children_cpu_pct(psutil)))
        return out

    def _children_cpu_pct(self, psutil: Any) -> float:
        # A child's cpu_percent needs a previous call on the same Process object: keep them cached;
        # a newly seen child contributes from its second sample on.
        total = 0.0
        seen = set()
        for child in self._proc.children(recursive=True):
            seen.add(child.pid)
            cached = self._children.get(child.pid)
            try:
                if cached is None:
                    self._children[child.pid] = child
                    child.cpu_percent(None)
                else:
                    total += cached.cpu_percent(None)
            except psutil.Error:
                self._children.pop(child.pid, None)
        for pid in set(self._children) - seen:
            del self._children[pid]
        return total
