"""One LoadGen, many endpoints, on simulator replicas over loopback: scaling, the dispatch's balance, and
a replica killed mid-run (its queries fail, the others carry on, the result names it)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from support import sim_case

from harness_fixtures.client.requestlog import read_requests
from harness_fixtures.config import BenchmarkCase, plan_runs
from harness_fixtures.metrics.timeline import read_timeline
from harness_fixtures.options import HarnessOptions
from harness_fixtures.pipeline import Events, Outcome, ProgressTick, Suite, run_test
from harness_fixtures.results import BenchmarkResult
from harness_fixtures.servers import Endpoint, LaunchContext
from harness_fixtures.servers.launchers import SimLauncher

StartReplicas = Callable[[int], tuple[list[Endpoint], BenchmarkCase]]

# Each replica is its own bottleneck: 2 requests generate at once, each ~20 + 15 × 20 ms; the client
# (a few dozen requests per second) is far from busy.
SIM: dict[str, Any] = {"ttft_base_ms": 20, "itl_ms": 20, "max_batch": 2}
TOKENS = 16
PER_REPLICA_QUERIES = 24  # Offline: 12 waves of 2 on each replica, ~4 s
USER_CONF = """\
tiny.*.performance_sample_count_override = 16
tiny.*.use_token_latencies = 1
tiny.Offline.target_qps = 1
tiny.Offline.min_duration = 500
tiny.Server.target_qps = 12
tiny.Server.min_duration = 5000
tiny.Server.min_query_count = 60
tiny.Server.target_latency_percentile = 50
tiny.Server.ttft_latency = 10000
tiny.Server.tpot_latency = 1000
"""


@pytest.fixture
def start_replicas(tmp_path: Path) -> Iterator[StartReplicas]:
    """``n`` simulator replicas of one case, each with its own folder and log, started through the
    harness's SimLauncher (replica index as the suite passes it); all stopped at teardown."""
    started: list[tuple[SimLauncher, Endpoint]] = []

    def start(n: int) -> tuple[list[Endpoint], BenchmarkCase]:
        case = sim_case(tmp_path, "tiny", TOKENS, **SIM)
        endpoints = []
        for i in range(n):
            launcher = SimLauncher()
            where = tmp_path / f"engine-{len(started)}"
            ep = launcher.start(LaunchContext(case=case, run_dir=where, replica=i))
            started.append((launcher, ep))
            assert ep.pid is not None, f"replica {i} is not a process of this test"
            endpoints.append(ep)
        return endpoints, case

    yield start
    for launcher, endpoint in reversed(started):
        launcher.stop(endpoint)


def run(
    case: BenchmarkCase,
    scenario: str,
    endpoints: list[Endpoint],
    test_dir: Path,
    events: Events | None = None,
    **options: Any,
) -> Outcome:
    (planned,) = [r for r in plan_runs(case, "performance") if r.scenario == scenario]
    conf = test_dir.parent / "user.conf"
    conf.write_text(USER_CONF)
    suite = Suite(
        HarnessOptions(user_conf=conf, request_timeout_s=30, test_timeout_s=120, client_workers=1, **options)
    )
    return run_test(planned, lambda: endpoints, suite, test_dir, events)


def running(endpoint: Endpoint) -> float:
    """The simulator's requests generating right now (its /metrics)."""
    text = requests.get(endpoint.base_url + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vllm:num_requests_running":
                return sample.value
    raise AssertionError("vllm:num_requests_running not in the simulator's /metrics")


def test_four_replicas_scale_as_one_sut_and_share_evenly(
    start_replicas: StartReplicas, tmp_path: Path
) -> None:
    endpoints, case = start_replicas(4)

    one = run(case, "Offline", endpoints[:1], tmp_path / "one", min_query_count=PER_REPLICA_QUERIES).result
    four = run(case, "Offline", endpoints, tmp_path / "four", min_query_count=4 * PER_REPLICA_QUERIES).result

    for r in (one, four):
        assert r.status == "VALID", r.reason
        assert r.queries.failed == 0 and r.tokens_per_s
    assert one.endpoints == []  # one endpoint: no per-endpoint section
    ratio = four.tokens_per_s / one.tokens_per_s  # type: ignore[operator]
    print(f"4 replicas: {four.tokens_per_s} tok/s, 1 replica: {one.tokens_per_s} tok/s, ratio {ratio:.2f}")
    assert ratio >= 3.5, (four.tokens_per_s, one.tokens_per_s)

    # Per endpoint, from requests.jsonl: every query named its endpoint, and least-outstanding spread
    # them within 5 % of even.
    rows = read_requests(tmp_path / "four" / "requests.jsonl")
    assert len(rows) == four.queries.issued
    assert {r["endpoint"] for r in rows} == {0, 1, 2, 3}
    assert [e.url for e in four.endpoints] == [ep.base_url for ep in endpoints]
    assert sum(e.queries for e in four.endpoints) == four.queries.issued
    for e in four.endpoints:
        assert e.queries == sum(1 for r in rows if r["endpoint"] == e.index)
        assert e.failures == 0 and e.completed == e.queries
        assert e.share is not None and abs(e.share - 0.25) <= 0.05 * 0.25, four.endpoints
        assert e.ttft_ms_p50 is not None and e.tpot_ms_p99 is not None
        # each replica's own /metrics counted what it generated in the run
        assert e.engine_window is not None
    assert sum(e.output_tokens for e in four.endpoints) == four.queries.output_tokens
    # Each replica's /metrics in the timeline: the first as "engine", the others as engine1..3.
    timeline = read_timeline(tmp_path / "four" / "timeline.csv")
    sources = {s.source for s in timeline.samples if "generation_tokens" in s.series}
    assert sources >= {"engine", "engine1", "engine2", "engine3"}, sources
    assert four.telemetry.collectors.get("engine3") == "ok", four.telemetry.collectors


def test_metadata_lists_endpoints_and_describes_the_sut(
    start_replicas: StartReplicas, tmp_path: Path
) -> None:
    endpoints, case = start_replicas(2)
    outcome = run(case, "Offline", endpoints, tmp_path / "two", min_query_count=8)
    assert outcome.result.status == "VALID", outcome.result.reason
    assert outcome.metadata.endpoints == [ep.base_url for ep in endpoints]
    assert outcome.metadata.sut is not None and "2 sim replicas" in outcome.metadata.sut
    assert "Network SUT" not in outcome.metadata.sut  # loopback: not a network SUT
    assert outcome.metadata.run_spec["client"]["endpoints"] == [ep.base_url for ep in endpoints]


class _KillWhenBusy(Events):
    """Once a fifth of the run's queries are answered, kill replica ``victim`` (a process this test
    started) at a moment it has requests in flight, and remember when."""

    def __init__(self, victim: Endpoint, after: int) -> None:
        self.victim = victim
        self.after = after
        self.killed_at_s: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def live(self, test_id: str, requests_path: Path, expected: int | None) -> Iterator[ProgressTick | None]:
        def watch() -> None:
            # Polls the run's own progress and the victim's load; waits on an event, not a timer.
            while not self._stop.wait(0.02):
                if len(read_requests(requests_path)) < self.after:
                    continue
                with contextlib.suppress(requests.RequestException):
                    if running(self.victim) >= 1:
                        assert self.victim.pid is not None
                        os.kill(self.victim.pid, signal.SIGKILL)
                        rows = read_requests(requests_path)
                        self.killed_at_s = max(r["done_s"] for r in rows)
                        return

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        try:
            yield None
        finally:
            self._stop.set()
            self._thread.join(10)


def test_a_replica_killed_mid_run_fails_its_queries_and_the_others_carry_on(
    start_replicas: StartReplicas, tmp_path: Path
) -> None:
    endpoints, case = start_replicas(4)
    victim = 1  # least-outstanding gives it work whenever endpoint 0 is busy: it has queries in flight
    events = _KillWhenBusy(endpoints[victim], after=12)
    result: BenchmarkResult = run(case, "Server", endpoints, tmp_path / "kill", events).result

    assert events.killed_at_s is not None, "the replica was never busy enough to be killed mid-run"
    print(
        f"killed at {events.killed_at_s:.2f} s: "
        + ", ".join(f"{e.index}: {e.queries} q / {e.failures} failed" for e in result.endpoints)
    )
    assert not endpoints[victim].alive()
    # The run completed: LoadGen judged it (no ERROR, no TIMEOUT), with the dead replica's queries failed.
    assert result.status in ("VALID", "INVALID"), result.reason
    assert result.engine_alive is False
    dead = result.endpoints[victim]
    assert dead.failures >= 1, result.endpoints
    assert result.queries.failed == dead.failures  # only the dead replica's queries failed
    assert all(e.failures == 0 for e in result.endpoints if e.index != victim)
    assert dead.taken_out is not None  # dispatch stopped sending it queries
    # The result names the endpoint that failed, and why.
    assert result.reason is not None
    assert f"endpoint {victim} ({endpoints[victim].base_url}) died during the run" in result.reason
    rows = read_requests(tmp_path / "kill" / "requests.jsonl")
    failed = [r for r in rows if r["status"] != "ok"]
    assert failed and all(r["endpoint"] == victim and r["n_tokens"] == 0 for r in failed)
    # The others carried on: queries issued after the kill completed on them.
    later = [r for r in rows if r["issued_s"] > events.killed_at_s and r["status"] == "ok"]
    assert later and {r["endpoint"] for r in later} <= {0, 1, 2, 3} - {victim}
    assert len(later) >= 10, len(later)


def test_round_robin_takes_turns(start_replicas: StartReplicas, tmp_path: Path) -> None:
    endpoints, case = start_replicas(2)
    result = run(case, "Server", endpoints, tmp_path / "rr", dispatch="round-robin").result
    rows = sorted(read_requests(tmp_path / "rr" / "requests.jsonl"), key=lambda r: r["issued_s"])
    assert result.queries.failed == 0 and len(rows) >= 60
    # Server issues one query at a time: each goes to the other endpoint than the one before it.
    ends = [r["endpoint"] for r in rows]
    assert all(a != b for a, b in itertools.pairwise(ends)), ends[:20]


def test_fanout_workers_each_endpoint_gets_its_share(start_replicas: StartReplicas, tmp_path: Path) -> None:
    """With worker processes, each endpoint gets its own; the runner's dispatch still picks the
    endpoint, so least-outstanding sees every query in flight."""
    endpoints, case = start_replicas(2)
    (planned,) = [r for r in plan_runs(case, "performance") if r.scenario == "Offline"]
    conf = tmp_path / "user.conf"
    conf.write_text(USER_CONF)
    suite = Suite(
        HarnessOptions(
            user_conf=conf, request_timeout_s=30, test_timeout_s=120, client_workers=4, min_query_count=16
        )
    )
    result = run_test(planned, lambda: endpoints, suite, tmp_path / "fan").result
    assert result.status == "VALID", result.reason
    assert result.client.workers == 4
    assert result.client.cpu_pct is not None  # the workers' CPU counted with the runner's
    assert [e.queries for e in result.endpoints] == [8, 8]
    client = json.loads((tmp_path / "fan" / "client.json").read_text())
    assert client["workers_per_endpoint"] == 2
    assert len(client["worker_processes"]) == 4 and all(w["requests"] > 0 for w in client["worker_processes"])
    assert [e["dispatched"] for e in client["endpoints"]] == [8, 8]
