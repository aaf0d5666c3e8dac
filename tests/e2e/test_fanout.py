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
import requests
from support import OnChild, run_pipeline

from harness_fixtures.client.requestlog import read_requests
from harness_fixtures.config import BenchmarkCase, Thresholds
from harness_fixtures.gating import check_client_bound, check_thresholds
from harness_fixtures.results import BenchmarkResult
from harness_fixtures.servers import Endpoint

StartSim = Callable[..., tuple[Endpoint, BenchmarkCase]]
SIM = {"ttft_base_ms": 20, "itl_ms": 2, "max_batch": 4096}
TOKENS = 8
USER_CONF = """\
tiny.*.performance_sample_count_override = 16
tiny.*.use_token_latencies = 1
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


# -- the hot path both client kinds share ------------------------------------------------------------


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
    assert sum(1 for s in sim if s["request_id"] in ours and s["status"] == "ok") == len(reqs)


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
