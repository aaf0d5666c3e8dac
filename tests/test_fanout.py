"""Client fan-out (harness_fixtures.client.fanout) and client-bound detection, on the simulator.

LoadGen stays in the runner; N worker processes stream. Checked end to end: every query completes
exactly once, LoadGen's recorded token ids are the server's, first token before completion, a killed
worker's queries complete as failures, and a starved client fails the gate with its numbers.
"""

from __future__ import annotations

import array
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
import yaml

from conftest import OnChild, run_pipeline
from harness_fixtures.client.requestlog import read_requests
from harness_fixtures.client.sizing import auto_workers, prewarm_connections
from harness_fixtures.client.streaming import _token_chunk
from harness_fixtures.config import BenchmarkCase, Thresholds
from harness_fixtures.gating import ClientBoundLimits, check_client_bound, check_thresholds
from harness_fixtures.results import BenchmarkResult
from harness_fixtures.servers import Endpoint

StartSim = Callable[..., tuple[Endpoint, BenchmarkCase]]
SIM = {"ttft_base_ms": 20, "itl_ms": 2, "max_batch": 4096}
TOKENS = 8
USER_CONF = """\
tiny.*.performance_sample_count_override = 16
tiny.Offline.target_qps = 100
tiny.Offline.min_duration = 200
tiny.Offline.min_query_count = 200
tiny.Server.target_qps = 60
tiny.Server.min_duration = 2500
tiny.Server.min_query_count = 120
tiny.Server.target_latency_percentile = 50
tiny.Server.ttft_latency = 2000
tiny.Server.tpot_latency = 200
"""


def run(
    start_sim: StartSim,
    tmp_path: Path,
    scenario: str,
    workers: int | None,
    *,
    mode: str = "performance",
    on_start: Callable[[int], None] | None = None,
    **sim: Any,
) -> tuple[BenchmarkResult, Endpoint, Path]:
    endpoint, case = start_sim(max_tokens=TOKENS, **{**SIM, **sim})
    conf = tmp_path / "user.conf"
    conf.write_text(USER_CONF)
    test_dir = tmp_path / f"{scenario}-{mode}-{workers}"
    outcome = run_pipeline(
        case,
        scenario,
        endpoint,
        test_dir,
        conf,
        mode=mode,
        events=OnChild(on_start) if on_start else None,
        request_timeout_s=30,
        test_timeout_s=120,
        client_workers=workers,
    )
    return outcome.result, endpoint, test_dir


def sim_answer(endpoint: Endpoint, prompt: list[int]) -> list[int]:
    body = {"model": endpoint.served_model, "prompt": prompt, "max_tokens": TOKENS, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    resp = requests.post(endpoint.base_url + "/v1/completions", json=body, timeout=10)
    return list(resp.json()["choices"][0]["token_ids"])


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
def test_fanout_completes_every_query_once_with_the_servers_tokens(
    start_sim: StartSim, tmp_path: Path
) -> None:
    # Accuracy mode: LoadGen logs the token ids it was handed for every sample, so what crossed the
    # worker → runner pipe can be compared with the server's own answers.
    result, endpoint, test_dir = run(start_sim, tmp_path, "Offline", 2, mode="accuracy")

    assert "No errors encountered during test." in (test_dir / "harness.log").read_text()
    client = json.loads((test_dir / "client.json").read_text())
    assert client["workers"] == 2 and len(client["worker_processes"]) == 2
    assert all(w["exit_code"] == 0 and w["requests"] > 0 for w in client["worker_processes"])
    reqs = read_requests(test_dir / "requests.jsonl")
    assert result.queries.failed == 0 and result.queries.completed == result.queries.issued == len(reqs)
    assert len({r["query_id"] for r in reqs}) == len(reqs)  # exactly once
    for r in reqs:
        assert r["issued_s"] <= r["sent_s"] <= r["first_token_s"] <= r["done_s"]
    log = json.loads((test_dir / "mlperf" / "mlperf_log_accuracy.json").read_text())
    assert len(log) == len(reqs) == 16  # accuracy mode: each sample once
    prompts = [row["tok_input"] for row in json.loads(Path(endpoint_dataset(test_dir)).read_text())]
    for entry in log:
        ids = array.array("i", bytes.fromhex(entry["data"])).tolist()
        assert ids == sim_answer(endpoint, prompts[entry["qsl_idx"]]), entry["qsl_idx"]
    # The simulator saw the same requests: one per query plus a warm-up per worker.
    sim = requests.get(endpoint.base_url + "/sim/requests", timeout=10).json()
    ours = {r["server_request_id"] for r in reqs}
    assert sum(1 for s in sim if s["x_request_id"] in ours and s["status"] == "ok") == len(reqs)


def endpoint_dataset(test_dir: Path) -> str:
    return str(json.loads((test_dir / "run_spec.json").read_text())["client"]["dataset_path"])


def test_fanout_server_run_matches_the_schedule(start_sim: StartSim, tmp_path: Path) -> None:
    result, _, test_dir = run(start_sim, tmp_path, "Server", 2)

    assert result.status == "VALID", result.reason
    assert result.queries.failed == 0 and result.queries.completed == result.queries.issued >= 120
    c = result.client
    assert c.workers == 2 and c.requests == result.queries.issued
    assert c.scheduled_qps and c.achieved_qps and abs(c.achieved_qps / c.scheduled_qps - 1) < 0.05
    assert c.target_qps == 60
    assert check_client_bound(result.model_dump(mode="json")) == [], c
    client = json.loads((test_dir / "client.json").read_text())
    assert sum(w["requests"] for w in client["worker_processes"]) == result.queries.issued
    assert min(w["requests"] for w in client["worker_processes"]) > 40  # both took a share


def test_killed_worker_fails_its_queries_and_loadgen_finishes(start_sim: StartSim, tmp_path: Path) -> None:
    killed: list[int] = []

    def kill_one_worker(runner_pid: int) -> None:
        def later() -> None:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    runner = psutil.Process(runner_pid)
                    workers = [
                        p
                        for p in runner.children()
                        if "harness_fixtures.client.fanout" in " ".join(p.cmdline())
                    ]
                    started = (Path(test_dir) / "mlperf" / "mlperf_log_detail.txt").is_file()
                except psutil.Error:
                    return
                if len(workers) == 2 and started:
                    time.sleep(1.0)  # mid-run: LoadGen has been issuing for a second
                    workers[0].send_signal(signal.SIGKILL)
                    killed.append(workers[0].pid)
                    return
                time.sleep(0.05)

        threading.Thread(target=later, daemon=True).start()

    test_dir = tmp_path / "Server-performance-2"
    # 300 ms to first token: ~20 queries in flight, so the killed worker surely held some.
    result, _, _ = run(start_sim, tmp_path, "Server", 2, on_start=kill_one_worker, ttft_base_ms=300)

    assert killed, "the worker was never killed"
    assert result.status in ("VALID", "INVALID"), result.reason  # LoadGen finished
    reqs = read_requests(test_dir / "requests.jsonl")
    assert len({r["query_id"] for r in reqs}) == len(reqs) == result.queries.issued  # once each, none lost
    failed = [r for r in reqs if r["status"] != "ok"]
    # The killed worker held its share of the queries in flight then (~60 QPS × 0.31 s / 2); later
    # ones went to the live worker.
    assert 1 <= len(failed) < 40, len(failed)
    for r in failed:
        assert r["n_tokens"] == 0
        assert f"(pid {killed[0]}) died (exit code -9) with this query in flight" in r["error"]
    assert result.queries.failed == len(failed)
    reasons = [
        v.message for v in check_thresholds(result.model_dump(mode="json"), Thresholds(require_valid=False))
    ]
    assert any("died (exit code -9)" in line and f"{len(failed)} of" in line for line in reasons), reasons
    assert "died" in (test_dir / "harness.log").read_text()


# -- through pytest: the gate ------------------------------------------------------------------------
STARVED_CONF = """\
tiny.*.performance_sample_count_override = 16
tiny.Server.target_qps = 20000
tiny.Server.min_duration = 400
tiny.Server.min_query_count = 100
tiny.Server.target_latency_percentile = 50
tiny.Server.ttft_latency = 60000
tiny.Server.tpot_latency = 10000
"""


def test_starved_client_fails_the_gate_with_its_numbers(harness_project: Any) -> None:
    """20,000 QPS at one in-process client: LoadGen's schedule runs away from the client."""
    harness_project.model(
        "starved",
        ("Server",),
        sim={"ttft_base_ms": 1, "itl_ms": 0, "max_batch": 100_000},
        thresholds={"require_valid": False},  # overloaded on purpose: only the client gate matters
    )
    harness_project.user_conf(STARVED_CONF)

    res = harness_project.run("--harness-client-workers", "1", timeout=180)

    res.assert_outcomes(failed=1)
    res.stdout.fnmatch_lines(
        ["*dispatch_lag_p99_ms * > max 10 (lower is better, client)*--harness-allow-client-bound*"]
    )
    (session,) = harness_project.session_dirs()
    result = yaml.safe_load((session / "starved_server" / "result.yaml").read_text())
    client = result["client"]
    assert client["dispatch_lag_ms_p99"] > 10 and client["workers"] == 1
    assert any(g["source"] == "client" for g in result["gate"])
    assert client["client_bound"] == [g["message"] for g in result["gate"] if g["source"] == "client"]

    allowed = harness_project.run(
        "--harness-client-workers", "1", "--harness-allow-client-bound", timeout=180
    )

    allowed.assert_outcomes(passed=1)
    (_, session2) = harness_project.session_dirs()
    result2 = yaml.safe_load((session2 / "starved_server" / "result.yaml").read_text())
    assert result2["client"]["client_bound"] and not result2["gate"]  # reported, not failed


def test_client_workers_option_is_validated(harness_project: Any) -> None:
    res = harness_project.run("--harness-client-workers", "many", "--collect-only")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*--harness-client-workers*'many' is not 'auto' or a count >= 1*"])
