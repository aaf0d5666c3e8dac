"""One LoadGen test in its own process: ``python -m harness_fixtures.loadgen.runner RUN_SPEC.json``.

LoadGen's config state is process-global — only the first ``FromConfig`` in a process loads the
built-in mlperf.conf (docs/loadgen.md) — so every test runs here, in a fresh process, exactly as a
standalone MLPerf run would. The process also isolates LoadGen crashes and hangs from pytest.

Outputs in the test folder: ``mlperf/`` (LoadGen logs), ``requests.jsonl`` (one line per request,
appended as requests finish so an interrupted run keeps what it measured) and ``client.json``.
"""

from __future__ import annotations

import array
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..client.cpu import CpuSampler
from ..client.dispatch import MultiEndpointClient
from ..client.errors import HttpError
from ..client.fanout import FanoutClient
from ..client.httpconfig import HttpConfig, HttpConfigError, ServerUrl
from ..client.payload import describe_token_source, model_ids
from ..client.requestlog import RequestLogWriter
from ..client.sizing import auto_workers, prewarm_connections
from ..client.streaming import RequestRecord, StreamingClient
from ..metrics.window import engine_window, fetch_metrics_text
from ..results import write_json
from .spec import RunSpec


def _apply_overrides(settings: Any, spec: RunSpec) -> None:
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


def network_sut_name(http: HttpConfig, urls: list[ServerUrl]) -> str:
    """The SUT's name when its nodes are across a network (MLPerf's Network division): "Network SUT"
    and the unique names of its nodes, each learnt by a round trip to it (its /v1/models), as the
    rules ask of a Query Dispatch Library's ``Name``. A node that does not answer is named so."""
    nodes = set()
    for url in urls:
        where = f"{url.host}:{url.port}"
        try:
            reply = http.get(url, "/v1/models", timeout_s=10)
        except HttpError as exc:
            nodes.add(f"{where} (unreachable: {type(exc).__name__})")
            continue
        ids = model_ids(reply.text) if reply.status == 200 else None
        nodes.add(
            f"{where} ({', '.join(sorted(map(str, ids)))})" if ids else f"{where} (HTTP {reply.status})"
        )
    return "Network SUT: " + "; ".join(sorted(nodes))


def run(spec: RunSpec) -> int:
    import mlperf_loadgen as lg

    out = Path(spec.out_dir)
    mlperf_dir = out / "mlperf"
    mlperf_dir.mkdir(parents=True, exist_ok=True)
    t0_ns = spec.t0_monotonic_ns or time.monotonic_ns()
    # user.conf was validated by the parent before any engine started: LoadGen itself ignores typos.
    prompts = spec.client.load_prompts()
    n_samples = len(prompts)

    settings = lg.TestSettings()
    rc = settings.FromConfig(spec.user_conf, spec.loadgen_model, spec.loadgen_scenario, 1)
    if rc != 0:
        print(f"error: LoadGen could not load user.conf {spec.user_conf!r} (code {rc})", file=sys.stderr)
        return 3
    settings.scenario = getattr(lg.TestScenario, spec.loadgen_scenario)
    settings.mode = {
        "accuracy": lg.TestMode.AccuracyOnly,
        "find_peak": lg.TestMode.FindPeakPerformance,
    }.get(spec.mode, lg.TestMode.PerformanceOnly)
    settings.use_token_latencies = True
    _apply_overrides(settings, spec)

    gen = spec.client.generation
    with_ids = spec.client.token_source == "token_ids"
    reqlog = RequestLogWriter(out / "requests.jsonl", t0_ns)
    unanswered: dict[int, tuple[int, int]] = {}  # query id → (sample index, issued ns) until completed
    # LoadGen reads response buffers during the *Complete call; keep them alive until then.
    keep: dict[int, array.array[int]] = {}

    def on_first(rec: RequestRecord) -> None:
        if rec.first_token_id is None:
            # Tokens counted from usage (no ids in this server's stream): the time is real, the id
            # unknown, and none is made up.
            lg.FirstTokenComplete([lg.QuerySampleResponse(rec.query_id, 0, 0)])
            return
        buf = array.array("i", [rec.first_token_id])
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
        if rec.prompt_tokens is None and isinstance(prompts[rec.sample_index], list):
            rec.prompt_tokens = len(prompts[rec.sample_index])  # a server that sent no usage
        reqlog.write(rec)
        if rec.status == "ok":
            ids = rec.token_ids if gen.first_token_in_complete else rec.token_ids[1:]
            if with_ids:
                check(rec, ids)  # nothing to check when the stream carried no ids
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
        rec.chunk_ns = []

    rate = (
        settings.server_target_qps
        if spec.loadgen_scenario == "Server"
        else settings.offline_expected_qps
        if spec.loadgen_scenario == "Offline"
        else None
    )
    workers = spec.client_workers or auto_workers(spec.loadgen_scenario, rate)
    client: StreamingClient | FanoutClient | MultiEndpointClient
    try:
        if len(spec.client.endpoints) > 1:
            # One LoadGen, several endpoints: the dispatch picks one per query (client.dispatch).
            HttpConfig.build(spec.client.http, check_environment=False)
            client = MultiEndpointClient(spec.client, prompts, workers, on_first, on_complete)
        elif workers == 1:
            client = StreamingClient(spec.client, prompts, on_first, on_complete)
        else:
            # LoadGen stays here; HTTP streams go to worker processes (harness_fixtures.client.fanout).
            # a setting this process cannot use fails here, clearly
            HttpConfig.build(spec.client.http, check_environment=False)
            client = FanoutClient(spec.client, workers, on_first, on_complete)
        print(f"client: {workers} worker process(es) for {spec.loadgen_scenario} at {rate} QPS", flush=True)
        client.start()
    except HttpConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    if isinstance(client, StreamingClient) and client.connections_note:
        print(f"client: {client.connections_note}", flush=True)
    _keep_results_on_sigterm(out, reqlog, client, unanswered)
    warmup: dict[str, Any] = {}
    if spec.warmup:
        w = client.warmup(0, timeout_s=spec.client.request_timeout_s)
        latency_ns = w.done_ns - (w.sent_ns or w.issued_ns)  # a request that failed unsent has no sent_ns
        warmup = {
            "status": w.status,
            "error": w.error,
            "n_tokens": w.n_tokens,
            "latency_s": round(latency_ns / 1e9, 4),
            # When it ran (seconds since t0, the timeline's clock) and how fast the idle engine answered.
            "start_s": round(((w.sent_ns or w.issued_ns) - t0_ns) / 1e9, 6),
            "end_s": round((w.done_ns - t0_ns) / 1e9, 6),
            "ttft_s": round((w.first_token_ns - (w.sent_ns or w.issued_ns)) / 1e9, 4)
            if w.first_token_ns
            else None,
            "tpot_s": round((w.done_ns - w.first_token_ns) / 1e9 / (w.n_tokens - 1), 5)
            if w.first_token_ns and w.n_tokens > 1
            else None,
        }
        print(f"warm-up request: {warmup}", flush=True)
        if spec.single_stream_latency_from_warmup and w.status == "ok":
            settings.single_stream_expected_latency_ns = latency_ns
            warmup["single_stream_expected_latency_ms"] = round(latency_ns / 1e6, 3)
        want = prewarm_connections(
            spec.loadgen_scenario,
            rate,
            latency_ns / 1e9,
            settings.min_query_count,
            settings.min_duration_ms / 1000,
            spec.client.max_connections,
        )
        warmup["connections"] = client.prewarm(want, timeout_s=min(60.0, spec.client.request_timeout_s))

    def issue(samples: list[Any]) -> None:
        now = time.monotonic_ns()
        for s in samples:
            unanswered[s.id] = (s.index, now)
        client.submit([(s.id, s.index) for s in samples])

    def flush() -> None:
        pass

    metrics_http = HttpConfig.build(spec.client.http, check_environment=False)
    if spec.network_sut:
        urls = [ServerUrl.parse(u) for u in spec.client.endpoints or [spec.client.base_url]]
        sut = lg.ConstructQDL(issue, flush, lambda: network_sut_name(metrics_http, urls))
    else:
        sut = lg.ConstructSUT(issue, flush)
    qsl = lg.ConstructQSL(n_samples, spec.performance_sample_count or n_samples, _noop, _noop)
    log_out = lg.LogOutputSettings()
    log_out.outdir = str(mlperf_dir)
    log_out.copy_summary_to_stdout = True
    log_settings = lg.LogSettings()
    log_settings.log_output = log_out
    log_settings.enable_trace = False
    # The engine's counters right before and after LoadGen: its own view of exactly the measured run.
    server = ServerUrl.parse(spec.client.base_url)
    # Every endpoint's own counters too; the engine window (and the timeline) stays the first one's.
    others = [ServerUrl.parse(u) for u in spec.client.endpoints[1:]]
    before = fetch_metrics_text(metrics_http, server, spec.metrics_paths)
    others_before = [fetch_metrics_text(metrics_http, u, spec.metrics_paths) for u in others]
    cpu = CpuSampler().start()
    start_ns = time.monotonic_ns()
    lg.StartTestWithLogSettings(sut, qsl, settings, log_settings)
    end_ns = time.monotonic_ns()
    after = fetch_metrics_text(metrics_http, server, spec.metrics_paths) if before is not None else None
    others_after = [
        fetch_metrics_text(metrics_http, u, spec.metrics_paths) if b is not None else None
        for u, b in zip(others, others_before, strict=True)
    ]
    metrics_http.close()
    cpu_stats = cpu.stop()
    lg.DestroyQSL(qsl)
    if spec.network_sut:
        lg.DestroyQDL(sut)
    else:
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
        "engine_window": engine_window(before, after).model_dump() if before and after else None,
        "consistency": consistency,
        "samples": n_samples,
        "workers": workers,
        "token_count": describe_token_source(spec.client.request_profile, gen, spec.client.token_source),
        "max_connections": getattr(client, "max_connections", spec.client.max_connections),
        "connections_note": getattr(client, "connections_note", None),
        # This process's CPU (all its threads: LoadGen, client loop) over the LoadGen run, % of one
        # core, sampled each second; with workers, theirs too, and the busiest process's fraction.
        **cpu_stats,
    }
    fanouts = [client] if isinstance(client, FanoutClient) else []
    if isinstance(client, MultiEndpointClient):
        fanouts = [c for c in client.clients if isinstance(c, FanoutClient)]
        # every endpoint's worker processes, so the client-bound check sees them all
        summary["workers"] = sum(c.n_workers for c in fanouts) or workers
    if fanouts:
        stats = [s for f in fanouts for s in f.worker_stats()]
        summary["worker_processes"] = stats
        summary["cpu_pct_total"] = round(cpu_stats["cpu_pct"] + sum(w.get("cpu_pct", 0) for w in stats), 1)
        fractions = [cpu_stats["cpu_bound_fraction"], *(w.get("cpu_bound_fraction") for w in stats)]
        summary["cpu_bound_fraction"] = max((f for f in fractions if f is not None), default=None)
    if isinstance(client, MultiEndpointClient):
        windows = [(before, after), *zip(others_before, others_after, strict=True)]
        summary["endpoints"] = [
            {**e, "engine_window": engine_window(b, a).model_dump() if b and a else None}
            for e, (b, a) in zip(client.endpoint_summary(), windows, strict=True)
        ]
        summary["workers_per_endpoint"] = client.workers_per_endpoint
    write_json(out / "client.json", summary)  # atomic: the parent never reads half a file
    return 0


def _keep_results_on_sigterm(
    out: Path, reqlog: RequestLogWriter, client: Any, unanswered: dict[int, tuple[int, int]]
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
            write_json(out / "client.json", summary)
        finally:
            os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="harness-sigterm", daemon=True).start()


def _noop(_: Any) -> None:
    pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m harness_fixtures.loadgen.runner RUN_SPEC.json", file=sys.stderr)
        return 2
    spec = RunSpec.model_validate_json(Path(args[0]).read_text())
    return run(spec)


if __name__ == "__main__":
    sys.exit(main())
