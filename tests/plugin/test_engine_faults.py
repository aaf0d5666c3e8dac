"""Engine faults seen through the plugin: a crash at start fails fast with the engine's log tail; a crash
mid-run fails that test with counts while LoadGen still finishes, the engine is restarted once for the
model's next test (not after a second death), and the next model still runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import yaml

from harness_fixtures.loadgen.mllog import parse_mllog
from harness_fixtures.results import BenchmarkResult

if TYPE_CHECKING:
    from support import HarnessProject

START_TIMEOUT_S = 60


def test_engine_crash_at_start_fails_fast_with_its_log(harness_project: HarnessProject) -> None:
    harness_project.model("a", ("Offline", "Server"), sim={"fail_start": True})

    result = harness_project.run("--junitxml=junit.xml", timeout=START_TIMEOUT_S)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*engine for 'a' failed to start: engine exited with code 3 during start-up*",
            "*fail_start is set: refusing to start (simulated engine start failure)*",
        ]
    )
    times = harness_project.junit_times()
    # The engine's exit is noticed at once, not at the 60 s start deadline; the second test of the
    # model does not try again.
    assert times["a_offline"] < START_TIMEOUT_S / 4, times
    assert times["a_server"] < 5.0, times
    (session,) = harness_project.session_dirs()
    log = (session / "engine-a" / "engine.log").read_text()
    assert log.count("fail_start is set") == 1
    # Both tests still leave a result saying why.
    for test_id in ("a_offline", "a_server"):
        r = BenchmarkResult.load(session / test_id / "result.yaml")
        assert r.status == "ERROR" and "fail_start is set" in (r.reason or "")


@pytest.mark.slow
def test_engine_crash_mid_run_fails_that_test_and_the_next_model_runs(
    harness_project: HarnessProject,
) -> None:
    # A model's Offline test runs first (its throughput sizes the Server load; here user.conf sets the
    # Server rate). The engine exits when request 7 arrives (the warm-up is request 1): Offline issues
    # 22 at once and dies; the engine is restarted once for a_server (40/s) and dies again;
    # a_singlestream then gets no third engine.
    crashing = {"ttft_base_ms": 50, "itl_ms": 5, "max_batch": 4, "crash_after_requests": 6}
    harness_project.model("a", ("Server", "Offline", "SingleStream"), sim=crashing)
    harness_project.model("b", ("Offline",))

    result = harness_project.run("--junitxml=junit.xml", timeout=150)
    result.assert_outcomes(passed=1, failed=3)
    result.stdout.fnmatch_lines(
        ["*engine died during the test (exit code 1)*", "*failed_requests * > max 0*Server disconnected*"]
    )
    (session,) = harness_project.session_dirs()

    crashed = BenchmarkResult.load(session / "a_offline" / "result.yaml")
    assert crashed.status == "ERROR" and not crashed.engine_alive
    assert "crash_after_requests=6 reached" in (crashed.reason or "")  # the engine's log tail
    q = crashed.queries
    assert q.failed > 0 and q.completed + q.failed == q.issued == 22
    assert q.first_error
    md = yaml.safe_load((session / "a_offline" / "metadata.yaml").read_text())
    assert md["engine"]["start_number"] == 1

    # a_server ran on a second engine (its requests reached a live server: it crashed again).
    again = BenchmarkResult.load(session / "a_server" / "result.yaml")
    assert again.status == "ERROR" and not again.engine_alive and again.queries.failed > 0
    md = yaml.safe_load((session / "a_server" / "metadata.yaml").read_text())
    assert md["engine"]["start_number"] == 2
    engine_log = (session / "engine-a" / "engine.log").read_text()
    assert engine_log.count("crash_after_requests=6 reached") == 2
    # Failed requests must not wreck LoadGen's latency statistics (they once read ~1e11 ms).
    assert again.ttft_ms.max is not None and again.ttft_ms.max < 10_000
    # LoadGen was not killed: it finished the run and wrote its result.
    values, _ = parse_mllog(session / "a_server" / "mlperf" / "mlperf_log_detail.txt")
    assert values["result_validity"] in ("VALID", "INVALID")
    assert values["result_query_count"] == again.queries.issued

    # After a second death the model's remaining test fails at once, without LoadGen.
    result.stdout.fnmatch_lines(["*engine for 'a' is not running (exit code 1): it died 2 times*"])
    assert not (session / "a_singlestream" / "mlperf").exists()
    given_up = BenchmarkResult.load(session / "a_singlestream" / "result.yaml")
    assert given_up.status == "ERROR" and "crash_after_requests=6 reached" in (given_up.reason or "")
    assert harness_project.junit_times()["a_singlestream"] < 5.0

    # The next model starts its own engine and passes.
    assert BenchmarkResult.load(session / "b_offline" / "result.yaml").status == "VALID"
