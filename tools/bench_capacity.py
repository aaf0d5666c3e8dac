"""Capacity-search benchmark: the harness's search against LoadGen's FindPeakPerformance, on the simulator.

For each simulated capacity (the simulator's batch slots), in one run of this script:

* **truth**: full-length LoadGen runs with the user's settings (min duration, min queries, early
  stopping), bisected until the highest VALID load and the lowest INVALID one are within 2 %; the
  search starts from a queue model of the simulator (``max_batch`` FIFO slots, each held for
  TTFT + (tokens − 1) × ITL) fed with LoadGen's own arrival schedule;
* **harness**: ``--harness-find-capacity`` through the pipeline (its Offline probe, probes of a tenth
  of a full run, the full-length confirmation), timed end to end;
* **LoadGen FindPeakPerformance**: LoadGen's mode in the same runner child, full-length runs,
  doubling from a passing lower bound then bisecting to 0.1 QPS.

    .venv/bin/python tools/bench_capacity.py --batches 2,4,8

Prints one table: found / truth, runs and wall time of each, and the wall-time ratio. Every LoadGen
run pays a fixed start cost (a Python child process, LoadGen's start, the log parse: about 2 s on a
2-core machine), so the ratio depends on the full-run length; ``--full-s`` sets it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness_fixtures.client.requestlog import read_requests
from harness_fixtures.config import BenchmarkCase, plan_runs
from harness_fixtures.loadgen.child import run_child
from harness_fixtures.loadgen.mllog import LoadGenRun
from harness_fixtures.loadgen.spec import RunSpec
from harness_fixtures.options import HarnessOptions
from harness_fixtures.pipeline import Suite, run_test
from harness_fixtures.servers import Endpoint, LaunchContext
from harness_fixtures.servers.launchers import SimLauncher
from harness_fixtures.stats import percentile

# Each request holds a batch slot for 20 + 15 × 2 = 50 ms; the TTFT limit leaves 60 ms of queueing
# on top of the unloaded 20 ms (several slot turnovers: a queue, not a step, as on a real server).
TOKENS, TTFT_MS, ITL_MS, LIMIT_MS, PCT = 16, 20.0, 2.0, 80, 90
MIN_QUERIES = 1000  # a "full" run here (with --full-s); the harness's probes are a tenth of it
TRUTH_PRECISION = 1.02


def write_inputs(work: Path, full_s: float) -> tuple[Path, Path]:
    data = work / "prompts.json"
    data.write_text(
        json.dumps([{"input": f"p{i}", "tok_input": [5 + i, 6, 7, 8], "output": "x"} for i in range(64)])
    )
    conf = work / "user.conf"
    conf.write_text(
        "tiny.*.performance_sample_count_override = 64\n"
        "tiny.*.use_token_latencies = 1\n"
        "tiny.Offline.target_qps = 1000\n"
        "tiny.Offline.min_duration = 200\n"
        "tiny.Offline.min_query_count = 200\n"
        f"tiny.Server.min_duration = {int(full_s * 1000)}\n"
        f"tiny.Server.min_query_count = {MIN_QUERIES}\n"
        f"tiny.Server.target_latency_percentile = {PCT}\n"
        f"tiny.Server.ttft_latency = {LIMIT_MS}\n"
        "tiny.Server.tpot_latency = 1000\n"
    )
    return data, conf


def case_for(data: Path, batch: int) -> BenchmarkCase:
    return BenchmarkCase.model_validate(
        {
            "name": f"cap{batch}",
            "engine": {"kind": "sim", "sim": {"ttft_base_ms": TTFT_MS, "itl_ms": ITL_MS, "max_batch": batch}},
            "dataset": {"path": str(data)},
            "generation": {"max_tokens": TOKENS, "ignore_eos": True},
            "loadgen_model": {"Offline": "tiny", "Server": "tiny"},
            "scenarios": ["Server"],
        }
    )


def model_estimate(gaps: list[float], batch: int) -> float:
    """The highest rate whose p90 TTFT under LoadGen's schedule stays within the limit in a queue model
    of the simulator (no HTTP, client or scheduling cost: an upper estimate, the truth search's seed)."""
    hold = (TTFT_MS + (TOKENS - 1) * ITL_MS) / 1000

    def p90_ttft_ms(rate: float) -> float:
        free = [0.0] * batch  # when each slot frees up
        t, ttfts = 0.0, []
        for g in gaps:
            t += g / rate
            i = min(range(batch), key=free.__getitem__)
            start = max(t, free[i])
            free[i] = start + hold
            ttfts.append((start - t) * 1000 + TTFT_MS)
        got = percentile(ttfts, PCT)
        assert got is not None
        return got

    lo, hi = 1.0, 10_000.0
    while hi / lo > 1.001:
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if p90_ttft_ms(mid) <= LIMIT_MS else (lo, mid)
    return lo


def schedule_gaps(run_dir: Path, rate: float) -> list[float]:
    """LoadGen's Server arrival gaps, normalized to rate 1, from a run's request log."""
    issued = sorted(
        r["issued_s"] for r in read_requests(run_dir / "requests.jsonl") if r.get("issued_s") is not None
    )
    return [(b - a) * rate for a, b in itertools.pairwise(issued)]


def full_run(spec: Any, endpoint: Any, out: Path, qps: float) -> bool:
    """One full-length LoadGen run at ``qps`` with the user's settings: VALID or not."""
    run = spec.model_copy(update={"out_dir": str(out), "mode": "performance", "target_qps": round(qps, 4)})
    run_child(run, endpoint)
    return LoadGenRun.read(out / "mlperf").validity == "VALID"


def truth_by_bisection(spec: Any, endpoint: Any, work: Path, seed: float) -> tuple[float, int, float]:
    """(highest VALID load, full runs made, wall s): bisection of full-length runs around ``seed``."""
    t0, n = time.monotonic(), 0
    lo, hi = seed * 0.5, seed * 1.2

    def valid(qps: float) -> bool:
        nonlocal n
        n += 1
        return full_run(spec, endpoint, work / f"run-{n:02d}", qps)

    while not valid(lo):  # the lower end must pass, the upper fail
        lo, hi = lo / 2, lo
    while valid(hi):
        lo, hi = hi, hi * 1.5
    while hi / lo > TRUTH_PRECISION:
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if valid(mid) else (lo, mid)
    return lo, n, time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="2,4,8", help="Simulator batch slots, one capacity each.")
    parser.add_argument("--full-s", type=float, default=20.0, help="Min duration of a full run (s).")
    parser.add_argument("--work-dir", type=Path, help="Keep the runs here (default: a temporary folder).")
    parser.add_argument(
        "--reference",
        type=Path,
        help="The JSON rows an earlier run printed: its truth and FindPeakPerformance numbers are reused "
        "for the same slots, and only the harness runs (to compare a change of the search).",
    )
    args = parser.parse_args(argv)
    reference: dict[int, dict[str, Any]] = {}
    if args.reference is not None:
        for line in args.reference.read_text().splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                reference[int(row["batch"])] = row
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-capacity-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data, conf = write_inputs(work, args.full_s)
        for batch in (int(b) for b in args.batches.split(",")):
            case = case_for(data, batch)
            launcher = SimLauncher()
            endpoint = launcher.start(LaunchContext(case=case, run_dir=work / f"engine-{batch}"))

            def current(ep: Endpoint = endpoint) -> Endpoint:
                return ep

            try:
                (planned,) = [r for r in plan_runs(case) if r.scenario == "Server"]
                options = HarnessOptions(
                    user_conf=conf, find_capacity=True, request_timeout_s=60, test_timeout_s=3600
                )
                t0 = time.monotonic()
                outcome = run_test(planned, current, Suite(options), work / f"harness-{batch}")
                harness_wall = time.monotonic() - t0
                cap = outcome.result.capacity
                assert cap is not None and cap.found_qps is not None, outcome.result.reason
                # the run's own spec file: absolute paths (metadata.yaml's are relative to the session)
                spec = RunSpec.model_validate_json((work / f"harness-{batch}" / "run_spec.json").read_text())
                ref = reference.get(batch)
                if ref is not None:
                    seed = ref["model_qps"]
                    truth, truth_runs, truth_wall = ref["truth_qps"], ref["truth_runs"], ref["truth_wall_s"]
                    fpp_found, fpp_runs, fpp_wall = (
                        ref["findpeak_found"],
                        ref["findpeak_runs"],
                        ref["findpeak_wall_s"],
                    )
                else:
                    gaps = schedule_gaps(
                        work / f"harness-{batch}", float(outcome.result.settings["target_qps"])
                    )
                    seed = model_estimate(gaps * 20, batch)  # the same gaps, enough of them for any rate
                    truth, truth_runs, truth_wall = truth_by_bisection(
                        spec, endpoint, work / f"truth-{batch}", seed
                    )

                    # LoadGen's FindPeakPerformance from a lower bound that passes (a quarter of the truth).
                    fpp = spec.model_copy(
                        update={
                            "out_dir": str(work / f"findpeak-{batch}"),
                            "mode": "find_peak",
                            "target_qps": round(truth / 4, 3),
                        }
                    )
                    t0 = time.monotonic()
                    run_child(fpp, endpoint)
                    fpp_wall = time.monotonic() - t0
                    fpp_found, fpp_runs = find_peak_result(Path(fpp.out_dir))
            finally:
                launcher.stop(endpoint)
            rows.append(
                {
                    "batch": batch,
                    "model_qps": round(seed, 2),
                    "truth_qps": round(truth, 2),
                    "truth_runs": truth_runs,
                    "truth_wall_s": round(truth_wall, 1),
                    "harness_found": cap.found_qps,
                    "harness_ratio": round(cap.found_qps / truth, 3),
                    "harness_probes": len(cap.probes),
                    "harness_probes_wall_s": round(sum(p.duration_s for p in cap.probes), 1),
                    "harness_total_wall_s": round(harness_wall, 1),
                    "confirmation": outcome.result.status,
                    "confirmation_qps": outcome.result.settings.get("target_qps"),
                    "full_runs": len(cap.confirmations),
                    "confirmed_qps": cap.confirmed_qps,
                    "confirmed_ratio": round(cap.confirmed_qps / truth, 3) if cap.confirmed_qps else None,
                    "findpeak_found": fpp_found,
                    "findpeak_ratio": round(fpp_found / truth, 3) if fpp_found else None,
                    "findpeak_runs": fpp_runs,
                    "findpeak_wall_s": round(fpp_wall, 1),
                    "wall_ratio": round(harness_wall / fpp_wall, 3),
                    "reference": ref is not None,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nCommand: `.venv/bin/python tools/bench_capacity.py {' '.join(argv or sys.argv[1:])}`\n")
    print(
        "| slots | truth QPS (full runs) | probes found (÷ truth) | probes | full runs | harness confirmed "
        "(÷ truth) | harness s (probes / total) | FindPeak found (÷ truth) | FindPeak runs | FindPeak s "
        "| harness ÷ FindPeak wall |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fp = f"{r['findpeak_found']:.1f} ({r['findpeak_ratio']})" if r["findpeak_found"] else "none"
        confirmed = (
            f"VALID at {r['confirmed_qps']:.1f} ({r['confirmed_ratio']})"
            if r["confirmed_qps"]
            else f"{r['confirmation']} at {r['confirmation_qps']}"
        )
        print(
            f"| {r['batch']} | {r['truth_qps']} ({r['truth_runs']}) | {r['harness_found']:.1f} "
            f"({r['harness_ratio']}) | {r['harness_probes']} | {r['full_runs']} | {confirmed} | "
            f"{r['harness_probes_wall_s']} / {r['harness_total_wall_s']} | {fp} | "
            f"{r['findpeak_runs']} | {r['findpeak_wall_s']} | {r['wall_ratio']} |"
        )
    return 0


def find_peak_result(run_dir: Path) -> tuple[float | None, int]:
    """(the QPS FindPeakPerformance settled on, how many full runs it made) from its detail log."""
    text = (run_dir / "mlperf" / "mlperf_log_detail.txt").read_text(errors="replace")
    found = re.search(r"Found peak performance field: [^0-9]*([0-9.]+)", text)
    runs = len(re.findall(r'"key": "generated_query_count"', text))  # logged once per performance run
    return (float(found.group(1)) if found else None), runs


if __name__ == "__main__":
    sys.exit(main())
