"""Per-test telemetry: the collectors around one LoadGen run, then timeline, summaries and plots.

Nothing here may fail or stall a benchmark: collectors report their own failures as statuses, and
a failure while writing the timeline or plots is recorded, not raised.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

from .metrics import CollectorSet, HostCollector, NvmlCollector, PrometheusCollector

log = logging.getLogger("harness_fixtures.telemetry")


class TestTelemetry:
    """Collectors for one test. ``start`` with the test's t0 (monotonic ns) and the client's pid."""

    def __init__(self, base_url: str, headers: dict[str, str] | None, interval_s: float = 1.0,
                 gpu_interval_s: float = 1.0) -> None:  # fmt: skip
        self.engine = PrometheusCollector(base_url, interval_s=interval_s, headers=headers)
        self.gpu = NvmlCollector(interval_s=gpu_interval_s)
        self.host: HostCollector | None = None
        self.interval_s = interval_s
        self.set: CollectorSet | None = None

    def start(self, t0_ns: int, client_pid: int) -> None:
        self.host = HostCollector(interval_s=self.interval_s, pid=client_pid)
        self.set = CollectorSet([self.engine, self.host, self.gpu])
        self.set.start(t0_ns)

    def stop(self) -> None:
        if self.set is not None:
            self.set.stop()

    def finish(
        self,
        test_dir: Path,
        requests: list[dict[str, Any]],
        output_tokens: int,
        limits_ms: dict[str, float] | None = None,
        target_percentile: float | None = None,
    ) -> dict[str, Any]:
        """Write timeline.csv and plots; return the ``telemetry:`` section of result.yaml.

        :param limits_ms: the scenario's TTFT/TPOT limits for the latency CDF figure (see
            `harness_fixtures.results.latency_limits`); ``target_percentile`` is where they apply.
        """
        if self.set is None:
            return {"status": "not started"}
        out: dict[str, Any] = {"collectors": self.set.statuses()}
        try:
            self.set.write_timeline(test_dir / "timeline.csv")
            out["timeline"] = str(test_dir / "timeline.csv")
        except Exception as exc:
            out["timeline_error"] = f"{type(exc).__name__}: {exc}"
        out["summary"] = self.set.summary()
        energy = self.gpu.energy_j_total()
        if energy is not None:
            out["gpu_energy_j"] = round(energy, 3)
            if output_tokens:
                out["energy_j_per_output_token"] = round(energy / output_tokens, 6)
        if self.host is not None:
            frac = self.host.client_cpu_bound_fraction()
            out["client_cpu_bound_fraction"] = None if frac is None else round(frac, 4)
        # The engine's own count of generated tokens over the test (warm-up request included).
        out["engine_generation_tokens"] = self.engine.delta("generation_tokens")
        try:
            from .metrics.plots import write_plots

            samples = self.set.samples()
            paths = write_plots(test_dir / "plots", samples, requests, limits_ms, target_percentile)
            out["plots"] = [str(p) for p in paths]
        except Exception as exc:
            log.warning("plots failed: %s", traceback.format_exc(limit=3))
            out["plots_error"] = f"{type(exc).__name__}: {exc}"
        return out
