"""One LoadGen test in its own process: ``python -m harness_fixtures.runner RUN_SPEC.json``.

LoadGen's config state is process-global — only the first ``FromConfig`` in a process loads the
built-in mlperf.conf (FACTS.md §2) — so every test runs here, in a fresh process, exactly as a
standalone MLPerf run would. The process also isolates LoadGen crashes and hangs from pytest.

Outputs in the test folder: ``mlperf/`` (LoadGen logs), ``requests.jsonl`` (one line per request,
appended as requests finish so an interrupted run keeps what it measured) and ``client.json``.
"""

from __future__ import annotations

import array
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .client import ClientConfig, RequestRecord, StreamingClient
from .config import DatasetSpec, GenerationSpec
from .dataset import load_dataset
from .fanout import CpuSampler, FanoutClient, auto_workers, prewarm_connections
from .userconf import parse_user_conf


class RunSpec(BaseModel):
    """Everything the child process needs; written by the parent as run_spec.json (no secrets)."""

    model_config = ConfigDict(extra="forbid")
    test_id: str
    out_dir: str
    base_url: str
    served_model: str
    api_key_env: str | None = None  # the NAME of the variable; the value never touches disk
    dataset: DatasetSpec
    dataset_path: str
    generation: GenerationSpec
    user_conf: str
    loadgen_model: str
    loadgen_scenario: Literal["Offline", "Server", "SingleStream"]
    mode: Literal["performance", "accuracy"] = "performance"
    target_qps: float | None = None
    min_duration_ms: int | None = None
    min_query_count: int | None = None
    sample_count: int | None = None
    request_timeout_s: float = 600.0
    max_connections: int = 1024
    warmup: bool = True
    client_workers: int | None = None  # None: auto (fanout.auto_workers); 1: the in-process client
    # SingleStream sized by the harness (harness_fixtures.sizing): the expected latency is the
    # warm-up request's, measured here just before LoadGen starts.
    single_stream_latency_from_warmup: bool = False
    t0_monotonic_ns: int | None = None  # the test's t0, shared with the parent's collectors


class _RequestLog:
    """Appends finished requests to requests.jsonl from the client thread; flushed about once a second."""

    def __init__(self, path: Path, t0_ns: int) -> None:
        self._fh = path.open("w", buffering=1 << 16)
        self._t0 = t0_ns
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()

    def _s(self, ns: int) -> float | None:
        return round((ns - self._t0) / 1e9, 6) if ns else None

    def write(self, r: RequestRecord) -> None:
        line = {
            "query_id": r.query_id,
            "sample_index": r.sample_index,
            "issued_s": self._s(r.issued_ns),
            "sent_s": self._s(r.sent_ns),
            "first_token_s": self._s(r.first_token_ns),
            "done_s": self._s(r.done_ns),
            "n_tokens": r.n_tokens,
            "finish_reason": r.finish_reason,
            "status": r.status,
            "error": r.error,
            "server_request_id": r.server_request_id,
        }
        with self._lock:
            self._fh.write(json.dumps(line) + "\n")
            now = time.monotonic()
            if now - self._last_flush > 1.0:
                self._fh.flush()
                self._last_flush = now

    def flush(self) -> None:
        with self._lock:
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            self._fh.close()


def _apply_overrides(lg: Any, settings: Any, spec: RunSpec) -> None:
    if spec.target_qps is not None:
        if spec.loadgen_scenario == "Server":
            settings.server_target_qps = spec.target_qps
        elif spec.loadgen_scenario == "Offline":
            settings.offline_expected_qps = spec.target_qps
        else:
            # SingleStream has no QPS; its expected latency is the inverse.
            settings.single_stream_expected_latency_ns = int(1e9 / spec.target_qps)
    if spec.min_duration_ms is not None:
        settings.min_duration_ms = spec.min_duration_ms
    if spec.min_query_count is not None:
        settings.min_query_count = spec.min_query_count


def load_prompts(spec: RunSpec) -> list[list[int] | str]:
    """What is sent per sample index: token ids (completions) or the input text (chat)."""
    ds = load_dataset(spec.dataset, Path(spec.dataset_path))
    n_samples = min(len(ds), spec.sample_count) if spec.sample_count else len(ds)
    prompts: list[list[int] | str] = []
    prompts.extend(
        ds.tok_inputs[:n_samples] if spec.generation.api == "completions" else ds.inputs[:n_samples]
    )
    return prompts


def client_config(spec: RunSpec) -> ClientConfig:
    gen = spec.generation
    return ClientConfig(
        base_url=spec.base_url,
        served_model=spec.served_model,
        api=gen.api,
        max_tokens=gen.max_tokens,
        min_tokens=gen.min_tokens,
        temperature=gen.temperature,
        top_k=gen.top_k,
        top_p=gen.top_p,
        seed=gen.seed,
        ignore_eos=gen.ignore_eos,
        extra_body=gen.extra_body,
        request_timeout_s=spec.request_timeout_s,
        max_connections=spec.max_connections,
        api_key=os.environ.get(spec.api_key_env) if spec.api_key_env else None,
    )


def run(spec: RunSpec) -> int:
    import mlperf_loadgen as lg

    out = Path(spec.out_dir)
    mlperf_dir = out / "mlperf"
    mlperf_dir.mkdir(parents=True, exist_ok=True)
    t0_ns = spec.t0_monotonic_ns or time.monotonic_ns()
    parse_user_conf(Path(spec.user_conf))  # the parent validated it too; never let LoadGen see typos
    prompts = load_prompts(spec)
    n_samples = len(prompts)

    settings = lg.TestSettings()
    rc = settings.FromConfig(spec.user_conf, spec.loadgen_model, spec.loadgen_scenario, 1)
    if rc != 0:
        print(f"error: LoadGen could not load user.conf {spec.user_conf!r} (code {rc})", file=sys.stderr)
        return 3
    settings.scenario = getattr(lg.TestScenario, spec.loadgen_scenario)
    settings.mode = lg.TestMode.AccuracyOnly if spec.mode == "accuracy" else lg.TestMode.PerformanceOnly
    settings.use_token_latencies = True
    _apply_overrides(lg, settings, spec)

    gen = spec.generation
    reqlog = _RequestLog(out / "requests.jsonl", t0_ns)
    unanswered: dict[int, tuple[int, int]] = {}  # query id → (sample index, issued ns) until completed
    # LoadGen reads response buffers during the *Complete call; keep them alive until then.
    keep: dict[int, array.array[int]] = {}

    def on_first(rec: RequestRecord) -> None:
        buf = array.array("i", [rec.first_token_id or 0])
        keep[rec.query_id] = buf
        ptr, _ = buf.buffer_info()
        lg.FirstTokenComplete([lg.QuerySampleResponse(rec.query_id, ptr, buf.itemsize)])

    eos = set(gen.eos_token_ids)
    consistency: dict[str, Any] = {
        "checked": 0,
        "first_token_mismatch": 0,
        "multiple_eos": 0,
        "n_tokens_mismatch": 0,
        "examples": {},
    }

    def check(rec: RequestRecord, data: list[int]) -> None:
        """MLPerf TEST06 in spirit: what LoadGen got for the first token and at the end must agree."""
        consistency["checked"] += 1
        problems = {
            "first_token_mismatch": bool(data) and rec.first_token_id != data[0],
            "multiple_eos": sum(1 for t in rec.token_ids if t in eos) > 1,
            "n_tokens_mismatch": rec.n_tokens != len(data),
        }
        for key, bad in problems.items():
            if bad:
                consistency[key] += 1
                consistency["examples"].setdefault(
                    key,
                    f"query {rec.query_id}: first={rec.first_token_id} data[:3]={data[:3]} "
                    f"n_tokens={rec.n_tokens} len(data)={len(data)}",
                )

    def on_complete(rec: RequestRecord) -> None:
        unanswered.pop(rec.query_id, None)
        reqlog.write(rec)
        if rec.status == "ok":
            ids = rec.token_ids if gen.first_token_in_complete else rec.token_ids[1:]
            check(rec, ids)
            buf = array.array("i", ids)
            ptr, n = buf.buffer_info()
            resp = lg.QuerySampleResponse(rec.query_id, ptr, n * buf.itemsize, rec.n_tokens)
        else:
            # A failed request completes with zero tokens so LoadGen can finish; it is counted as failed.
            buf = array.array("i")
            resp = lg.QuerySampleResponse(rec.query_id, 0, 0, 0)
            if not rec.first_token_ns:
                # With token latencies on, a sample completed without a first token turns LoadGen's
                # TTFT statistics into garbage (mean ~1e17 ns): report an empty first response first.
                lg.FirstTokenComplete([lg.QuerySampleResponse(rec.query_id, 0, 0)])
        lg.QuerySamplesComplete([resp])
        keep.pop(rec.query_id, None)
        del buf
        # LoadGen has copied the ids; the record stays in client.records for the whole run, and ~40
        # bytes per kept token made the runner grow by GBs in long runs (tools/soak.py).
        rec.token_ids = []

    rate = (
        settings.server_target_qps
        if spec.loadgen_scenario == "Server"
        else settings.offline_expected_qps
        if spec.loadgen_scenario == "Offline"
        else None
    )
    workers = spec.client_workers or auto_workers(spec.loadgen_scenario, rate)
    client: StreamingClient | FanoutClient
    if workers == 1:
        client = StreamingClient(client_config(spec), prompts, on_first, on_complete)
    else:
        # LoadGen stays here; HTTP streams go to worker processes (harness_fixtures.fanout).
        client = FanoutClient(spec.model_dump_json(), workers, on_first, on_complete)
    print(f"client: {workers} worker process(es) for {spec.loadgen_scenario} at {rate} QPS", flush=True)
    client.start()
    _keep_results_on_sigterm(out, reqlog, client, unanswered)
    warmup: dict[str, Any] = {}
    if spec.warmup:
        w = client.warmup(0, timeout_s=spec.request_timeout_s)
        warmup = {
            "status": w.status,
            "error": w.error,
            "n_tokens": w.n_tokens,
            "latency_s": round((w.done_ns - w.sent_ns) / 1e9, 4),
        }
        print(f"warm-up request: {warmup}", flush=True)
        if spec.single_stream_latency_from_warmup and w.status == "ok":
            settings.single_stream_expected_latency_ns = w.done_ns - w.sent_ns
            warmup["single_stream_expected_latency_ms"] = round((w.done_ns - w.sent_ns) / 1e6, 3)
        want = prewarm_connections(
            spec.loadgen_scenario,
            rate,
            (w.done_ns - w.sent_ns) / 1e9,
            settings.min_query_count,
            settings.min_duration_ms / 1000,
            spec.max_connections,
        )
        warmup["connections"] = client.prewarm(want, timeout_s=min(60.0, spec.request_timeout_s))

    def issue(samples: list[Any]) -> None:
        now = time.monotonic_ns()
        for s in samples:
            unanswered[s.id] = (s.index, now)
        client.submit([(s.id, s.index) for s in samples])

    def flush() -> None:
        pass

    sut = lg.ConstructSUT(issue, flush)
    qsl = lg.ConstructQSL(n_samples, spec.dataset.performance_sample_count or n_samples, _noop, _noop)
    log_out = lg.LogOutputSettings()
    log_out.outdir = str(mlperf_dir)
    log_out.copy_summary_to_stdout = True
    log_settings = lg.LogSettings()
    log_settings.log_output = log_out
    log_settings.enable_trace = False
    cpu = CpuSampler().start()
    start_ns = time.monotonic_ns()
    lg.StartTestWithLogSettings(sut, qsl, settings, log_settings)
    end_ns = time.monotonic_ns()
    cpu_stats = cpu.stop()
    lg.DestroyQSL(qsl)
    lg.DestroySUT(sut)
    client.stop()
    reqlog.close()

    ok = [r for r in client.records if r.status == "ok"]
    summary: dict[str, Any] = {
        "t0_monotonic_ns": t0_ns,
        "loadgen_start_s": round((start_ns - t0_ns) / 1e9, 6),
        "loadgen_end_s": round((end_ns - t0_ns) / 1e9, 6),
        "issued": len(client.records),
        "completed": len(ok),
        "failed": client.failed,
        "output_tokens": sum(r.n_tokens for r in ok),
        "first_error": client.first_error,
        "warmup": warmup,
        "consistency": consistency,
        "samples": n_samples,
        "workers": workers,
        # This process's CPU (all its threads: LoadGen, client loop) over the LoadGen run, % of one
        # core, sampled each second; with workers, theirs too, and the busiest process's fraction.
        **cpu_stats,
    }
    if isinstance(client, FanoutClient):
        stats = client.worker_stats()
        summary["worker_processes"] = stats
        summary["cpu_pct_total"] = round(cpu_stats["cpu_pct"] + sum(w.get("cpu_pct", 0) for w in stats), 1)
        fractions = [cpu_stats["cpu_bound_fraction"], *(w.get("cpu_bound_fraction") for w in stats)]
        summary["cpu_bound_fraction"] = max((f for f in fractions if f is not None), default=None)
    (out / "client.json").write_text(json.dumps(summary, indent=1))
    return 0


def _keep_results_on_sigterm(
    out: Path, reqlog: _RequestLog, client: Any, unanswered: dict[int, tuple[int, int]]
) -> None:
    """On SIGTERM (the test deadline, or pytest interrupted) write what was measured, then exit.

    LoadGen holds the main thread in C++ for the whole run, where no Python signal handler runs; the
    signal's wakeup fd wakes a thread instead. Queries issued but not answered are written to
    requests.jsonl as failed and counted in client.json, so a stopped run still says how many hung.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # a handler, so the wakeup fd is written
    signal.set_wakeup_fd(wfd)

    def watch() -> None:
        while signal.SIGTERM not in os.read(rfd, 64):
            pass
        try:
            error = "not answered: the runner was stopped (test deadline, or pytest interrupted)"
            pending = dict(unanswered)
            for qid, (idx, issued_ns) in pending.items():
                reqlog.write(RequestRecord(qid, idx, issued_ns, status="error", error=error))
            reqlog.flush()
            done = [r for r in list(client.records) if r.status not in ("pending", "running")]
            ok = [r for r in done if r.status == "ok"]
            issued = len({r.query_id for r in done} | set(pending))
            summary = {
                "issued": issued,
                "completed": len(ok),
                "failed": issued - len(ok),
                "output_tokens": sum(r.n_tokens for r in ok),
                "first_error": client.first_error or (error if pending else None),
                "stopped_by": "SIGTERM",
            }
            (out / "client.json").write_text(json.dumps(summary, indent=1))
        finally:
            os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="harness-sigterm", daemon=True).start()


def _noop(_: Any) -> None:
    pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m harness_fixtures.runner RUN_SPEC.json", file=sys.stderr)
        return 2
    spec = RunSpec.model_validate_json(Path(args[0]).read_text())
    return run(spec)


if __name__ == "__main__":
    sys.exit(main())
