"""End to end on the simulator: ``pipeline.run_test`` (LoadGen child + client) against a SimLauncher engine,
with LoadGen's numbers checked against the simulator's latency model and its own per-request records."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from support import run_pipeline

from harness_fixtures.client.requestlog import read_requests
from harness_fixtures.config import BenchmarkCase
from harness_fixtures.results import BenchmarkResult
from harness_fixtures.servers import Endpoint

StartSim = Callable[..., tuple[Endpoint, BenchmarkCase]]

TTFT_MS, ITL_MS, MAX_BATCH, TOKENS = 50.0, 5.0, 16, 32
SIM = {"ttft_base_ms": TTFT_MS, "itl_ms": ITL_MS, "max_batch": MAX_BATCH}
# Offline: 1.1 × 80/s × 1 s = 88 samples, ~6 waves of 16. Server: 20/s for 2 s, never more than a few
# requests at once, so nothing queues in the simulator. The p50 target keeps early stopping satisfiable.
USER_CONF = """\
tiny.*.performance_sample_count_override = 16
tiny.*.use_token_latencies = 1
tiny.Offline.target_qps = 80
tiny.Offline.min_duration = 1000
tiny.Offline.min_query_count = 1
tiny.Server.target_qps = 20
tiny.Server.min_duration = 2000
tiny.Server.min_query_count = 30
tiny.Server.target_latency_percentile = 50
tiny.Server.ttft_latency = 2000
tiny.Server.tpot_latency = 200
"""


def generation_tokens(endpoint: Endpoint) -> float:
    text = requests.get(endpoint.base_url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vllm:generation_tokens_total":
                return sample.value
    raise AssertionError("vllm:generation_tokens_total not in /metrics")


def run(
    start_sim: StartSim, tmp_path: Path, scenario: str
) -> tuple[BenchmarkResult, Endpoint, Path, float, list[dict[str, Any]]]:
    """One benchmark; returns the result, the engine, the test dir, the generated-token delta and the
    simulator's records, read before the engine stops."""
    endpoint, case = start_sim(max_tokens=TOKENS, **SIM)
    conf = tmp_path / "user.conf"
    conf.write_text(USER_CONF)
    test_dir = tmp_path / scenario.lower()
    before = generation_tokens(endpoint)
    result = run_pipeline(
        case, scenario, endpoint, test_dir, conf, request_timeout_s=30, test_timeout_s=120
    ).result
    delta = generation_tokens(endpoint) - before
    records = requests.get(endpoint.base_url + "/sim/requests", timeout=10).json()
    return result, endpoint, test_dir, delta, records


def check_counts(
    result: BenchmarkResult, test_dir: Path, delta: float, records: list[dict[str, Any]]
) -> None:
    """Every request is accounted for on both sides, and the tokens counted are the tokens generated."""
    assert result.status == "VALID", result.reason
    q = result.queries
    assert q.failed == 0 and q.completed == q.issued > 0
    client_requests = read_requests(test_dir / "requests.jsonl")
    assert len(client_requests) == q.issued
    ours = {r["server_request_id"] for r in client_requests}
    sim = [r for r in records if r["request_id"] in ours]
    assert len(sim) == q.issued and all(r["status"] == "ok" for r in sim)
    assert len(records) == q.issued + 1  # + the warm-up request
    # The simulator's generation counter moved by exactly what the client counted, plus the warm-up.
    assert q.output_tokens == TOKENS * q.issued
    assert delta == q.output_tokens + TOKENS


@pytest.mark.slow
def test_offline_throughput_matches_the_latency_model(start_sim: StartSim, tmp_path: Path) -> None:
    result, _, test_dir, delta, records = run(start_sim, tmp_path, "Offline")
    check_counts(result, test_dir, delta, records)

    samples = result.settings["samples_per_query"]
    assert samples == result.queries.issued == 88
    # FIFO batch of MAX_BATCH: ceil(samples / batch) waves, each TTFT + (TOKENS - 1) × ITL long.
    per_request_s = (TTFT_MS + (TOKENS - 1) * ITL_MS) / 1e3
    implied = samples * TOKENS / (math.ceil(samples / MAX_BATCH) * per_request_s)
    assert result.tokens_per_s is not None
    # Nothing can beat the model; two shared cores may lose a good part of it, not most of it.
    assert 0.6 * implied <= result.tokens_per_s <= 1.02 * implied, (result.tokens_per_s, implied)
    # The bound means something: at full concurrency (no batch limit) or one request at a time the
    # throughput would be outside it.
    assert not 0.6 * implied <= samples * TOKENS / per_request_s <= 1.02 * implied
    assert not 0.6 * implied <= TOKENS / per_request_s <= 1.02 * implied


@pytest.mark.slow
def test_server_ttft_and_tokens_match_the_simulators_records(start_sim: StartSim, tmp_path: Path) -> None:
    result, _, test_dir, delta, records = run(start_sim, tmp_path, "Server")
    check_counts(result, test_dir, delta, records)

    ours = {r["server_request_id"] for r in read_requests(test_dir / "requests.jsonl")}
    server_ttft_ms = [
        (r["first_token_ns"] - r["received_ns"]) / 1e6 for r in records if r["request_id"] in ours
    ]
    sim_p50 = statistics.median(server_ttft_ms)
    assert TTFT_MS <= sim_p50 < TTFT_MS + 20  # nothing queued: the model's TTFT plus timer slack
    assert result.ttft_ms.p50 is not None
    assert abs(result.ttft_ms.p50 - sim_p50) <= 5.0, (result.ttft_ms.p50, sim_p50)
    # LoadGen's TPOT is the simulator's inter-token latency.
    assert result.tpot_ms.p50 is not None and abs(result.tpot_ms.p50 - ITL_MS) <= 1.0
