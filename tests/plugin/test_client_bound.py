"""Client-bound detection through pytest: a starved client fails the gate with its numbers, its
diagnosis names the client, and ``--harness-allow-client-bound`` reports it without failing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import yaml

from harness_fixtures.config import BenchmarkCase
from harness_fixtures.servers import Endpoint

StartSim = Callable[..., tuple[Endpoint, BenchmarkCase]]


# -- through pytest: the gate ------------------------------------------------------------------------
STARVED_CONF = """\
tiny.*.performance_sample_count_override = 16
tiny.*.use_token_latencies = 1
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
    # The diagnosis names the client, not the engine, and says what to do.
    assert result["diagnosis"]["verdict"].startswith("client-bound")
    assert "--harness-client-workers" in result["diagnosis"]["next_step"]
    res.stdout.fnmatch_lines(["*why: client-bound*"])

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
