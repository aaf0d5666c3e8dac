"""Validate the suite's GPU telemetry on this machine against a known load on one GPU (cuda:0).

Uses PyTorch (the load) and nvidia-ml-py (through the harness's own NvmlCollector, which picks its
GPUs from this process's CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER exactly as it does an engine's).
About 90 s with the defaults (73 s of phases plus start-up); the phases may add up to 540 s, which
keeps the longest run under 10 minutes. Timeline: idle, then a known allocation held, then a
sustained matmul, then idle again. Checks:

  match     cuda:0 is a GPU the collector watches (same NVML UUID, or PCI bus id), and the one it
            takes for CUDA index 0 when it knows the CUDA order
  fields    every NVML field was sampled on that GPU
  util      utilization idle < 10 %, loaded > 90 % (bf16 matmul, fp16 where bf16 is not supported,
            with constant operands: the same product every step, so nothing underflows)
  memory    used memory rises by the allocation PyTorch reserved (4 GiB, at most a quarter of the
            free memory), ± 5 %
  power     every power sample <= the enforced power limit (+ 5 % for the power controller's
            transients)
  energy    the energy counter never decreases, and its increase is within ± 10 % of the power
            samples integrated over the run (mJ against mW: a wrong unit is off by 1000x)
  clocks    SM and memory clocks in (0, their maximum]; temperature in (0, 100) °C
  sampling  the sampling interval is kept (median gap within ± 20 %, < 5 % of ticks missed) and one
            sample's cost is measured (p99 below half the interval)

Exit codes: 0 PASS · 1 FAIL (a check failed) · 2 no GPU load source (torch with CUDA) · 3 NVML
unavailable (no driver or GPU, nvidia-ml-py missing, or no GPU to watch) · 64 bad command line. The
last line printed is ``PASS``, ``FAIL: <checks>`` or ``SKIP: <why>`` (exit 2 or 3), so CI can tell
"no GPU here" from "broken".

    PYTHONPATH=. python tools/gpu_check.py [--idle-s 15] [--load-s 45] [--interval-s 0.2] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from harness_fixtures.metrics import NvmlCollector, write_timeline
from harness_fixtures.metrics.nvml import FIELDS, MIN_INTERVAL_S, WatchedGpu, counter_delta, integrate
from harness_fixtures.stats import percentile

EXIT_OK, EXIT_FAIL, EXIT_NO_LOAD, EXIT_NO_NVML, EXIT_USAGE = 0, 1, 2, 3, 64
IDLE_UTIL_MAX_PCT = 10.0
LOAD_UTIL_MIN_PCT = 90.0
MEMORY_TOLERANCE = 0.05
POWER_MARGIN = 0.05
ENERGY_TOLERANCE = 0.10
INTERVAL_TOLERANCE = 0.20
MAX_MISSED_FRACTION = 0.05
MAX_TEMP_C = 100.0
MAX_TOTAL_S = 540.0  # the phases; with start-up (importing torch, the CUDA context) under 10 minutes


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        # argparse's own code 2 would read as "no GPU load source".
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class GpuLoad(Protocol):
    """What the check needs from the load side (PyTorch here; a fake in the suite's tests)."""

    def identity(self) -> tuple[str | None, str | None]:
        """cuda:0's (UUID, PCI bus id) as NVML writes them; None where torch cannot say."""

    def prepare(self) -> None:
        """Create the CUDA context and the matmul operands (before the timeline starts)."""

    def allocate(self, mib: int) -> int:
        """Allocate and touch `mib` MiB; return the bytes the allocator reserved for it."""

    def release(self) -> None:
        """Free what `allocate` took."""

    def run(self, seconds: float) -> dict[str, Any]:
        """Back-to-back matmuls for `seconds`; return what ran (iterations, TFLOP/s, dtype)."""


class TorchLoad:
    """Matmuls of two constant random n x n matrices on cuda:0, bf16 where supported."""

    def __init__(self, torch: Any, n: int) -> None:
        self.torch = torch
        self.n = n
        self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self._block: Any = None
        self._abc: tuple[Any, Any, Any] | None = None

    def identity(self) -> tuple[str | None, str | None]:
        props = self.torch.cuda.get_device_properties(0)
        uuid = getattr(props, "uuid", None)
        bus = [getattr(props, k, None) for k in ("pci_domain_id", "pci_bus_id", "pci_device_id")]
        pci = None if None in bus else f"{bus[0]:08X}:{bus[1]:02X}:{bus[2]:02X}.0"
        return (None if uuid is None else str(uuid)), pci

    def prepare(self) -> None:
        t = self.torch
        a = t.randn(self.n, self.n, device="cuda:0", dtype=self.dtype)
        b = t.randn(self.n, self.n, device="cuda:0", dtype=self.dtype)
        self._abc = (a, b, t.empty_like(a))
        t.matmul(a, b, out=self._abc[2])  # cuBLAS initialised outside the measured phases
        t.cuda.synchronize()

    def allocate(self, mib: int) -> int:
        t = self.torch
        free, _ = t.cuda.mem_get_info(0)
        size = min(mib * 2**20, free // 4)  # a GPU with little free memory still gets a fair test
        before = t.cuda.memory_reserved(0)
        self._block = t.empty(size, dtype=t.uint8, device="cuda:0")
        self._block.fill_(1)
        t.cuda.synchronize()
        reserved: int = t.cuda.memory_reserved(0) - before
        return reserved

    def release(self) -> None:
        self._block = None
        self.torch.cuda.empty_cache()

    def run(self, seconds: float) -> dict[str, Any]:
        t = self.torch
        assert self._abc is not None, "prepare() first"
        a, b, c = self._abc
        began = time.perf_counter()
        t.matmul(a, b, out=c)
        t.cuda.synchronize()
        # Synchronise about every 50 ms: the queue stays bounded (the loop ends on time) while the
        # GPU never waits on the CPU long enough to show in its utilization.
        burst = max(1, int(0.05 / max(time.perf_counter() - began, 1e-6)))
        n = 1
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for _ in range(burst):
                t.matmul(a, b, out=c)
            t.cuda.synchronize()
            n += burst
        elapsed = time.perf_counter() - began
        finite = bool(t.isfinite(c).all()) and float(c.float().abs().mean()) > 0
        return {
            "dtype": str(self.dtype),
            "matrix": self.n,
            "iterations": n,
            "tflops": round(2 * self.n**3 * n / elapsed / 1e12, 1),
            "output_finite_and_nonzero": finite,
        }


def _load_source(n: int) -> tuple[GpuLoad | None, str | None]:
    """A TorchLoad, or (None, why not)."""
    try:
        import torch
    except ImportError as exc:
        return None, f"torch not importable ({exc})"
    if not torch.cuda.is_available():
        return None, "torch has no CUDA device"
    return TorchLoad(torch, n), None


def _norm_uuid(u: str | None) -> str | None:
    if not u:
        return None
    u = u.strip().lower()
    return u[4:] if u.startswith(("gpu-", "mig-")) else u


def _mean(points: list[tuple[float, float]], t_from: float, t_to: float) -> float | None:
    vals = [v for t, v in points if t_from <= t <= t_to]
    return sum(vals) / len(vals) if vals else None


def _fmt(v: float | None, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:.1f}{unit}"


def _target(
    watched: tuple[WatchedGpu, ...], info: dict[int, dict[str, Any]], uuid: str | None, pci: str | None
) -> WatchedGpu | None:
    for w in watched:
        if uuid is not None and _norm_uuid(w.uuid) == _norm_uuid(uuid):
            return w
        bus = info.get(w.nvml_index, {}).get("pci_bus_id")
        if uuid is None and pci is not None and bus and bus.upper() == pci.upper():
            return w
    return None


Check = tuple[str, bool, str]  # name, passed, what was seen


@dataclass
class Run:
    """What one check run recorded, and the checks over it."""

    collector: NvmlCollector
    info: dict[int, dict[str, Any]]
    uuid: str | None
    pci: str | None
    idle: tuple[float, float]
    hold: tuple[float, float]
    load: tuple[float, float]
    reserved_bytes: int
    ran: dict[str, Any]
    interval_s: float

    def checks(self) -> list[Check]:
        match, target = self.match()
        if target is None:
            return [match]
        i = target.nvml_index
        return [
            match,
            self.fields(i),
            self.util(i),
            self.memory(i),
            self.power(i),
            self.energy(i),
            self.clocks(i),
            self.sampling(i),
        ]

    def series(self, i: int, name: str) -> list[tuple[float, float]]:
        return self.collector.series(f"gpu{i}.{name}")

    def match(self) -> tuple[Check, WatchedGpu | None]:
        watched = self.collector.watched
        target = _target(watched, self.info, self.uuid, self.pci)
        cuda0 = next((w for w in watched if w.cuda_index == 0), None)
        if target is None:
            seen = [w.uuid for w in watched]
            return ("match", False, f"cuda:0 (uuid {self.uuid}, PCI {self.pci}) is not watched: {seen}"), None
        if cuda0 is not None and cuda0.nvml_index != target.nvml_index:
            detail = (
                f"the collector takes CUDA index 0 for {cuda0.uuid} (NVML {cuda0.nvml_index}), but "
                f"cuda:0 is {target.uuid} (NVML {target.nvml_index})"
            )
            return ("match", False, detail), target
        how = "UUID" if self.uuid is not None else "PCI bus id"
        pinned = "" if cuda0 is not None else "; CUDA order not pinned here (only the identity compared)"
        return ("match", True, f"cuda:0 = NVML {target.nvml_index} {target.uuid} by {how}{pinned}"), target

    def fields(self, i: int) -> Check:
        missing = [f for f in FIELDS if not self.series(i, f)]
        return "fields", not missing, f"missing: {missing}" if missing else f"all {len(FIELDS)} fields"

    def util(self, i: int) -> Check:
        util = self.series(i, "util_gpu_pct")
        idle, loaded = _mean(util, *self.idle), _mean(util, *self.load)
        numeric = bool(self.ran.get("output_finite_and_nonzero", True))
        ok = (
            idle is not None
            and loaded is not None
            and idle < IDLE_UTIL_MAX_PCT
            and loaded > LOAD_UTIL_MIN_PCT
            and numeric
        )
        detail = (
            f"idle {_fmt(idle, ' %')} (< {IDLE_UTIL_MAX_PCT:g}), loaded {_fmt(loaded, ' %')} "
            f"(> {LOAD_UTIL_MIN_PCT:g}); the load's output finite and nonzero: {numeric}"
        )
        return "util", ok, detail

    def memory(self, i: int) -> Check:
        mem = self.series(i, "mem_used_mib")
        before, during = _mean(mem, self.idle[1] - 1.0, self.idle[1]), _mean(mem, *self.hold)
        expected = self.reserved_bytes / 2**20
        rise = None if before is None or during is None else during - before
        ok = rise is not None and expected > 0 and abs(rise - expected) <= MEMORY_TOLERANCE * expected
        detail = f"used rose {_fmt(rise, ' MiB')} for {expected:.1f} MiB reserved (± {MEMORY_TOLERANCE:.0%})"
        return "memory", ok, detail

    def power(self, i: int) -> Check:
        peak = max((v for _, v in self.series(i, "power_w")), default=None)
        limit = self.info.get(i, {}).get("power_limit_w")
        ok = limit is not None and peak is not None and peak <= limit * (1 + POWER_MARGIN)
        return (
            "power",
            ok,
            f"max {_fmt(peak, ' W')}, enforced limit {_fmt(limit, ' W')} (+{POWER_MARGIN:.0%})",
        )

    def energy(self, i: int) -> Check:
        energy, power = self.series(i, "energy_mj"), self.series(i, "power_w")
        monotonic = all(b >= a for (_, a), (_, b) in itertools.pairwise(energy))
        if not energy or not power:
            return "energy", False, f"no samples (energy {len(energy)}, power {len(power)})"
        span = (max(energy[0][0], power[0][0]), min(energy[-1][0], power[-1][0]))
        counted_mj, integral_j = counter_delta(energy, *span), integrate(power, *span)
        counted = None if counted_mj is None else counted_mj / 1000.0
        ratio = None if counted is None or not integral_j else counted / integral_j
        ok = monotonic and ratio is not None and abs(ratio - 1.0) <= ENERGY_TOLERANCE
        shown = "n/a" if ratio is None else f"{ratio:.3f}"
        detail = (
            f"counter monotonic: {monotonic}; counter {_fmt(counted, ' J')} vs power integral "
            f"{_fmt(integral_j, ' J')}: ratio {shown} (1 ± {ENERGY_TOLERANCE:g})"
        )
        return "energy", ok, detail

    def clocks(self, i: int) -> Check:
        top = self.info.get(i, {}).get("max_clocks_mhz") or {}
        bad = []
        for key, fld in (("sm", "sm_clock_mhz"), ("mem", "mem_clock_mhz")):
            vals = [v for _, v in self.series(i, fld)]
            if not vals or min(vals) <= 0 or (key in top and max(vals) > top[key]):
                bad.append(f"{fld} {min(vals, default=None)}..{max(vals, default=None)} (max {top.get(key)})")
        temps = [v for _, v in self.series(i, "temp_c")]
        if not temps or min(temps) <= 0 or max(temps) >= MAX_TEMP_C:
            bad.append(f"temp_c {min(temps, default=None)}..{max(temps, default=None)}")
        return "clocks", not bad, "; ".join(bad) or f"in range (max clocks {top or 'unknown'})"

    def sample_cost_ms(self) -> dict[str, float | None]:
        costs_ms = [c * 1e3 for c in self.collector.sample_durations_s]
        return {"p50": percentile(costs_ms, 50), "p99": percentile(costs_ms, 99), "n": float(len(costs_ms))}

    def sampling(self, i: int) -> Check:
        stamps = [t for t, _ in self.series(i, "power_w")]
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        median = statistics.median(gaps) if gaps else None
        missed = self.collector.n_missed_ticks / max(len(stamps) + self.collector.n_missed_ticks, 1)
        cost = self.sample_cost_ms()
        p99 = cost["p99"]
        ok = (
            median is not None
            and abs(median - self.interval_s) <= INTERVAL_TOLERANCE * self.interval_s
            and missed < MAX_MISSED_FRACTION
            and p99 is not None
            and p99 < self.interval_s * 1e3 / 2
        )
        detail = (
            f"median gap {_fmt(None if median is None else median * 1e3, ' ms')} for "
            f"{self.interval_s * 1e3:g} ms; missed ticks {missed:.1%}; one sample costs p50 "
            f"{_fmt(cost['p50'], ' ms')}, p99 {_fmt(p99, ' ms')}"
        )
        return "sampling", ok, detail


def main(
    argv: list[str] | None = None, load_source: Callable[[int], tuple[Any, str | None]] | None = None
) -> int:
    p = _Parser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--idle-s", type=float, default=15.0, help="idle phase at the start (default 15)")
    p.add_argument(
        "--hold-s", type=float, default=5.0, help="the known allocation is held this long (default 5)"
    )
    p.add_argument("--load-s", type=float, default=45.0, help="sustained matmul (default 45)")
    p.add_argument("--tail-s", type=float, default=8.0, help="idle phase at the end (default 8)")
    p.add_argument(
        "--interval-s", type=float, default=0.2, help=f"sampling interval, >= {MIN_INTERVAL_S} (default 0.2)"
    )
    p.add_argument(
        "--settle-s",
        type=float,
        default=1.5,
        help="seconds ignored at the start of each phase; NVML utilization and (on newer boards) "
        "power average over up to ~1 s (default 1.5)",
    )
    p.add_argument("--alloc-mib", type=int, default=4096, help="the known allocation (default 4096)")
    p.add_argument("--matrix", type=int, default=8192, help="matmul size n (n x n operands, default 8192)")
    p.add_argument("--out", type=Path, default=None, help="timeline.csv and plots here (default: a temp dir)")
    p.add_argument("--no-plots", action="store_true", help="write the timeline only")
    args = p.parse_args(argv)
    if args.interval_s < MIN_INTERVAL_S:
        p.error(f"--interval-s must be >= {MIN_INTERVAL_S}, got {args.interval_s!r}")
    for name in ("idle_s", "hold_s", "load_s"):
        if getattr(args, name) < args.settle_s + 3 * args.interval_s:
            p.error(
                f"--{name.replace('_', '-')} {getattr(args, name)!r} leaves fewer than 3 samples after "
                f"--settle-s {args.settle_s!r}; use >= {args.settle_s + 3 * args.interval_s:g}"
            )
    total = args.idle_s + args.hold_s + args.load_s + args.tail_s
    if total > MAX_TOTAL_S:
        p.error(f"the phases add up to {total:g} s; keep them under {MAX_TOTAL_S:g} s")
    if args.alloc_mib <= 0 or args.matrix <= 0:
        p.error("--alloc-mib and --matrix must be positive")

    collector = NvmlCollector(interval_s=args.interval_s, engine_env=dict(os.environ))
    why_not = collector.probe()
    if why_not is not None:
        print(f"SKIP: NVML unavailable ({why_not})")
        return EXIT_NO_NVML
    load, why = (load_source or _load_source)(args.matrix)
    if load is None:
        print(f"SKIP: no GPU load source: {why}; install torch with CUDA to run this check")
        return EXIT_NO_LOAD
    uuid, pci = load.identity()
    load.prepare()

    t0_unix = time.time()
    t0_ns = time.monotonic_ns()

    def now_s() -> float:
        return (time.monotonic_ns() - t0_ns) / 1e9

    collector.start(t0_ns)
    if not collector.is_running:
        print(f"SKIP: NVML {collector.status}")
        return EXIT_NO_NVML
    try:
        info = {g["index"]: g for g in collector.gpu_info() if "error" not in g}
        time.sleep(args.idle_s)
        idle = (args.settle_s, now_s())
        reserved = load.allocate(args.alloc_mib)
        hold_from = now_s()
        time.sleep(args.hold_s)
        hold = (hold_from + args.settle_s, now_s())
        load.release()
        load_from = now_s()
        ran = load.run(args.load_s)
        load_win = (load_from + args.settle_s, now_s())
        time.sleep(args.tail_s)  # the power readings' averaging catches up with the energy counter
    finally:
        collector.stop()

    out_dir = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    samples = collector.samples()
    timeline = write_timeline(out_dir / "timeline.csv", samples, t0_unix_s=t0_unix)
    plots: list[str] = []
    if not args.no_plots:
        from harness_fixtures.metrics.plots import write_plots

        plots = [str(x) for x in write_plots(out_dir, samples)]

    run = Run(collector, info, uuid, pci, idle, hold, load_win, reserved, ran, args.interval_s)
    checks = run.checks()
    report = {
        "selection": collector.selection.basis if collector.selection else None,
        "selection_warnings": list(collector.selection.warnings) if collector.selection else [],
        "gpus": list(info.values()),
        "cuda0": {"uuid": uuid, "pci_bus_id": pci},
        "phases_s": {"idle": idle, "hold": hold, "load": load_win},
        "load": ran,
        "allocation_reserved_mib": reserved / 2**20,
        "sample_cost_ms": run.sample_cost_ms(),
        "issues": collector.issues(),
        "status": collector.status,
        "timeline": str(timeline),
        "plots": plots,
        "checks": {name: {"ok": ok, "detail": detail} for name, ok, detail in checks},
    }
    print(json.dumps(report, indent=2, default=str))
    for name, ok, detail in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {name:9s} {detail}")
    failed = [name for name, ok, _ in checks if not ok]
    print("PASS" if not failed else f"FAIL: {', '.join(failed)}")
    return EXIT_OK if not failed else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
