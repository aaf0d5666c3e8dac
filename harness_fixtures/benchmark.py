"""Run one benchmark test: the LoadGen child process, its deadline and the engine watch → result."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import LOADGEN_SCENARIO, BenchmarkCase
from .results import (
    BenchmarkResult,
    MllogError,
    QueryCounts,
    invalid_constraints,
    metrics_from_mllog,
    parse_mllog,
)
from .runner import RunSpec
from .servers import Endpoint

log = logging.getLogger("harness_fixtures.benchmark")
ENGINE_DEATH_GRACE_S = 10.0  # after the engine dies, let LoadGen drain failed queries this long


@dataclass(frozen=True)
class RunOptions:
    user_conf: Path
    mode: str = "performance"
    target_qps: float | None = None
    min_duration_ms: int | None = None
    min_query_count: int | None = None
    sample_count: int | None = None
    request_timeout_s: float = 600.0
    test_timeout_s: float = 7200.0
    api_key_env: str | None = None
    warmup: bool = True
    client_workers: int | None = None  # None: auto (fanout.auto_workers); 1: the in-process client
    single_stream_latency_from_warmup: bool = False


def read_requests(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    with path.open() as fh:
        for line in fh:
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return round(values[k], 3)


def client_summary(requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Client-observed timings (ms): TTFT from send, dispatch lag (LoadGen issue → send)."""
    ok = [r for r in requests if r.get("status") == "ok" and r.get("first_token_s") is not None]
    ttft = [(r["first_token_s"] - r["sent_s"]) * 1e3 for r in ok]
    lag = [(r["sent_s"] - r["issued_s"]) * 1e3 for r in requests if r.get("sent_s") is not None]
    return {
        "ttft_ms_p50": _pct(ttft, 50),
        "ttft_ms_p99": _pct(ttft, 99),
        "ttft_ms_mean": round(statistics.fmean(ttft), 3) if ttft else None,
        "dispatch_lag_ms_p50": _pct(lag, 50),
        "dispatch_lag_ms_p99": _pct(lag, 99),
    }


def client_load(
    scenario: str, requests: list[dict[str, Any]], client: dict[str, Any], values: dict[str, Any]
) -> dict[str, Any]:
    """Achieved vs target rate, client processes and their CPU (what gating.check_client_bound reads).

    Server: achieved = requests sent / (last send − LoadGen start), next to LoadGen's target and its
    scheduled rate (the Poisson schedule it actually drew). Other scenarios: LoadGen's completed rate.
    """
    achieved = None
    if LOADGEN_SCENARIO.get(scenario) == "Server":
        sent = [r["sent_s"] for r in requests if r.get("sent_s") is not None]
        start = client.get("loadgen_start_s")
        if sent and start is not None and max(sent) > start:
            achieved = round(len(sent) / (max(sent) - start), 3)
    else:
        v = values.get("result_samples_per_second", values.get("result_completed_samples_per_sec"))
        achieved = round(float(v), 3) if isinstance(v, (int, float)) else None
    return {
        "requests": len(requests),
        "target_qps": values.get("effective_target_qps"),
        "scheduled_qps": values.get("result_scheduled_samples_per_sec"),
        "achieved_qps": achieved,
        "workers": client.get("workers"),
        "cpu_pct": client.get("cpu_pct_total", client.get("cpu_pct")),
        "cpu_bound_fraction": client.get("cpu_bound_fraction"),
        "cpu_samples": client.get("cpu_samples"),
    }


def _stop_child(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def run_benchmark(
    case: BenchmarkCase,
    scenario: str,
    endpoint: Endpoint,
    opts: RunOptions,
    test_dir: Path,
    dataset_path: Path,
    t0_ns: int | None = None,
    on_start: Callable[[int], None] | None = None,
    on_tick: Callable[[float], None] | None = None,
) -> BenchmarkResult:
    """Run LoadGen for one case × scenario in a child process and turn its logs into a result.

    ``t0_ns`` (time.monotonic_ns) is the test's time origin, shared by requests.jsonl and the
    telemetry timeline; ``on_start(pid)`` is called once the child (the client) is running;
    ``on_tick(elapsed_s)`` about once a second while it runs (progress display).
    """
    test_dir.mkdir(parents=True, exist_ok=True)
    lg_scenario = LOADGEN_SCENARIO[scenario]
    spec = RunSpec(
        test_id=case.test_id(scenario),
        out_dir=str(test_dir),
        base_url=endpoint.base_url,
        served_model=endpoint.served_model,
        api_key_env=opts.api_key_env,
        dataset=case.dataset,
        dataset_path=str(dataset_path),
        generation=case.generation,
        user_conf=str(opts.user_conf),
        loadgen_model=case.loadgen_model[scenario],  # type: ignore[index]
        loadgen_scenario=lg_scenario,  # type: ignore[arg-type]
        mode=opts.mode,  # type: ignore[arg-type]
        target_qps=opts.target_qps,
        min_duration_ms=opts.min_duration_ms,
        min_query_count=opts.min_query_count,
        sample_count=opts.sample_count,
        request_timeout_s=opts.request_timeout_s,
        warmup=opts.warmup,
        client_workers=opts.client_workers,
        single_stream_latency_from_warmup=opts.single_stream_latency_from_warmup,
        t0_monotonic_ns=t0_ns,
    )
    spec_path = test_dir / "run_spec.json"
    spec_path.write_text(spec.model_dump_json(indent=1))
    harness_log = test_dir / "harness.log"
    status: str | None = None
    reason: str | None = None
    t0 = time.monotonic()
    with harness_log.open("ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness_fixtures.runner", str(spec_path)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches pytest only; we stop the child ourselves
        )
    engine_dead_since: float | None = None
    if on_start is not None:
        on_start(proc.pid)
    next_tick = t0
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if on_tick is not None and now >= next_tick:
                on_tick(now - t0)
                next_tick = now + 1.0
            if not endpoint.alive():
                engine_dead_since = engine_dead_since or now
                if now - engine_dead_since > ENGINE_DEATH_GRACE_S:
                    _stop_child(proc)
                    break
            if now - t0 > opts.test_timeout_s:
                status, reason = (
                    "TIMEOUT",
                    f"test deadline of {opts.test_timeout_s:g} s passed; LoadGen stopped",
                )
                _stop_child(proc)
                break
            time.sleep(0.1)
    except BaseException:
        # Ctrl-C / SIGTERM: stop LoadGen, keep what it measured, and let the caller report it.
        _stop_child(proc)
        raise
    rc = proc.returncode
    duration = time.monotonic() - t0
    if not endpoint.alive():
        status = "ERROR"
        reason = (
            f"engine died during the test (exit code {endpoint.exit_code()}); last log lines "
            f"({endpoint.log_path}):\n{endpoint.log_tail()}"
        )
    return build_result(case, scenario, opts.mode, test_dir, status, reason, rc, duration, endpoint.alive())


def build_result(
    case: BenchmarkCase,
    scenario: str,
    mode: str,
    test_dir: Path,
    status: str | None,
    reason: str | None,
    runner_rc: int | None,
    duration_s: float,
    engine_alive: bool,
) -> BenchmarkResult:
    """Assemble result.yaml from whatever exists: LoadGen's detail log, client.json, requests.jsonl."""
    requests = read_requests(test_dir / "requests.jsonl")
    client_path = test_dir / "client.json"
    client = json.loads(client_path.read_text()) if client_path.is_file() else {}
    failed = [r for r in requests if r.get("status") != "ok"]
    counts = QueryCounts(
        issued=client.get("issued", len(requests)),
        completed=client.get("completed", len(requests) - len(failed)),
        failed=client.get("failed", len(failed)),
        output_tokens=client.get("output_tokens", sum(r.get("n_tokens", 0) for r in requests)),
        first_error=client.get("first_error") or next((r.get("error") for r in failed), None),
    )
    fields: dict[str, Any] = {}
    values: dict[str, Any] = {}
    lg_errors: list[str] = []
    constraints: list[str] = []
    try:
        values, lg_errors = parse_mllog(test_dir / "mlperf" / "mlperf_log_detail.txt")
        fields = metrics_from_mllog(values)
        validity = values.get("result_validity")
        if status is None and validity in ("VALID", "INVALID"):
            status = validity
            constraints = invalid_constraints(values) if validity == "INVALID" else []
            reason = "; ".join(constraints) or None
    except MllogError as exc:
        if status is None:
            status, reason = "ERROR", str(exc)
    accuracy_log = test_dir / "mlperf" / "mlperf_log_accuracy.json"
    if status is None and mode == "accuracy" and runner_rc == 0 and accuracy_log.is_file():
        # AccuracyOnly logs no result_validity (no latency constraints to meet): a run that finished
        # and wrote its accuracy log is complete, and the accuracy gate judges it.
        status = "VALID"
    if status is None:
        status = "ERROR"
        reason = (
            f"LoadGen run ended without a result (runner exit code {runner_rc}); see "
            f"{test_dir / 'harness.log'}"
        )
    result = BenchmarkResult(
        test_id=case.test_id(scenario),
        model=case.name,
        scenario=scenario,
        mode=mode,
        loadgen_model=case.loadgen_model[scenario],  # type: ignore[index]
        status=status,  # type: ignore[arg-type]
        reason=reason,
        invalid_constraints=constraints,
        loadgen_errors=lg_errors[:20],
        queries=counts,
        duration_s=round(duration_s, 3),
        engine_alive=engine_alive,
        client={**client_summary(requests), **client_load(scenario, requests, client, values)},
        consistency=client.get("consistency", {}),
        paths={
            "test_dir": str(test_dir),
            "mlperf": str(test_dir / "mlperf"),
            "requests": str(test_dir / "requests.jsonl"),
            "harness_log": str(test_dir / "harness.log"),
        },
        **fields,
    )
    return result
