"""Check GPU metrics collection on this machine: GPU utilization and power must rise under load.

Runs NvmlCollector through idle (1/4), load (1/2: fp16 matmuls on cuda:0 via torch), idle (1/4),
then checks the timeline. Exit codes: 0 checks passed · 1 a check failed · 2 no GPU load source
(torch with CUDA) · 3 NVML unavailable (no driver/GPU or nvidia-ml-py missing), so CI can tell
"no GPU here" from "broken" · 64 bad command line.

    PYTHONPATH=. python tools/gpu_check.py [--duration-s 20] [--interval-s 0.2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness_fixtures.metrics import NvmlCollector, read_timeline, write_timeline
from harness_fixtures.metrics.nvml import MIN_INTERVAL_S, gpu_series
from harness_fixtures.stats import describe as series_stats

EXIT_OK, EXIT_FAIL, EXIT_NO_LOAD, EXIT_NO_NVML, EXIT_USAGE = 0, 1, 2, 3, 64
# Utilization must rise by this many percentage points, power by this factor, idle -> load.
MIN_UTIL_RISE_PCT = 20.0
MIN_POWER_RATIO = 1.1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        # argparse's own code 2 would read as "no GPU load source".
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _load_source() -> tuple[Any, str | None]:
    """torch with CUDA, or (None, why not)."""
    try:
        import torch
    except ImportError as exc:
        return None, f"torch not importable ({exc})"
    if not torch.cuda.is_available():
        return None, "torch has no CUDA device"
    return torch, None


def _gpu_load(torch: Any, seconds: float) -> int:
    """Back-to-back half-precision matmuls on cuda:0 for `seconds`; returns iterations run."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        for _ in range(4):
            a = (a @ b) * 1e-4  # keep values finite
        torch.cuda.synchronize()  # bounds the queue so the loop ends on time
        n += 4
    del a, b
    torch.cuda.empty_cache()
    return n


def _window_mean(points: list[tuple[float, float]], t_from: float, t_to: float) -> float | None:
    vals = [v for t, v in points if t_from <= t < t_to]
    return sum(vals) / len(vals) if vals else None


def main(argv: list[str] | None = None) -> int:
    p = _Parser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--duration-s", type=float, default=20.0, help="total run: 1/4 idle, 1/2 load, 1/4 idle (default 20)"
    )
    p.add_argument(
        "--interval-s", type=float, default=0.2, help=f"sampling interval, >= {MIN_INTERVAL_S} (default 0.2)"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="write timeline.csv and plots here (default: a temp dir)"
    )
    p.add_argument(
        "--settle-s",
        type=float,
        default=1.0,
        help="seconds ignored at the start of each phase; NVML utilization averages over up to ~1 s "
        "(default 1.0)",
    )
    args = p.parse_args(argv)
    settle_s = args.settle_s
    if args.interval_s < MIN_INTERVAL_S:
        p.error(f"--interval-s must be >= {MIN_INTERVAL_S}, got {args.interval_s!r}")
    min_duration = 4 * (settle_s + 3 * args.interval_s)
    if args.duration_s < min_duration:
        p.error(
            f"--duration-s {args.duration_s!r} leaves too few samples per phase after --settle-s "
            f"{settle_s!r}; use >= {min_duration:g}"
        )

    collector = NvmlCollector(interval_s=args.interval_s)
    t0_unix = time.time()
    t0_ns = time.monotonic_ns()
    collector.start(t0_ns)
    if collector.status.startswith("unavailable"):
        print(f"NVML unavailable ({collector.status[len('unavailable (') : -1]})")
        return EXIT_NO_NVML
    torch, why = _load_source()
    if torch is None:
        collector.stop()
        print(f"no GPU load source: {why}; install torch with CUDA to run this check")
        return EXIT_NO_LOAD

    info = collector.gpu_info()
    idle_s = args.duration_s / 4
    load_s = args.duration_s / 2

    def now_s() -> float:
        return (time.monotonic_ns() - t0_ns) / 1e9

    time.sleep(idle_s)
    load_from = now_s()
    iters = _gpu_load(torch, load_s)
    load_to = now_s()
    time.sleep(idle_s)
    collector.stop()

    out_dir = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    timeline_path = write_timeline(out_dir / "timeline.csv", collector.samples(), t0_unix_s=t0_unix)
    samples = read_timeline(timeline_path).samples
    plots: list[str] = []
    try:
        from harness_fixtures.metrics.plots import write_plots

        plots = [str(x) for x in write_plots(out_dir, samples)]
    except ImportError as exc:
        print(f"plots skipped: {exc}")

    by_series: dict[str, list[tuple[float, float]]] = {}
    for s in samples:
        by_series.setdefault(s.series, []).append((s.t_s, s.value))

    failures: list[str] = []
    if collector.status != "ok":
        failures.append(f"collector status {collector.status!r}, expected 'ok'")
    gpus = sorted({g[0] for s in by_series if (g := gpu_series(s)) is not None})
    for field in ("util_gpu_pct", "power_w", "mem_used_mib"):
        if not any(f"gpu{i}.{field}" in by_series for i in gpus):
            failures.append(f"timeline has no gpu*.{field} series")
    expected = args.duration_s / args.interval_s
    got = max((len(v) for v in by_series.values()), default=0)
    if got < 0.5 * expected:
        failures.append(f"only {got} samples per series for ~{expected:.0f} expected at {args.interval_s} s")

    # The load runs on cuda:0, whose NVML index may differ (CUDA_VISIBLE_DEVICES): any GPU rising passes.
    phases = {}
    for i in gpus:
        row = {}
        for field in ("util_gpu_pct", "power_w"):
            pts = by_series.get(f"gpu{i}.{field}", [])
            row[field] = {
                "idle": _window_mean(pts, settle_s, load_from),
                "load": _window_mean(pts, load_from + settle_s, load_to),
            }
        phases[f"gpu{i}"] = row

    def rose(row: dict[str, dict[str, float | None]]) -> tuple[bool, bool]:
        u, pw = row["util_gpu_pct"], row["power_w"]
        util_ok = (
            u["idle"] is not None and u["load"] is not None and u["load"] >= u["idle"] + MIN_UTIL_RISE_PCT
        )
        power_ok = (
            pw["idle"] is not None and pw["load"] is not None and pw["load"] >= pw["idle"] * MIN_POWER_RATIO
        )
        return util_ok, power_ok

    if not any(all(rose(r)) for r in phases.values()):
        failures.append(
            f"no GPU showed utilization +{MIN_UTIL_RISE_PCT:g} points and power x{MIN_POWER_RATIO:g} "
            f"under load vs idle: {json.dumps(phases)}"
        )

    report = {
        "gpus": info,
        "load_window_s": [round(load_from, 3), round(load_to, 3)],
        "matmul_iterations": iters,
        "phases": phases,
        "energy_j_total": collector.energy_j_total(),
        "summary": {k: series_stats(v for _, v in pts) for k, pts in sorted(by_series.items())},
        "timeline": str(timeline_path),
        "plots": plots,
        "status": collector.status,
        "failures": failures,
    }
    print(json.dumps(report, indent=2, default=str))
    print("PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures))
    return EXIT_OK if not failures else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
