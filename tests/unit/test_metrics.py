"""Unit tests of harness_fixtures.metrics: parsing, collectors' failure handling, timeline, plots."""

from __future__ import annotations

import math
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from harness_fixtures.client.cpu import CPU_BOUND_PCT, CpuSampler, bound_fraction
from harness_fixtures.metrics import (
    BaseCollector,
    CollectorSet,
    HostCollector,
    NvmlCollector,
    PrometheusCollector,
    Sample,
    Timeline,
    read_timeline,
    summarize,
    write_timeline,
)
from harness_fixtures.metrics.plots import LatencyMarks, build_figures
from harness_fixtures.metrics.prometheus import (
    BelowLowestBucket,
    ScrapeState,
    histogram_quantile,
    metrics_url,
    quantile_or_bound,
)
from harness_fixtures.results import Percentiles

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

# -- helpers -------------------------------------------------------------------------------------
LABELS = 'engine="0",model_name="m"'
TTFT_BOUNDS = ["0.05", "0.1", "0.2", "0.5", "1.0"]


def vllm_text(n: int) -> str:
    """vLLM-shaped exposition after `n` scrape steps: +100 generation tokens and 10 TTFT
    observations in the (0.1, 0.2] bucket (sum +1.5 s) per step; two engines for the gauges."""
    gen = 1000 + 100 * n
    obs = 10 * n
    lines = [
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{engine="0",model_name="m"} 2.0',
        'vllm:num_requests_running{engine="1",model_name="m"} 3.0',
        "# TYPE vllm:kv_cache_usage_perc gauge",
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2',
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.4',
        "# TYPE vllm:generation_tokens_total counter",
        f"vllm:generation_tokens_total{{{LABELS}}} {gen}.0",
        "# TYPE vllm:time_to_first_token_seconds histogram",
    ]
    for le in [*TTFT_BOUNDS, "+Inf"]:
        count = obs if le in ("0.2", "0.5", "1.0", "+Inf") else 0
        lines.append(f'vllm:time_to_first_token_seconds_bucket{{{LABELS},le="{le}"}} {count}.0')
    lines += [
        f"vllm:time_to_first_token_seconds_count{{{LABELS}}} {obs}.0",
        f"vllm:time_to_first_token_seconds_sum{{{LABELS}}} {1.5 * n}",
    ]
    return "\n".join(lines) + "\n"


ServeFn = Callable[[int, Callable[[int], str]], str]


@pytest.fixture
def metrics_server() -> Iterator[ServeFn]:
    """Start a local /metrics server; `serve(status, body_for_scrape_n)` returns its base URL."""
    servers: list[ThreadingHTTPServer] = []

    def serve(status: int, body: Callable[[int], str]) -> str:
        hits = [0]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                payload = body(hits[0]).encode()
                hits[0] += 1
                self.send_response(status if self.path == "/metrics" else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield serve
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _nvml_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    pynvml.nvmlShutdown()
    return True


# -- Prometheus parsing ----------------------------------------------------------------------------
VLLM_KINDS = {
    **{k: "gauge" for k in ("running", "waiting", "kv_cache_usage")},
    **{
        k: "counter"
        for k in (
            "prompt_tokens",
            "generation_tokens",
            "request_success",
            "preemptions",
            "prefix_cache_hits",
            "prefix_cache_queries",
        )
    },
    **{k: "histogram" for k in ("ttft_s", "itl_s", "tpot_s", "e2e_s", "queue_s", "prefill_s", "decode_s")},
}


def test_small_vllm_fixture_maps_every_family() -> None:
    state = ScrapeState()
    out = dict(state.update((FIXTURES / "vllm_metrics_small.txt").read_text(), t_s=0.0))
    assert out == {"running": 3.0, "waiting": 2.0, "kv_cache_usage": 0.25}
    assert state.kinds == VLLM_KINDS
    # request_success sums its finished_reason label sets.
    assert state.counters["request_success"].first == 16.0


def test_real_vllm_fixture_maps_every_family() -> None:
    path = FIXTURES / "vllm_metrics.txt"
    if not path.exists():
        pytest.skip(f"{path.name} (a real vLLM /metrics dump) not captured yet")
    state = ScrapeState()
    out = dict(state.update(path.read_text(), t_s=0.0))
    assert out.keys() == {"running", "waiting", "kv_cache_usage"}
    assert 0.0 <= out["kv_cache_usage"] <= 1.0
    assert state.kinds == VLLM_KINDS
    assert state.counters["generation_tokens"].first > 0


def test_counter_rates_and_histogram_quantiles_between_scrapes() -> None:
    state = ScrapeState()
    first = dict(state.update(vllm_text(0), t_s=10.0))
    assert first == {"running": 5.0, "kv_cache_usage": pytest.approx(0.3)}  # sum / mean over engines
    second = dict(state.update(vllm_text(1), t_s=12.0))
    assert second["generation_tokens_per_s"] == pytest.approx(50.0)  # 100 tokens / 2 s
    # 10 observations in (0.1, 0.2]: linear interpolation puts p50 at 0.15, p99 at 0.199.
    assert second["ttft_s_p50"] == pytest.approx(0.15)
    assert second["ttft_s_p99"] == pytest.approx(0.199)
    assert second["ttft_s_mean"] == pytest.approx(0.15)
    state.update(vllm_text(3), t_s=14.0)
    assert state.delta("generation_tokens") == 300.0
    totals = state.histogram_summary("ttft_s")
    assert totals["count"] == 30.0 and totals["sum"] == pytest.approx(4.5)
    assert totals["p50"] == pytest.approx(0.15) and totals["max"] == 0.2


def test_counter_reset_counts_from_zero() -> None:
    state = ScrapeState()
    state.update(vllm_text(5), t_s=0.0)  # 1500 tokens
    out = dict(state.update(vllm_text(0).replace("1000.0", "40.0"), t_s=1.0))
    assert state.delta("generation_tokens") == 40.0
    assert out["generation_tokens_per_s"] == 40.0
    assert "ttft_s_p50" not in out  # histogram reset to zero observations


def test_histogram_quantile_edges() -> None:
    inf = math.inf
    assert histogram_quantile(0.5, [(1.0, 0.0), (inf, 0.0)]) is None
    assert histogram_quantile(0.5, [(1.0, 10.0), (2.0, 10.0), (inf, 10.0)]) == pytest.approx(0.5)
    # Rank in the +Inf bucket: the largest finite bound, as PromQL does.
    assert histogram_quantile(0.99, [(1.0, 1.0), (2.0, 2.0), (inf, 10.0)]) == 2.0


def test_sglang_names_and_deprecated_aliases() -> None:
    sglang = "\n".join(
        [
            "# TYPE sglang:num_running_reqs gauge",
            'sglang:num_running_reqs{model_name="m"} 4.0',
            "# TYPE sglang:num_queue_reqs gauge",
            'sglang:num_queue_reqs{model_name="m"} 1.0',
            "# TYPE sglang:token_usage gauge",
            'sglang:token_usage{model_name="m"} 0.5',
            "# TYPE sglang:generation_tokens_total counter",
            'sglang:generation_tokens_total{model_name="m"} 10.0',
            "# TYPE sglang:time_to_first_token_seconds histogram",
            'sglang:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 1.0',
            'sglang:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 1.0',
            'sglang:time_to_first_token_seconds_count{model_name="m"} 1.0',
            'sglang:time_to_first_token_seconds_sum{model_name="m"} 0.05',
        ]
    )
    state = ScrapeState()
    assert dict(state.update(sglang, 0.0)) == {"running": 4.0, "waiting": 1.0, "kv_cache_usage": 0.5}
    assert state.kinds["generation_tokens"] == "counter" and state.kinds["ttft_s"] == "histogram"
    # vLLM exposed old and new names side by side for a while: the new one wins, no double count.
    both = "# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc 0.9\n" + vllm_text(0)
    assert dict(ScrapeState().update(both, 0.0))["kv_cache_usage"] == pytest.approx(0.3)


TRTLLM_KINDS = {
    **{k: "gauge" for k in ("running", "waiting", "kv_cache_usage")},
    **{k: "counter" for k in ("prompt_tokens", "generation_tokens", "request_success", "prefix_cache_hits")},
    "prefix_cache_queries": "counter",
    **{k: "histogram" for k in ("ttft_s", "tpot_s", "e2e_s", "queue_s", "prefill_s", "decode_s")},
}


def test_trtllm_names_map_into_the_vocabulary() -> None:
    """A hand-written exposition in TensorRT-LLM's names, buckets and labels (docs/engines.md)."""
    state = ScrapeState()
    out = dict(state.update((FIXTURES / "trtllm_metrics_small.txt").read_text(), t_s=0.0))
    assert out == {"running": 7.0, "waiting": 2.0, "kv_cache_usage": 0.125}
    # No preemption counter and no per-token histogram in TensorRT-LLM: those stay absent.
    assert state.kinds == TRTLLM_KINDS
    assert state.counters["request_success"].first == 16.0  # summed over finished_reason
    assert state.counters["prefix_cache_queries"].first == 5280.0


def _itl_text(n: int) -> str:
    """vLLM's inter-token-latency buckets (lowest 10 ms) after n steps of 100 tokens: 98 of them
    faster than 10 ms, 2 between 25 and 50 ms, as at GPU decode speed."""
    bounds = ["0.01", "0.025", "0.05", "0.075", "0.1", "+Inf"]
    fast, slow = 98 * n, 2 * n
    counts = {"0.01": fast, "0.025": fast}
    lines = ["# TYPE vllm:inter_token_latency_seconds histogram"]
    for le in bounds:
        lines.append(f'vllm:inter_token_latency_seconds_bucket{{le="{le}"}} {counts.get(le, fast + slow)}.0')
    lines += [
        f"vllm:inter_token_latency_seconds_count {fast + slow}.0",
        f"vllm:inter_token_latency_seconds_sum {0.004 * fast + 0.03 * slow}",
    ]
    return "\n".join(lines) + "\n"


def test_quantile_in_the_lowest_bucket_is_only_a_bound() -> None:
    inf = math.inf
    assert quantile_or_bound(0.5, [(0.01, 98.0), (0.05, 100.0), (inf, 100.0)]) == BelowLowestBucket(0.01)
    assert quantile_or_bound(0.99, [(0.01, 98.0), (0.05, 100.0), (inf, 100.0)]) == pytest.approx(0.03)
    assert quantile_or_bound(0.5, [(0.01, 0.0), (inf, 0.0)]) is None
    # An empty lowest bucket, or a bound at zero, is not a bound on anything.
    assert quantile_or_bound(0.5, [(0.01, 0.0), (0.05, 10.0), (inf, 10.0)]) == pytest.approx(0.03)
    # PromQL-style interpolation stays available and unchanged.
    assert histogram_quantile(0.5, [(0.01, 98.0), (0.05, 100.0), (inf, 100.0)]) == pytest.approx(
        0.0051, rel=0.01
    )


def test_below_bucket_quantiles_surface_as_bounds_not_numbers(tmp_path: Path) -> None:
    state = ScrapeState()
    state.update(_itl_text(0), t_s=0.0)
    out = dict(state.update(_itl_text(1), t_s=1.0))
    assert out["itl_s_p50_below"] == 0.01 and "itl_s_p50" not in out  # the timeline series
    assert out["itl_s_p99"] == pytest.approx(0.0375)  # 0.99 rank sits in (0.025, 0.05]
    assert out["itl_s_mean"] == pytest.approx(0.00452)  # the mean is exact: sum / count
    state.update(_itl_text(3), t_s=2.0)
    totals = state.histogram_summary("itl_s")
    assert totals["p50_below"] == 0.01 and "p50" not in totals and totals["p99"] == pytest.approx(0.0375)
    # The engine figure draws the bound as open down-triangles, not as a point on the p50 line.
    samples = [Sample(t, "engine", "itl_s_p50_below", 0.01) for t in (1.0, 2.0)]
    fig = build_figures(samples, [], None)["engine"]
    latency = fig.axes[3]
    assert [(ln.get_marker(), ln.get_label()) for ln in latency.get_lines()] == [("v", "ITL p50 < bound")]
    assert list(latency.get_lines()[0].get_ydata()) == [10.0, 10.0]  # ms


def test_prometheus_collector_moves_past_a_json_metrics_path() -> None:
    """An external TensorRT-LLM server: /metrics is JSON, the Prometheus text is elsewhere."""
    text = (FIXTURES / "trtllm_metrics_small.txt").read_text()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, kind = {
                "/metrics": ('[{"iter": 1, "numActiveRequests": 7}]', "application/json"),
                "/prometheus/metrics": (text, "text/plain; version=0.0.4"),
            }.get(self.path, ("no", "text/plain"))
            payload = body.encode()
            self.send_response(200 if self.path in ("/metrics", "/prometheus/metrics") else 404)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        col = PrometheusCollector(url, interval_s=0.1, paths=("/metrics", "/prometheus/metrics"))
        col.start(time.monotonic_ns())
        col.stop()
        assert col.status == "ok" and col.url == url + "/prometheus/metrics"
        assert [v for _, v in col.series("running")] == [7.0, 7.0]  # the first tick already found it
        only_json = PrometheusCollector(url, interval_s=0.1)
        only_json.start(time.monotonic_ns())
        only_json.stop()
        assert (
            only_json.status.startswith("failed (")
            and "answers JSON, not Prometheus text" in only_json.status
        )
    finally:
        srv.shutdown()
        srv.server_close()


def test_metrics_url() -> None:
    assert metrics_url("http://h:8000") == "http://h:8000/metrics"
    assert metrics_url("http://h:8000/v1/") == "http://h:8000/metrics"
    assert metrics_url("http://h:8000/metrics") == "http://h:8000/metrics"
    assert metrics_url("http://h:8000/v1", "/prometheus/metrics") == "http://h:8000/prometheus/metrics"


# -- Prometheus collector over HTTP ----------------------------------------------------------------
def test_prometheus_collector_scrapes_rates_and_quantiles(metrics_server: ServeFn) -> None:
    url = metrics_server(200, vllm_text)
    col = PrometheusCollector(url + "/v1", interval_s=0.1)
    col.start(time.monotonic_ns())
    time.sleep(0.6)
    col.stop()
    assert col.status == "ok"
    assert not col.is_running
    n = col.n_ok
    assert n >= 3
    assert col.delta("generation_tokens") == 100.0 * (n - 1)
    rates = [v for _, v in col.series("generation_tokens_per_s")]
    assert len(rates) == n - 1 and all(r > 0 for r in rates)
    assert all(v == pytest.approx(0.15) for _, v in col.series("ttft_s_p50"))
    summary = col.summary()
    assert summary["ttft_s"]["count"] == 10.0 * (n - 1)
    assert summary["generation_tokens_per_s"]["delta"] == 100.0 * (n - 1)
    assert {"mean", "max", "p50", "p99"} <= summary["running"].keys()


def test_prometheus_404_is_failed_not_raised(metrics_server: ServeFn) -> None:
    url = metrics_server(404, lambda n: "not found")
    col = PrometheusCollector(url, interval_s=0.1)
    col.start(time.monotonic_ns())
    time.sleep(0.3)
    t = time.monotonic()
    col.stop()
    assert time.monotonic() - t < 1.0
    assert col.status.startswith("failed (") and "HTTP 404" in col.status
    assert col.samples() == [] and col.n_errors >= 2


def test_prometheus_connection_refused_is_unavailable() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the scrape: nothing listens
    col = PrometheusCollector(f"http://127.0.0.1:{port}", interval_s=0.1, timeout_s=0.5)
    col.start(time.monotonic_ns())
    time.sleep(0.2)
    col.stop()
    assert col.status.startswith("unavailable (") and "cannot scrape" in col.status


# -- base class failure handling -------------------------------------------------------------------
class _Counter(BaseCollector):
    def __init__(
        self,
        name: str,
        fail_on: int | None = None,
        block: threading.Event | None = None,
        stop_timeout_s: float = 3.0,
    ) -> None:
        super().__init__(name, interval_s=0.05, stop_timeout_s=stop_timeout_s)
        self.calls = 0
        self.fail_on = fail_on
        self.block = block

    def _sample(self) -> Iterable[tuple[str, float]]:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("boom")
        if self.block is not None and self.calls > 1:
            self.block.wait(30)
        return [("calls", float(self.calls))]


def test_failing_collector_is_reported_and_others_keep_sampling() -> None:
    good, bad = _Counter("good"), _Counter("bad", fail_on=2)
    cset = CollectorSet([good, bad])
    cset.start()
    time.sleep(0.4)
    t = time.monotonic()
    cset.stop()
    assert time.monotonic() - t < 1.0
    statuses = cset.statuses()
    assert statuses["good"] == "ok"
    assert statuses["bad"].startswith("failed (") and "RuntimeError: boom" in statuses["bad"]
    # The failing collector kept its schedule after the error.
    assert bad.calls >= 4 and len(bad.samples()) == bad.calls - 1
    merged = cset.samples()
    assert [s.t_s for s in merged] == sorted(s.t_s for s in merged)
    assert {s.source for s in merged} == {"good", "bad"}
    assert cset.t0_unix_s is not None and abs(cset.t0_unix_s - time.time()) < 5


def test_hung_collector_cannot_stall_stop() -> None:
    release = threading.Event()
    hung = _Counter("hung", block=release, stop_timeout_s=0.3)
    try:
        cset = CollectorSet([hung, _Counter("other", stop_timeout_s=0.3)])
        cset.start()
        time.sleep(0.2)
        t = time.monotonic()
        cset.stop()
        assert time.monotonic() - t < 1.5
        assert cset.statuses()["hung"].startswith("failed (did not stop")
        assert cset.statuses()["other"] == "ok"
    finally:
        release.set()


def test_collector_set_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match="duplicated"):
        CollectorSet([_Counter("x"), _Counter("x")])


# -- NVML ------------------------------------------------------------------------------------------
@pytest.mark.skipif(_nvml_present(), reason="NVML works here; this tests the no-GPU path")
def test_nvml_absent_is_unavailable_without_thread(caplog: pytest.LogCaptureFixture) -> None:
    col = NvmlCollector(interval_s=0.2)
    with caplog.at_level("INFO", logger="harness_fixtures.metrics"):
        col.start(time.monotonic_ns())
    assert col.status.startswith("unavailable (")
    assert not col.is_running
    assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1
    col.stop()
    assert col.samples() == [] and col.window_energy(0.0, 1.0) == ([], None) and col.gpu_info() == []


def test_nvml_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    col = NvmlCollector()
    col.start(time.monotonic_ns())
    assert col.status.startswith("unavailable (pynvml not importable")
    assert not col.is_running


def test_nvml_interval_floor() -> None:
    with pytest.raises(ValueError, match=r">= 0\.1"):
        NvmlCollector(interval_s=0.05)


# -- host ------------------------------------------------------------------------------------------
def test_host_collector_sees_client_cpu_burn() -> None:
    col = HostCollector(interval_s=0.2)
    col.start(time.monotonic_ns())
    deadline = time.monotonic() + 1.5
    x = 0
    while time.monotonic() < deadline:
        x += 1
    col.stop()
    assert col.status == "ok"
    client = [v for _, v in col.series("client_cpu_pct")]
    assert len(client) >= 5
    assert max(client) >= 40.0  # a busy Python loop: most of one core even on a shared machine
    assert {
        "cpu_pct",
        "cpu_max_core_pct",
        "mem_used_mib",
        "mem_pct",
        "client_rss_mib",
    } <= col.summary().keys()
    # The saturation verdict is the client's own (harness_fixtures.client.cpu); the same rule applies.
    assert bound_fraction(client) == round(sum(v >= CPU_BOUND_PCT for v in client) / len(client), 4)
    assert bound_fraction([]) is None


def test_cpu_sampler_measures_its_own_process() -> None:
    sampler = CpuSampler(interval_s=0.1).start()
    deadline = time.monotonic() + 0.8
    while time.monotonic() < deadline:
        pass
    stats = sampler.stop()
    assert stats["cpu_samples"] >= 5 and stats["cpu_pct"] > 40.0
    assert stats["cpu_bound_fraction"] == bound_fraction(sampler.samples)


# -- timeline --------------------------------------------------------------------------------------
def test_timeline_round_trip(tmp_path: Path) -> None:
    samples = [
        Sample(1.5, "engine", "running", 3.0),
        Sample(0.1, "host", "cpu_pct", 12.345678901234567),
        Sample(0.5, "gpu", "gpu0.power_w", 301.25),
        Sample(1.5, "engine", "waiting", 0.0),
    ]
    path = write_timeline(tmp_path / "out" / "timeline.csv", samples, t0_unix_s=1_700_000_000.25)
    assert path.read_text().splitlines()[:2] == [
        "t_s,source,series,value,t_unix_s",
        "0.1,host,cpu_pct,12.345678901234567,1700000000.350000",
    ]
    tl = read_timeline(path)
    assert tl.t0_unix_s == pytest.approx(1_700_000_000.25, abs=1e-6)
    assert tl.samples == sorted(samples, key=lambda s: (s.t_s, s.source, s.series))
    summ = summarize(tl.samples)
    assert summ["host"]["cpu_pct"]["p50"] == 12.345678901234567
    assert set(summ["engine"]) == {"running", "waiting"}
    assert read_timeline(write_timeline(tmp_path / "empty.csv", [])).samples == []


def test_timeline_reads_with_plain_pandas_and_reads_schema_1_files(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    samples = [Sample(0.0, "engine", "running", 1.0), Sample(1.0, "engine", "running", 2.0)]
    df = pd.read_csv(write_timeline(tmp_path / "timeline.csv", samples, t0_unix_s=100.0))
    assert list(df.columns) == ["t_s", "source", "series", "value", "t_unix_s"]
    assert df["value"].tolist() == [1.0, 2.0] and df["t_unix_s"].tolist() == [100.0, 101.0]
    # without a wall-clock t0 the column is empty, and the reader says "unknown"
    assert read_timeline(write_timeline(tmp_path / "no_t0.csv", samples)).t0_unix_s is None
    old = tmp_path / "old.csv"  # what schema 1 wrote
    old.write_text(
        "# schema_version=1 t0_unix_s=1700000000.250000\nt_s,source,series,value\n0.5,host,cpu_pct,3.0\n"
    )
    tl = read_timeline(old)
    assert tl == Timeline(1_700_000_000.25, [Sample(0.5, "host", "cpu_pct", 3.0)])


def test_timeline_rejects_foreign_csv(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="expected header"):
        read_timeline(path)


# -- plots -----------------------------------------------------------------------------------------
def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", head[16:24])
    return w, h


def _synthetic_run() -> tuple[list[Sample], list[dict[str, object]]]:
    samples = []
    for k in range(30):
        t = k * 0.5
        samples += [
            Sample(t, "engine", "running", float(k % 8)),
            Sample(t, "engine", "waiting", float(k % 3)),
            Sample(t, "engine", "kv_cache_usage", k / 40),
            Sample(t, "engine", "generation_tokens_per_s", 100.0 + k),
            Sample(t, "engine", "ttft_s_p50", 0.1),
            Sample(t, "engine", "ttft_s_p99", 0.3),
            Sample(t, "host", "cpu_pct", 50.0 + k),
            Sample(t, "host", "client_cpu_pct", 60.0 + k),
            Sample(t, "host", "mem_pct", 40.0),
            Sample(t, "gpu", "gpu0.util_gpu_pct", float(k * 3)),
            Sample(t, "gpu", "gpu0.power_w", 100.0 + k),
            Sample(t, "gpu", "gpu0.mem_used_mib", 1000.0),
        ]
    requests: list[dict[str, object]] = []
    for i in range(200):
        issued = i * 0.07
        first = issued + 0.05 + (i % 10) * 0.01
        requests.append(
            {
                "issued_s": issued,
                "sent_s": issued + 0.001,
                "first_token_s": first,
                "done_s": first + 0.5,
                "n_tokens": 32,
                "status": "ok" if i % 50 else "error",
            }
        )
    return samples, requests


def test_plots_written_against_time(tmp_path: Path) -> None:
    from harness_fixtures.metrics.plots import build_figures, write_plots

    samples, requests = _synthetic_run()
    figs = build_figures(samples, requests)
    assert set(figs) == {"client", "latency_cdf", "engine", "host", "gpu"}
    throughput, ttft, tpot = figs["client"].axes[:3]
    assert throughput.lines and ttft.lines and tpot.lines  # rolling p50/p99 lines were drawn
    # x is time, not sample number: the engine lines span the run's 14.5 s.
    xs = list(figs["engine"].axes[0].lines[0].get_xdata())  # type: ignore[arg-type]
    assert xs[0] == 0.0 and xs[-1] == 14.5
    # A panel with data never also says its data is missing.
    for name, fig in figs.items():
        for ax in fig.axes:
            if ax.lines:
                texts = [t.get_text() for t in ax.texts]
                assert not any("not reported" in t for t in texts), (name, ax.get_title(), texts)

    paths = write_plots(tmp_path, samples, requests)
    assert sorted(p.name for p in paths) == [
        "client.png",
        "engine.png",
        "gpu.png",
        "host.png",
        "latency_cdf.png",
    ]
    for p in paths:
        assert p.stat().st_size > 20_000, p
        assert _png_size(p) == (1200, 800)


def test_time_figures_mark_the_warmup_and_the_loadgen_window() -> None:
    from harness_fixtures.metrics.plots import RunWindow, build_figures

    samples, requests = _synthetic_run()
    window = RunWindow.of(
        {"warmup": {"start_s": 0.5, "end_s": 1.0}, "loadgen_start_s": 1.2, "loadgen_end_s": 14.0}
    )
    figs = build_figures(samples, requests, window=window)
    for stem in ("client", "engine", "host", "gpu"):
        for ax in figs[stem].axes:
            spans = [_xspan(p) for p in ax.patches]
            assert (0.5, 1.0) in spans and (1.2, 14.0) in spans, (stem, ax.get_title(), spans)
        labels = figs[stem].axes[0].get_legend_handles_labels()[1]
        assert "warm-up" in labels and "LoadGen measured window" in labels, (stem, labels)
    # The CDF has no time axis: nothing to shade.
    assert not any(ax.patches for ax in figs["latency_cdf"].axes)
    # Without a window nothing is shaded.
    assert not any(ax.patches for ax in build_figures(samples, requests)["engine"].axes)


def _xspan(patch: Any) -> tuple[float, float]:
    """(start, end) along x of an axvspan patch (a Rectangle in recent matplotlib, a Polygon before)."""
    from matplotlib.patches import Rectangle

    if isinstance(patch, Rectangle):
        return round(patch.get_x(), 3), round(patch.get_x() + patch.get_width(), 3)
    xs = [float(x) for x, _ in patch.get_xy()]
    return round(min(xs), 3), round(max(xs), 3)


def test_capacity_plot_shows_each_probe_against_the_limit(tmp_path: Path) -> None:
    from harness_fixtures.loadgen.capacity import Limits
    from harness_fixtures.metrics.plots import write_capacity_plot
    from harness_fixtures.results import CapacityProbe, CapacityResult

    probes = [
        CapacityProbe(qps=q, percentile=0.93, ttft_margin=m, tpot_margin=0.2, verdict=v, duration_s=1.0)
        for q, m, v in ((5.0, 0.6, "pass"), (8.0, 1.3, "fail"), (6.5, 0.95, "pass"), (7.2, 1.05, "fail"))
    ]
    cap = CapacityResult(found_qps=6.5, target_precision=0.05, upper_bound_qps=10.0, probes=probes)
    path = write_capacity_plot(
        tmp_path / "capacity.png", cap, Limits(ttft_ms=100.0, tpot_ms=50.0, percentile=0.9)
    )
    assert path is not None and _png_size(Path(path)) == (1200, 800)
    assert write_capacity_plot(tmp_path / "x.png", cap, object()) is None  # a bad input never raises
    # with the full runs after the search: one INVALID, one VALID below it
    from harness_fixtures.results import CapacityConfirmation

    runs = [
        CapacityConfirmation(
            qps=6.5, status="INVALID", ttft_margin=1.4, chosen="found", dir="confirmation-1"
        ),
        CapacityConfirmation(qps=5.9, status="VALID", ttft_margin=0.9, chosen="step", dir="."),
    ]
    confirmed = cap.model_copy(update={"confirmations": runs, "confirmed_qps": 5.9})
    path = write_capacity_plot(
        tmp_path / "confirmed.png", confirmed, Limits(ttft_ms=100.0, tpot_ms=50.0, percentile=0.9)
    )
    assert path is not None and _png_size(Path(path)) == (1200, 800)


def test_plots_skip_absent_data(tmp_path: Path) -> None:
    from harness_fixtures.metrics.plots import write_plots

    assert write_plots(tmp_path, [], []) == []
    only_host = [Sample(float(t), "host", "cpu_pct", 10.0) for t in range(5)]
    assert [p.name for p in write_plots(tmp_path, only_host, [])] == ["host.png"]


def test_latency_cdf_marks_p99_and_the_limits(tmp_path: Path) -> None:
    import numpy as np
    from matplotlib.axes import Axes

    from harness_fixtures.metrics.plots import build_figures, write_plots

    _, requests = _synthetic_run()
    fig = build_figures([], requests, LatencyMarks({"ttft": 105.0, "tpot": 50.0}, 0.99))["latency_cdf"]
    ax_ttft, ax_tpot = fig.axes
    # Synthetic TTFTs are 50..140 ms (from the issue time), TPOT 500/31 ms; failed requests left out.
    ok = [r for r in requests if r["status"] == "ok"]
    (cdf,) = [ln for ln in ax_ttft.lines if str(ln.get_label()).startswith("TTFT per request")]
    xs = np.asarray(cdf.get_xdata())
    assert len(xs) == len(ok) and xs.max() == pytest.approx(140.0)

    def xs_of(ax: Axes, prefix: str) -> list[float]:
        lines = [ln for ln in ax.get_lines() if str(ln.get_label()).startswith(prefix)]
        return [float(np.asarray(ln.get_xdata())[0]) for ln in lines]

    assert xs_of(ax_ttft, "LoadGen limit") == [105.0] and xs_of(ax_tpot, "LoadGen limit") == [50.0]
    assert xs_of(ax_ttft, "client p99 =") == [pytest.approx(140.0)]
    labels = ax_ttft.get_legend_handles_labels()[1]
    # TTFTs of 110..140 ms: 80 of the 196 successful requests are over the 105 ms limit.
    assert "LoadGen limit = 105 ms\n(40.82 % of requests above)" in labels
    assert "limit applies at p99" in labels
    assert ax_ttft.get_xscale() == "linear" and ax_ttft.get_yscale() == "logit"

    # No limits (Offline): the CDFs and the p99 marks, no limit lines.
    fig = build_figures([], requests)["latency_cdf"]
    assert not any("limit" in lab for ax in fig.axes for lab in ax.get_legend_handles_labels()[1])
    assert xs_of(fig.axes[1], "client p99 =") == [pytest.approx(500 / 31)]

    # With LoadGen's percentiles (a real run), the marks are LoadGen's: result.yaml's numbers.
    marks = Percentiles(p50=77.0, p99=123.4)
    tpot = Percentiles(p50=16.0, p99=16.5)
    fig = build_figures([], requests, LatencyMarks(None, None, marks, tpot))["latency_cdf"]
    assert xs_of(fig.axes[0], "LoadGen p99 =") == [123.4] and xs_of(fig.axes[0], "LoadGen p50 =") == [77.0]
    assert "LoadGen p99 = 123 ms" in fig.axes[0].get_legend_handles_labels()[1]
    assert xs_of(fig.axes[1], "LoadGen p99 =") == [16.5]

    written = write_plots(tmp_path, [], requests, LatencyMarks({"ttft": 2000.0}, 0.9))
    (path,) = [p for p in written if p.stem == "latency_cdf"]
    assert path.stat().st_size > 20_000 and _png_size(path) == (1200, 800)


def test_latency_cdf_skipped_without_latencies() -> None:
    from harness_fixtures.metrics.plots import build_figures

    failed = [{"issued_s": 0.0, "done_s": 1.0, "status": "error"}]
    no_first_token = [{"issued_s": 0.0, "done_s": 1.0, "n_tokens": 3, "status": "ok"}]
    assert "latency_cdf" not in build_figures([], failed)
    assert "latency_cdf" not in build_figures([], no_first_token, LatencyMarks({"ttft": 1.0}))
    one = [{"issued_s": 0.0, "first_token_s": 0.1, "done_s": 0.2, "n_tokens": 1, "status": "ok"}]
    # A single TTFT and no TPOT (one token): the TPOT panel says so.
    fig = build_figures([], one, LatencyMarks({"ttft": 500.0, "tpot": 50.0}, 0.99))["latency_cdf"]
    assert "TPOT: not reported" in [t.get_text() for t in fig.axes[1].texts]


def _session_results() -> list[dict[str, object]]:
    def result(test_id: str, status: str, tok: float | None, ttft: float | None) -> dict[str, object]:
        return {
            "test_id": test_id,
            "status": status,
            "tokens_per_s": tok,
            "samples_per_s": None if tok is None else tok / 32,
            "ttft_ms": {"p50": None if ttft is None else ttft / 2, "p99": ttft},
            "tpot_ms": {"p50": None if ttft is None else 5.0, "p99": None if ttft is None else 9.0},
            "queries": {"failed": 0},
        }

    return [
        result("sim_offline", "VALID", 9000.0, None),  # Offline: LoadGen reports no TTFT
        result("sim_server", "VALID", 3000.0, 60.0),
        result("big_server", "INVALID", 800.0, 2400.0),
        result("broken_server", "ERROR", None, None),
        {"test_id": "partial", "status": "INTERRUPTED", "ttft_ms": None},  # keys missing entirely
    ]


def test_session_summary_for_mixed_results(tmp_path: Path) -> None:
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Rectangle

    from harness_fixtures.metrics.plots import STATUS_COLORS, _summary_figure, write_session_summary

    results = _session_results()
    fig = _summary_figure(results)
    ax_tok, _, ax_ttft, ax_tpot = fig.axes
    ticks = ax_tok.get_yticklabels()
    assert [t.get_text().split("\n") for t in ticks][:4] == [
        ["sim_offline", "VALID"],
        ["sim_server", "VALID"],
        ["big_server", "INVALID"],
        ["broken_server", "ERROR"],
    ]
    assert [to_rgba(t.get_color()) for t in ticks[2:4]] == [
        to_rgba(STATUS_COLORS["INVALID"]),
        to_rgba(STATUS_COLORS["ERROR"]),
    ]
    bars = [b for b in ax_tok.patches if isinstance(b, Rectangle)]
    assert [b.get_width() for b in bars] == [9000.0, 3000.0, 800.0, 0.0, 0.0]
    assert to_rgba(bars[2].get_facecolor()) == to_rgba(STATUS_COLORS["INVALID"])
    assert sum(t.get_text().strip() == "n/a" for t in ax_tok.texts) == 2
    assert ax_ttft.get_xscale() == "log" and ax_tpot.get_xscale() == "log"
    legend = ax_tpot.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == [
        "VALID",
        "INVALID",
        "ERROR",
        "INTERRUPTED",
        "p50",
        "p99 (value shown)",
    ]

    path = write_session_summary(tmp_path / "session" / "summary.png", results)
    assert path == tmp_path / "session" / "summary.png"
    assert path.stat().st_size > 20_000 and _png_size(path) == (1200, 800)


def test_session_summary_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from harness_fixtures.metrics.plots import write_session_summary

    assert write_session_summary(tmp_path / "empty.png", []) is None
    assert not (tmp_path / "empty.png").exists()
    # All metrics absent: still a figure (statuses only).
    only_errors = [{"test_id": "a", "status": "ERROR"}, {"test_id": "b", "status": "TIMEOUT"}]
    assert write_session_summary(tmp_path / "errors.png", only_errors) == tmp_path / "errors.png"
    # Unwritable target: a warning, no exception.
    (tmp_path / "file").write_text("")
    assert write_session_summary(tmp_path / "file" / "summary.png", only_errors) is None
    assert "session summary" in caplog.text


# -- tools/gpu_check.py ----------------------------------------------------------------------------
