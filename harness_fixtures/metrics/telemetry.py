"""Per-run telemetry: the collectors around one LoadGen run, then timeline, summaries and plots.

Nothing here may fail or stall a benchmark: collectors report their own failures as statuses, and
a failure while writing the timeline or plots is recorded, not raised.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

from ..client.httpconfig import HttpConfig
from ..client.requestlog import Request
from ..results import TelemetryResult
from .base import CollectorSet
from .host import HostCollector
from .nvml import NvmlCollector
from .plots import LatencyMarks
from .prometheus import PrometheusCollector

log = logging.getLogger("harness_fixtures.metrics")


class RunTelemetry:
    """Collectors for one run. ``start`` with the run's t0 (monotonic ns) and the client's pid."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str] | None,
        interval_s: float = 1.0,
        http: HttpConfig | None = None,
    ) -> None:
        self.engine = PrometheusCollector(base_url, interval_s=interval_s, headers=headers, http=http)
        self.gpu = NvmlCollector(interval_s=interval_s)
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
        out_dir: Path,
        requests: list[Request],
        output_tokens: int,
        marks: LatencyMarks | None = None,
    ) -> TelemetryResult:
        """Write timeline.csv and plots; return ``telemetry:`` of result.yaml.

        :param marks: the scenario's limits and LoadGen's percentiles for the latency CDFs (the same
            numbers result.yaml and the terminal show).
        """
        if self.set is None:
            return TelemetryResult(status="not started")
        out = TelemetryResult(collectors=self.set.statuses(), summary=self.set.summary())
        try:
            self.set.write_timeline(out_dir / "timeline.csv")
            out.timeline = str(out_dir / "timeline.csv")
        except Exception as exc:
            out.timeline_error = f"{type(exc).__name__}: {exc}"
        energy = self.gpu.energy_j_total()
        if energy is not None:
            out.gpu_energy_j = round(energy, 3)
            if output_tokens:
                out.energy_j_per_output_token = round(energy / output_tokens, 6)
        # The engine's own count of generated tokens over the run (warm-up request included).
        out.engine_generation_tokens = self.engine.delta("generation_tokens")
        try:
            from .plots import write_plots

            paths = write_plots(out_dir / "plots", self.set.samples(), requests, marks)
            out.plots = [str(p) for p in paths]
        except Exception as exc:
            log.warning("plots failed: %s", traceback.format_exc(limit=3))
            out.plots_error = f"{type(exc).__name__}: {exc}"
        return out
