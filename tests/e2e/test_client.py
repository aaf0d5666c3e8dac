"""The streaming client (harness_fixtures.client.streaming) against the simulator subprocess: exact token
ids, and every failure path ends in an error record with zero tokens — never made-up ids."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from harness_fixtures.client.spec import ClientSpec
from harness_fixtures.client.streaming import RequestRecord, StreamingClient
from harness_fixtures.config import BenchmarkCase, DatasetSpec, GenerationSpec
from harness_fixtures.servers import Endpoint

StartSim = Callable[..., tuple[Endpoint, BenchmarkCase]]
MAX_TOKENS = 16


class Collector:
    """The client's callbacks; ``wait`` returns once ``n`` requests completed (no sleeping)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.firsts: list[tuple[int, int | None]] = []
        self.completed: list[RequestRecord] = []
        self._done = threading.Event()

    def on_first(self, rec: RequestRecord) -> None:
        self.firsts.append((rec.query_id, rec.first_token_id))

    def on_complete(self, rec: RequestRecord) -> None:
        self.completed.append(rec)
        if len(self.completed) == self.n:
            self._done.set()

    def wait(self, timeout_s: float) -> bool:
        return self._done.wait(timeout_s)


def client_spec(base_url: str, served_model: str, request_timeout_s: float = 600.0) -> ClientSpec:
    """A spec for a client given its prompts directly (the dataset fields are not read)."""
    return ClientSpec(
        base_url=base_url,
        served_model=served_model,
        generation=GenerationSpec(max_tokens=MAX_TOKENS, ignore_eos=True),
        dataset=DatasetSpec(path="unused.json"),
        dataset_path="unused.json",
        request_timeout_s=request_timeout_s,
    )


def run_client(
    endpoint: Endpoint, prompts: list[list[int]], *, timeout_s: float = 30, request_timeout_s: float = 600.0
) -> tuple[StreamingClient, Collector]:
    got = Collector(len(prompts))
    client = StreamingClient(
        client_spec(endpoint.base_url, endpoint.served_model, request_timeout_s),
        prompts,
        got.on_first,
        got.on_complete,
    )
    client.start()
    try:
        client.submit([(100 + i, i) for i in range(len(prompts))])
        assert got.wait(timeout_s), f"only {len(got.completed)} of {len(prompts)} requests completed"
    finally:
        client.stop()
    got.completed.sort(key=lambda r: r.query_id)
    return client, got


def prompts_for(n: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 30_000) for _ in range(6)] for _ in range(n)]


def sim_records(endpoint: Endpoint) -> list[dict[str, Any]]:
    resp = requests.get(endpoint.base_url + "/sim/requests", timeout=10)
    resp.raise_for_status()
    return list(resp.json())


def test_token_ids_are_the_servers_exactly(start_sim: StartSim, tmp_path: Path) -> None:
    prompts = prompts_for(12)
    rng = random.Random(2)
    # Reference answers for the first 8 prompts: shorter than max_tokens (finish "stop") and longer (cut).
    answers = {
        i: [rng.randrange(100, 30_000) for _ in range(5 if i % 2 else MAX_TOKENS + 4)] for i in range(8)
    }
    ref = tmp_path / "answers.json"
    ref.write_text(
        json.dumps([{"prompt_token_ids": prompts[i], "output_token_ids": a} for i, a in answers.items()])
    )
    endpoint, _ = start_sim(ttft_base_ms=5, itl_ms=1, responses_file=str(ref))

    client, got = run_client(endpoint, prompts)

    assert client.failed == 0 and client.first_error is None
    assert [r.status for r in got.completed] == ["ok"] * len(prompts)
    for i, rec in enumerate(got.completed):
        if i in answers:
            assert rec.token_ids == answers[i][:MAX_TOKENS], f"prompt {i}"
            assert rec.finish_reason == ("stop" if i % 2 else "length")
        else:
            # The simulator's own answer: its non-streaming response carries the same ids.
            body = {"model": endpoint.served_model, "prompt": prompts[i], "max_tokens": MAX_TOKENS,
                    "ignore_eos": True, "return_token_ids": True}  # fmt: skip
            truth = requests.post(endpoint.base_url + "/v1/completions", json=body, timeout=10).json()
            assert rec.token_ids == truth["choices"][0]["token_ids"], f"prompt {i}"
        assert rec.n_tokens == len(rec.token_ids) == rec.usage_tokens
        assert rec.first_token_id == rec.token_ids[0]
        assert rec.sent_ns <= rec.first_token_ns <= rec.done_ns
    # One first-token callback per request, with the id the stream started with.
    assert sorted(got.firsts) == [(r.query_id, r.token_ids[0]) for r in got.completed]
    # The server-side records agree: same request (the stream's id), first token, token count.
    by_id = {r["request_id"]: r for r in sim_records(endpoint)}
    for rec in got.completed:
        server = by_id[rec.server_request_id or ""]
        assert server["status"] == "ok"
        assert server["first_token_id"] == rec.first_token_id == server["expected_first_token_id"]
        assert server["n_tokens"] == rec.n_tokens


FAULTS = {
    "http_500": ({"http_500_rate": 1.0}, ["HTTP 500: ", "simulated internal server error"], False),
    # The raw fragment the server sent is quoted in the error.
    "malformed_sse": ({"malformed_sse_rate": 1.0}, ["malformed SSE data: ", "{malformed-sse-from-sim"], True),
    # The connection closes mid-body (as when an engine dies): the chunked body never completes.
    "truncated": (
        {"truncate_stream_rate": 1.0},
        ["HttpError: Server disconnected before the response ended (truncated)"],
        True,
    ),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_failed_requests_have_an_error_and_no_tokens(start_sim: StartSim, fault: str) -> None:
    settings, fragments, streamed_some = FAULTS[fault]
    endpoint, _ = start_sim(ttft_base_ms=5, itl_ms=1, **settings)
    prompts = prompts_for(4)

    client, got = run_client(endpoint, prompts)

    assert client.failed == len(prompts)
    assert client.first_error in {
        f"query {r.query_id} (sample {r.sample_index}): {r.error}" for r in got.completed
    }
    for rec in got.completed:
        assert rec.status == "error"
        assert rec.n_tokens == 0 and rec.token_ids == []
        assert rec.error
        for fragment in fragments:
            assert fragment in rec.error, rec.error
    truth = {r["request_id"]: r for r in sim_records(endpoint)}
    if streamed_some:
        # Part of the answer arrived before the fault: the first-token callback carried the server's
        # real first token, never a placeholder.
        assert len(got.firsts) == len(prompts)
        for rec in got.completed:
            assert rec.first_token_id == truth[rec.server_request_id or ""]["expected_first_token_id"]
    else:
        assert got.firsts == []


def test_hung_request_times_out(start_sim: StartSim) -> None:
    endpoint, _ = start_sim(ttft_base_ms=5, itl_ms=1, hang_after_requests=0)
    t0 = time.monotonic()
    client, got = run_client(endpoint, prompts_for(2), timeout_s=20, request_timeout_s=1.0)
    elapsed = time.monotonic() - t0

    assert elapsed < 10  # a 1 s deadline, not the default 600 s
    assert client.failed == 2
    for rec in got.completed:
        assert rec.status == "error" and rec.error == "timeout after 1 s"
        assert rec.n_tokens == 0 and rec.token_ids == []
        assert (rec.done_ns - rec.sent_ns) / 1e9 >= 1.0
    assert got.firsts == []
