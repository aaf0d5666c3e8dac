"""Load sizing end to end on the simulator: a run's rate comes from this machine's measurement unless the
user set one, and ``rate:`` in result.yaml says which and why."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    from support import HarnessProject

pytestmark = pytest.mark.slow

# No target_qps / target_latency anywhere: the harness sizes Server and SingleStream. Offline expects
# 5 samples/s with a 1 s minimum: the simulator (4 slots, ~85 ms per request) does ~45, so the first
# Offline run ends long before min_duration.
UNSIZED_USER_CONF = """\
tiny.*.performance_sample_count_override = 16
tiny.*.use_token_latencies = 1
tiny.Offline.target_qps = 5
tiny.Offline.min_duration = 1000
tiny.Offline.min_query_count = 1
tiny.Server.min_duration = 1000
tiny.Server.min_query_count = 10
tiny.Server.target_latency_percentile = 50
tiny.Server.ttft_latency = 2000
tiny.Server.tpot_latency = 200
tiny.SingleStream.min_duration = 500
tiny.SingleStream.min_query_count = 16
tiny.SingleStream.target_latency_percentile = 50
"""


def results(project: HarnessProject) -> dict[str, dict[str, Any]]:
    (session,) = project.session_dirs()
    data = yaml.safe_load((session / "session.yaml").read_text())
    return {r["test_id"]: r for r in data["results"]}


def test_offline_faster_than_expected_is_rerun_at_the_measured_rate(harness_project: HarnessProject) -> None:
    harness_project.model("m", ("Offline",))
    harness_project.user_conf(UNSIZED_USER_CONF)
    result = harness_project.run()
    result.assert_outcomes(passed=1)

    r = results(harness_project)["m_offline"]
    assert r["status"] == "VALID"
    rate = r["rate"]
    assert rate["setting"] == "offline_expected_qps" and rate["source"] == "measured"
    assert rate["attempts"] >= 2
    first = rate["earlier_attempts"][0]
    assert first["offline_expected_qps"] == 5 and first["status"] == "INVALID"
    assert "min duration not met" in first["reason"]
    assert rate["first_reason"].startswith("user.conf: tiny.Offline.target_qps = 5")
    # The measured rate sized the last run, and it outlasted min_duration.
    assert r["settings"]["target_qps"] == pytest.approx(rate["value"])
    assert rate["value"] > 5 * 2
    # Nothing measured is lost: the first attempt's LoadGen logs and requests are kept.
    (session,) = harness_project.session_dirs()
    attempt = session / first["dir"]  # relative to the session folder
    assert first["dir"] == "m_offline/attempt-1"
    assert (attempt / "mlperf" / "mlperf_log_detail.txt").is_file()
    assert (attempt / "requests.jsonl").read_text().count("\n") >= 5
    detail = (attempt / "mlperf" / "mlperf_log_detail.txt").read_text()
    assert '"result_validity", "value": "INVALID"' in detail


def test_server_load_is_a_fraction_of_the_sessions_offline_throughput(
    harness_project: HarnessProject,
) -> None:
    # Listed Server first: the Offline test still runs first, so its result sizes the Server test.
    harness_project.model("m", ("Server", "Offline"), load={"server_fraction": 0.4})
    harness_project.user_conf(UNSIZED_USER_CONF.replace("target_qps = 5", "target_qps = 60"))
    result = harness_project.run("-v")
    result.assert_outcomes(passed=2)
    order = [line for line in result.outlines if "::test_benchmark[" in line and "PASSED" in line]
    assert "m_offline" in order[0] and "m_server" in order[1]

    rs = results(harness_project)
    offline, server = rs["m_offline"], rs["m_server"]
    rate = server["rate"]
    assert rate["source"] == "measured" and rate["measured_from"] == "m_offline"
    assert rate["measured_samples_per_s"] == pytest.approx(offline["samples_per_s"])
    assert rate["value"] == pytest.approx(0.4 * offline["samples_per_s"], rel=1e-3)
    assert server["settings"]["target_qps"] == pytest.approx(rate["value"], rel=1e-6)
    assert server["status"] == "VALID"


def test_server_alone_is_sized_by_an_offline_probe(harness_project: HarnessProject) -> None:
    harness_project.model("m", ("Offline", "Server"), load={"probe_queries": 12})
    harness_project.user_conf(UNSIZED_USER_CONF)
    result = harness_project.run("-k", "m_server")
    result.assert_outcomes(passed=1)

    (session,) = harness_project.session_dirs()
    server = results(harness_project)["m_server"]
    rate = server["rate"]
    assert rate["measured_from"] == "probe-offline" and rate["source"] == "measured"
    probe = session / "m_server" / "probe-offline"
    probe_requests = (probe / "requests.jsonl").read_text().splitlines()
    assert len(probe_requests) == 12
    assert rate["value"] == pytest.approx(0.6 * rate["measured_samples_per_s"], rel=1e-3)
    assert not (session / "m_offline").exists()


def test_single_stream_expected_latency_is_the_warmup_latency(harness_project: HarnessProject) -> None:
    harness_project.model("m", ("SingleStream",))
    harness_project.user_conf(UNSIZED_USER_CONF)
    result = harness_project.run()
    result.assert_outcomes(passed=1)

    (session,) = harness_project.session_dirs()
    r = results(harness_project)["m_singlestream"]
    warmup = json.loads((session / "m_singlestream" / "client.json").read_text())["warmup"]
    assert r["rate"]["source"] == "measured"
    assert (
        r["rate"]["value"]
        == warmup["single_stream_expected_latency_ms"]
        == pytest.approx(warmup["latency_s"] * 1e3, abs=0.1)
    )
    # LoadGen ran with it: its effective target_qps is the inverse of the expected latency.
    assert r["settings"]["target_qps"] == pytest.approx(1e3 / r["rate"]["value"], rel=1e-3)


def test_a_target_given_on_the_command_line_is_kept(harness_project: HarnessProject) -> None:
    harness_project.model("m", ("Server",))
    harness_project.user_conf(UNSIZED_USER_CONF)
    result = harness_project.run("--harness-target-qps", "15")
    result.assert_outcomes(passed=1)
    (session,) = harness_project.session_dirs()
    r = results(harness_project)["m_server"]
    assert r["rate"]["source"] == "command line" and r["rate"]["value"] == 15
    assert r["settings"]["target_qps"] == 15
    assert not (session / "m_server" / "probe-offline").exists()
