"""Deadlines that measure the server, and token counting without ids, on the simulator.

The Offline shape of a GPU run: every query is issued at once, the client has fewer connections than
queries, so later queries wait in the client for a connection longer than their deadline, while the
server answers each in well under it. Scaled down from 3,000 queries of ~3.2 s with a 5 s deadline to
22-24 queries of ~0.3 s with a 1 s deadline and 4 connections (queue wait ~1.3 s > 1 s > 0.3 s).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from support import TINY_SIM, TINY_USER_CONF, run_pipeline

from harness_fixtures.client.payload import TRTLLM
from harness_fixtures.client.requestlog import read_requests
from harness_fixtures.client.sizing import FD_HEADROOM
from harness_fixtures.client.spec import ClientSpec
from harness_fixtures.client.streaming import RequestRecord, StreamingClient
from harness_fixtures.config import BenchmarkCase, DatasetSpec, GenerationSpec
from harness_fixtures.servers import Endpoint

StartSim = Callable[..., tuple[Endpoint, BenchmarkCase]]
# ~50 ms to the first token, then 7 × 30 ms: ~0.26 s per answer; no batch limit, so no server queue.
SERVICE = {"ttft_base_ms": 50, "itl_ms": 30, "max_batch": 256}
DEADLINE_S, CONNECTIONS, QUERIES = 1.0, 4, 24


def test_deadline_starts_when_the_request_is_sent(start_sim: StartSim) -> None:
    endpoint, _ = start_sim(max_tokens=8, **SERVICE)
    spec = ClientSpec(
        base_url=endpoint.base_url,
        served_model=endpoint.served_model,
        generation=GenerationSpec(max_tokens=8, ignore_eos=True),
        dataset=DatasetSpec(path="unused.json"),
        dataset_path="unused.json",
        request_timeout_s=DEADLINE_S,
        max_connections=CONNECTIONS,
    )
    done: list[RequestRecord] = []
    finished = threading.Event()

    def on_complete(rec: RequestRecord) -> None:
        done.append(rec)
        if len(done) == QUERIES:
            finished.set()

    client = StreamingClient(spec, [[7, 8, 9]] * QUERIES, lambda r: None, on_complete)
    client.start()
    try:
        client.submit([(i, i) for i in range(QUERIES)])  # all at once, as Offline issues them
        assert finished.wait(60)
    finally:
        client.stop()
    assert [r.error for r in done if r.status != "ok"] == []
    waited = max((r.sent_ns - r.issued_ns) / 1e9 for r in done)
    served = max((r.done_ns - r.sent_ns) / 1e9 for r in done)
    assert waited > DEADLINE_S > served  # the shape: queue wait > deadline > service time


def test_offline_run_with_a_client_queue_longer_than_the_deadline(
    start_sim: StartSim, tmp_path: Path
) -> None:
    endpoint, case = start_sim(max_tokens=8, **SERVICE)
    conf = tmp_path / "user.conf"
    conf.write_text(TINY_USER_CONF)  # Offline: 22 queries at once
    outcome = run_pipeline(
        case,
        "Offline",
        endpoint,
        tmp_path / "offline",
        conf,
        request_timeout_s=DEADLINE_S,
        max_connections=CONNECTIONS,
    )
    r = outcome.result
    assert r.queries.failed == 0 and r.queries.issued == 22, r.queries
    assert r.status == "VALID", r.reason
    assert r.client.max_connections == CONNECTIONS
    reqs = read_requests(tmp_path / "offline" / "requests.jsonl")
    assert max(x["sent_s"] - x["issued_s"] for x in reqs) > DEADLINE_S  # the client queue was longer
    assert r.client.dispatch_lag_ms_p99 is not None and r.client.dispatch_lag_ms_p99 > DEADLINE_S * 1e3


def test_tokens_counted_from_usage_when_the_stream_has_no_ids(start_sim: StartSim, tmp_path: Path) -> None:
    """A chat run with TensorRT-LLM's request fields: no ids in the stream, so tokens come from usage;
    result.yaml says so, LoadGen gets the real count, and no id is made up for the first token."""
    # A bounded batch: a system whose throughput has a limit, so Offline's sizing settles (with no
    # limit, samples/s grows with every sample issued and no expected QPS outlasts min_duration).
    endpoint, case = start_sim(max_tokens=8, **TINY_SIM)
    endpoint.request_profile = TRTLLM
    case = case.model_copy(
        update={
            "generation": case.generation.model_copy(update={"api": "chat"}),
            "engine": case.engine.model_copy(update={"request_profile": "trtllm"}),
        }
    )
    conf = tmp_path / "user.conf"
    conf.write_text(TINY_USER_CONF)
    r = run_pipeline(case, "Offline", endpoint, tmp_path / "chat", conf).result
    assert r.status == "VALID" and r.queries.failed == 0, (r.reason, r.queries)
    assert r.queries.output_tokens == 8 * r.queries.completed
    assert r.client.token_count is not None and r.client.token_count.startswith("usage:")
    assert r.consistency.checked == 0  # no ids: nothing to compare, and nothing invented
    assert r.tokens_per_s is not None and r.tokens_per_s > 0


def test_fd_limit_with_the_real_resource_module() -> None:
    """The real calls, in a child process with a lowered limit (this process's limits stay as they are)."""
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (200, 400))\n"
        "from harness_fixtures.client.sizing import fit_connections_to_fd_limit\n"
        "print(fit_connections_to_fd_limit(1024)[0], resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == [str(400 - FD_HEADROOM), "400"]
