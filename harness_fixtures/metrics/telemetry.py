"""Per-run telemetry: the collectors around one LoadGen run, then timeline, summaries and plots.

Nothing here may fail or stall a benchmark: collectors report their own failures as statuses, and
a failure while writing the timeline or plots is recorded, not raised.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..client.httpconfig import HttpConfig
from ..client.requestlog import Request
from ..results import GpuTelemetry, GpuWatched, TelemetryResult
from .base import CollectorSet
from .host import HostCollector
from .nvml import NvmlCollector
from .plots import LatencyMarks, RunWindow
from .prometheus import PrometheusCollector
from .timeline import Sample

log = logging.getLogger("harness_fixtures.metrics")


class RunTelemetry:
    """Collectors for one run. ``start`` with the run's t0 (monotonic ns) and the client's pid.

    :param metrics_paths: where the engine serves Prometheus text, in the order to try.
    :param gpu_env: the engine's environment, whose CUDA_VISIBLE_DEVICES picks the GPUs to watch;
        None when unknown (every GPU is watched, and the result says so).
    :param http: the session's HTTP configuration (proxies, TLS, headers), the streaming client's.
    :param more_engines: (base URL, headers) of the run's other endpoints (engine.replicas, several
        server URLs): each is scraped too, as source ``engine<index>`` (1, 2, ...) in the timeline;
        ``engine`` stays the first endpoint's, which the engine window and the plots describe.
    """

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str] | None,
        interval_s: float = 1.0,
        *,
        metrics_paths: Sequence[str] = ("/metrics",),
        gpu_env: Mapping[str, str] | None = None,
        http: HttpConfig | None = None,
        more_engines: Sequence[tuple[str, dict[str, str]]] = (),
    ) -> None:
        self.engine = PrometheusCollector(
            base_url, interval_s=interval_s, headers=headers, paths=tuple(metrics_paths), http=http
        )
        self.more_engines = [
            PrometheusCollector(
                url,
                interval_s=interval_s,
                headers=h,
                paths=tuple(metrics_paths),
                http=http,
                name=f"engine{i}",
            )
            for i, (url, h) in enumerate(more_engines, start=1)
        ]
        self.gpu = NvmlCollector(interval_s=interval_s, engine_env=gpu_env)
        self.host: HostCollector | None = None
        self.interval_s = interval_s
        self.set: CollectorSet | None = None

    def start(self, t0_ns: int, client_pid: int) -> None:
        self.host = HostCollector(interval_s=self.interval_s, pid=client_pid)
        self.set = CollectorSet([self.engine, *self.more_engines, self.host, self.gpu])
        self.set.start(t0_ns)

    def stop(self) -> None:
        if self.set is not None:
            self.set.stop()

    def samples(self) -> list[Sample]:
        return self.set.samples() if self.set is not None else []

    def finish(
        self,
        out_dir: Path,
        requests: list[Request],
        output_tokens: int,
        marks: LatencyMarks | None = None,
        window: RunWindow | None = None,
    ) -> TelemetryResult:
        """Write timeline.csv and plots; return ``telemetry:`` of result.yaml.

        :param marks: the scenario's limits and LoadGen's percentiles for the latency CDFs (the same
            numbers result.yaml and the terminal show).
        :param window: the warm-up and LoadGen's measured window (client.json): shaded on every time
            plot; GPU energy is counted over the measured window, the span `output_tokens` were
            generated in.
        """
        if self.set is None:
            return TelemetryResult(status="not started")
        out = TelemetryResult(collectors=self.set.statuses(), summary=self.set.summary())
        try:
            self.set.write_timeline(out_dir / "timeline.csv")
            out.timeline = str(out_dir / "timeline.csv")
        except Exception as exc:
            out.timeline_error = f"{type(exc).__name__}: {exc}"
        self._gpu_energy(out, output_tokens, window.loadgen if window is not None else None)
        try:
            from .plots import write_plots

            paths = write_plots(out_dir / "plots", self.set.samples(), requests, marks, window)
            out.plots = [str(p) for p in paths]
        except Exception as exc:
            log.warning("plots failed: %s", traceback.format_exc(limit=3))
            out.plots_error = f"{type(exc).__name__}: {exc}"
        return out

    def _gpu_energy(
        self, out: TelemetryResult, output_tokens: int, window_s: tuple[float, float] | None
    ) -> None:
        """``telemetry.gpu`` and J/token: the engine's GPUs over LoadGen's window, or why not."""
        sel = self.gpu.selection
        if sel is None:
            return  # NVML unavailable: telemetry.collectors.gpu says why
        per_gpu = {}
        if window_s is None:
            out.energy_note = "LoadGen's measured window is unknown (no client.json): energy not counted"
        else:
            energies, total = self.gpu.window_energy(*window_s)
            per_gpu = {e.nvml_index: e for e in energies}
            out.energy_window_s = [window_s[0], window_s[1]]
            if total is None:
                out.energy_note = (
                    "; ".join(f"gpu{e.nvml_index}: {e.note}" for e in energies if e.joules is None and e.note)
                    or "no watched GPU reports energy or power"
                )
            else:
                out.gpu_energy_j = round(total, 3)
                if output_tokens:
                    out.energy_j_per_output_token = round(total / output_tokens, 6)
        watched = []
        for w in sel.gpus:
            e = per_gpu.get(w.nvml_index)
            watched.append(
                GpuWatched(
                    nvml_index=w.nvml_index,
                    uuid=w.uuid,
                    name=w.name,
                    cuda_index=w.cuda_index,
                    mig_instance=w.mig_uuid,
                    energy_j=None if e is None or e.joules is None else round(e.joules, 3),
                    energy_source=None if e is None else e.source,
                    note=None if e is None else e.note,
                )
            )
        out.gpu = GpuTelemetry(
            selection=sel.basis, warnings=list(sel.warnings), watched=watched, issues=self.gpu.issues()
        )
