"""Soak benchmark: one long Server run against the simulator, the harness's memory sampled over time.

Not a test (and not in CI): it prints a table and the slope. The run goes through
``harness_fixtures.pipeline.run_test`` with its per-test telemetry, exactly as a
benchmark test does, for ``--duration-s`` (default 30 minutes) at ``--qps``. Every ``--interval-s`` it
samples the resident memory (RSS) of the LoadGen runner process (LoadGen + client), of the runner with
its client worker processes, and of this process (the pytest side: engine watch and collectors).

    .venv/bin/python tools/soak.py                       # 30 minutes at 50 QPS
    .venv/bin/python tools/soak.py --duration-s 120 --interval-s 5 --csv soak.csv

Flat = no leak: the slope is a least-squares fit over the samples after ``--warmup-s``; the growth it
implies over that window is compared with ``--max-growth-mib`` (exit code 1 when exceeded).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from harness_fixtures.config import BenchmarkCase, plan_runs
from harness_fixtures.options import HarnessOptions
from harness_fixtures.pipeline import Events, Suite, run_test
from harness_fixtures.servers import LaunchContext
from harness_fixtures.servers.launchers import SimLauncher

LOADGEN_MODEL = "soak"
MIB = 1024 * 1024


@dataclass
class Sample:
    t_s: float
    runner_mib: float | None
    runner_tree_mib: float | None
    harness_mib: float
    completed: int


def write_inputs(work: Path, samples: int, prompt_len: int, qps: float, duration_s: float) -> Path:
    rng = random.Random(0)
    rows = [
        {"input": f"p{i}", "tok_input": [rng.randrange(3, 30_000) for _ in range(prompt_len)], "output": ""}
        for i in range(samples)
    ]
    (work / "prompts.json").write_text(json.dumps(rows))
    conf = work / "user.conf"
    # Latency limits far above the simulator's: validity is not what this measures.
    conf.write_text(
        f"{LOADGEN_MODEL}.*.performance_sample_count_override = {samples}\n"
        f"{LOADGEN_MODEL}.*.use_token_latencies = 1\n"
        f"{LOADGEN_MODEL}.Server.target_qps = {qps}\n"
        f"{LOADGEN_MODEL}.Server.min_duration = {int(duration_s * 1000)}\n"
        f"{LOADGEN_MODEL}.Server.min_query_count = 1\n"
        f"{LOADGEN_MODEL}.Server.target_latency_percentile = 99\n"
        f"{LOADGEN_MODEL}.Server.ttft_latency = 10000\n"
        f"{LOADGEN_MODEL}.Server.tpot_latency = 1000\n"
    )
    return conf


def make_case(work: Path, tokens: int) -> BenchmarkCase:
    return BenchmarkCase.model_validate(
        {
            "name": "soak",
            "engine": {
                "kind": "sim",
                "start_timeout_s": 60,
                "stop_timeout_s": 10,
                # Few records kept: the simulator's own memory is not what this measures.
                "sim": {"ttft_base_ms": 50, "itl_ms": 5, "max_batch": 10_000, "records_max": 1000},
            },
            "dataset": {"path": str(work / "prompts.json")},
            "generation": {"max_tokens": tokens, "ignore_eos": True},
            "loadgen_model": {"Server": LOADGEN_MODEL},
            "scenarios": ["Server"],
        }
    )


def rss_mib(proc: psutil.Process | None, tree: bool = False) -> float | None:
    if proc is None:
        return None
    try:
        total = proc.memory_info().rss
        if tree:
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
        return total / MIB
    except psutil.Error:
        return None


class Sampler:
    """Samples RSS every ``interval_s`` on its own thread, once the runner's pid is known."""

    def __init__(self, interval_s: float, requests_path: Path) -> None:
        self.interval_s = interval_s
        self.requests_path = requests_path
        self.samples: list[Sample] = []
        self.runner: psutil.Process | None = None
        self.me = psutil.Process()
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)
        self._offset = 0
        self._completed = 0

    def start(self, runner_pid: int) -> None:
        self.runner = psutil.Process(runner_pid)
        self._t0 = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _count_completed(self) -> int:
        # Read only what was appended since the last sample: the file grows for the whole run.
        try:
            with self.requests_path.open("rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except OSError:
            return self._completed
        self._offset += len(data)
        self._completed += data.count(b"\n")
        return self._completed

    def _run(self) -> None:
        while True:
            self.samples.append(
                Sample(
                    t_s=time.monotonic() - self._t0,
                    runner_mib=rss_mib(self.runner),
                    runner_tree_mib=rss_mib(self.runner, tree=True),
                    harness_mib=rss_mib(self.me) or 0.0,
                    completed=self._count_completed(),
                )
            )
            if self._stop.wait(self.interval_s):
                return


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) points, in MiB per minute."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return None
    return 60 * sum((t - mx) * (v - my) for t, v in points) / sxx


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def report(samples: list[Sample], warmup_s: float, max_growth_mib: float) -> bool:
    """Print the table and the slopes; True when every series is flat."""
    print(f"{'t_s':>8} {'runner MiB':>11} {'runner+workers MiB':>19} {'harness MiB':>12} {'completed':>10}")
    for s in samples:
        print(
            f"{s.t_s:8.0f} {_fmt(s.runner_mib):>11} {_fmt(s.runner_tree_mib):>19} "
            f"{s.harness_mib:12.1f} {s.completed:10d}"
        )
    steady = [s for s in samples if s.t_s >= warmup_s and s.runner_mib is not None]
    if len(steady) < 3:
        print(f"too few samples after the {warmup_s:g} s warm-up for a slope; run longer")
        return False
    window_min = (steady[-1].t_s - steady[0].t_s) / 60
    flat = True
    print(f"\nslope over {steady[0].t_s:.0f}-{steady[-1].t_s:.0f} s ({len(steady)} samples):")
    for name, values in (
        ("runner", [(s.t_s, s.runner_mib) for s in steady]),
        ("runner+workers", [(s.t_s, s.runner_tree_mib) for s in steady]),
        ("harness", [(s.t_s, s.harness_mib) for s in steady]),
    ):
        points = [(t, v) for t, v in values if v is not None]
        slope = slope_per_min(points)
        if slope is None:
            continue
        growth = slope * window_min
        ok = growth <= max_growth_mib
        flat = flat and ok
        print(
            f"  {name:<15} {slope:+8.3f} MiB/min  ({growth:+7.1f} MiB over {window_min:.1f} min, "
            f"{slope * 60:+8.1f} MiB/h)  {'flat' if ok else 'GROWING'}"
        )
    completed = steady[-1].completed - steady[0].completed
    if completed > 0:
        growth = (steady[-1].runner_mib or 0.0) - (steady[0].runner_mib or 0.0)
        print(f"  runner growth per completed request: {growth * MIB / completed:+.0f} bytes")
    return flat


class _Watch(Events):
    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def child_started(self, pid: int) -> None:
        self.sampler.start(pid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration-s", type=float, default=1800.0, help="LoadGen run length. Default: 1800.")
    parser.add_argument("--qps", type=float, default=50.0, help="Server target QPS. Default: 50.")
    parser.add_argument("--tokens", type=int, default=64, help="Output tokens per request. Default: 64.")
    parser.add_argument(
        "--interval-s", type=float, default=10.0, help="Seconds between samples. Default: 10."
    )
    parser.add_argument(
        "--warmup-s", type=float, default=None, help="Samples before this are left out of the slope. "
        "Default: 10 %% of the duration, at most 120 s."
    )  # fmt: skip
    parser.add_argument(
        "--max-growth-mib", type=float, default=10.0,
        help="Growth over the measured window that counts as a leak (exit code 1). Default: 10.",
    )  # fmt: skip
    parser.add_argument(
        "--csv", type=Path, default=Path("soak.csv"), help="CSV of samples. Default: soak.csv."
    )
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="Where the run's files go. Default: a temporary folder."
    )
    args = parser.parse_args(argv)
    if args.duration_s <= 0 or args.qps <= 0 or args.interval_s <= 0:
        parser.error("--duration-s, --qps and --interval-s must be > 0")
    warmup_s = args.warmup_s if args.warmup_s is not None else min(120.0, args.duration_s / 10)

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        conf = write_inputs(work, samples=1024, prompt_len=128, qps=args.qps, duration_s=args.duration_s)
        case = make_case(work, args.tokens)
        launcher = SimLauncher()
        endpoint = launcher.start(LaunchContext(case=case, run_dir=work / "engine"))
        test_dir = work / "soak_server"
        sampler = Sampler(args.interval_s, test_dir / "requests.jsonl")
        print(
            f"soak: Server at {args.qps:g} QPS for {args.duration_s:g} s, {args.tokens} tokens/request, "
            f"sampling every {args.interval_s:g} s (pid {os.getpid()}; files in {work})",
            flush=True,
        )
        # The same pipeline a pytest test runs (telemetry included); the sampler watches its runner.
        options = HarnessOptions(user_conf=conf, request_timeout_s=60, test_timeout_s=args.duration_s + 600)
        (planned,) = [r for r in plan_runs(case) if r.scenario == "Server"]
        try:
            result = run_test(planned, lambda: endpoint, Suite(options), test_dir, _Watch(sampler)).result
        finally:
            sampler.stop()
            launcher.stop(endpoint)
        q = result.queries
        print(
            f"run: {result.status}, {q.completed} completed, {q.failed} failed, "
            f"{result.samples_per_s or 0:.1f} samples/s\n"
        )
        with args.csv.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["t_s", "runner_rss_mib", "runner_tree_rss_mib", "harness_rss_mib", "completed"])
            for s in sampler.samples:
                writer.writerow(
                    [round(s.t_s, 2), _fmt(s.runner_mib, ".2f"), _fmt(s.runner_tree_mib, ".2f"),
                     round(s.harness_mib, 2), s.completed]
                )  # fmt: skip
        flat = report(sampler.samples, warmup_s, args.max_growth_mib)
        print(f"\nsamples: {args.csv}")
    return 0 if flat and q.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
