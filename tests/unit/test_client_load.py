"""Client fan-out (harness_fixtures.client.fanout) and client-bound detection, on the simulator.

LoadGen stays in the runner; N worker processes stream. Checked end to end: every query completes
exactly once, LoadGen's recorded token ids are the server's, first token before completion, a killed
worker's queries complete as failures, and a starved client fails the gate with its numbers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from harness_fixtures.client.sizing import auto_workers, prewarm_connections
from harness_fixtures.client.streaming import _token_chunk
from harness_fixtures.config import BenchmarkCase
from harness_fixtures.gating import ClientBoundLimits, check_client_bound
from harness_fixtures.servers import Endpoint

StartSim = Callable[..., tuple[Endpoint, BenchmarkCase]]


# -- the worker rule and the gate, as functions ----------------------------------------------------
def test_auto_workers_rule() -> None:
    assert auto_workers("Server", 5, cpus=64) == 1  # a real engine's rate: the in-process client
    assert auto_workers("Server", 400, cpus=64) == 1
    assert auto_workers("Server", 1000, cpus=64) == 3  # ceil(1000 / 400)
    assert auto_workers("Server", 1000, cpus=2) == 1  # cores − 1: one core for LoadGen and the OS
    assert auto_workers("Server", 100_000, cpus=16) == 15
    assert auto_workers("Offline", 2000, cpus=8) == 5
    assert auto_workers("SingleStream", 5000, cpus=8) == 1
    assert auto_workers("Server", None, cpus=8) == 1


def test_prewarm_follows_littles_law() -> None:
    assert prewarm_connections("Server", 1000, 0.2, 1, 10.0, 1024) == 304  # 1.5 × 1000 × 0.2 + 4
    assert prewarm_connections("Offline", 100, 0.2, 5000, 1.0, 1024) == 1024  # capped
    assert prewarm_connections("Offline", 10, 0.2, 1, 1.0, 1024) == 11
    assert prewarm_connections("SingleStream", 10, 0.2, 1, 1.0, 1024) == 1


def healthy(**client: Any) -> dict[str, Any]:
    c = {
        "requests": 500,
        "dispatch_lag_ms_p99": 1.2,
        "achieved_qps": 99.0,
        "scheduled_qps": 100.0,
        "target_qps": 100,
        "cpu_bound_fraction": 0.0,
        "cpu_samples": 6,
        **client,
    }
    return {"mode": "performance", "status": "VALID", "scenario": "Server", "duration_s": 6, "client": c}


@pytest.mark.parametrize(
    ("client", "metric"),
    [
        ({"dispatch_lag_ms_p99": 45.0}, "dispatch_lag_p99_ms"),
        ({"achieved_qps": 90.0}, "achieved_qps"),
        ({"cpu_bound_fraction": 0.8}, "client_cpu_bound_fraction"),
    ],
)
def test_client_bound_bounds(client: dict[str, Any], metric: str) -> None:
    assert check_client_bound(healthy()) == []
    (v,) = check_client_bound(healthy(**client))
    assert v.metric == metric and v.source == "client"
    assert "--harness-client-workers" in v.message and "--harness-allow-client-bound" in v.message
    # Too few requests or CPU samples for a p99 / a saturation verdict: no flag.
    assert check_client_bound(healthy(requests=50, cpu_samples=2, **client)) == []
    # Offline issues everything at once: its dispatch lag is the queue, not a client fault.
    offline = {**healthy(**client), "scenario": "Offline"}
    assert [x.metric for x in check_client_bound(offline)] == (
        ["client_cpu_bound_fraction"] if metric == "client_cpu_bound_fraction" else []
    )
    assert check_client_bound({**healthy(**client), "mode": "accuracy"}) == []
    assert check_client_bound(healthy(**client), ClientBoundLimits(10_000, 0.0, 1.0)) == []


# -- the hot path both client kinds share ------------------------------------------------------------
SSE_CHUNKS = [
    b'{"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":" a",'
    b'"logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":[5,6],"token_ids":[17]}]}',
    b'{"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"",'
    b'"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":[2,3]}]}',
    b'{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"content":" \\"token_ids\\":[9]"},"finish_reason":"stop","token_ids":[4]}]}',
    b'{"choices":[{"index":0,"token_ids": [1, 2]}]}',  # spaced JSON: the full parser
    b'{"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}}',
    b'{"choices":[{"index":0,"token_ids":[1]},{"index":1,"token_ids":[2]}]}',
    b'{"error":{"message":"boom"},"choices":[{"index":0,"token_ids":[1]}]}',
]


@pytest.mark.parametrize("data", SSE_CHUNKS)
def test_token_chunk_fast_path_agrees_with_json(data: bytes) -> None:
    fast = _token_chunk(data)
    if fast is None:
        return  # parsed in full by json.loads
    chunk = json.loads(data)
    (choice,) = chunk["choices"]
    assert "usage" not in chunk and "error" not in chunk
    assert fast == (choice.get("token_ids") or [], choice.get("finish_reason"))


def test_token_chunk_fast_path_is_taken_for_vllm_token_chunks() -> None:
    assert _token_chunk(SSE_CHUNKS[0]) == ([17], None)
    assert _token_chunk(SSE_CHUNKS[1]) == ([2, 3], "length")
    assert _token_chunk(SSE_CHUNKS[2]) == ([4], "stop")  # escaped quotes in text are not keys
    assert [_token_chunk(c) for c in SSE_CHUNKS[3:]] == [None] * 4


# -- end to end on the simulator -------------------------------------------------------------------


# -- through pytest: the gate ------------------------------------------------------------------------
