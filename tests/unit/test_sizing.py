"""Load sizing rules (harness_fixtures.loadgen.sizing): whose rate a run uses, when Offline is repeated."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness_fixtures.loadgen.mllog import MIN_DURATION_NOT_MET
from harness_fixtures.loadgen.sizing import (
    MAX_OFFLINE_ATTEMPTS,
    OFFLINE_RERUN_MARGIN,
    explicit_rate,
    needs_offline_rerun,
    offline_rerun,
    server_from_offline,
)
from harness_fixtures.loadgen.userconf import parse_user_conf
from harness_fixtures.results import RateChoice


def entries(tmp_path: Path, text: str) -> list:  # type: ignore[type-arg]
    path = tmp_path / "user.conf"
    path.write_text(text)
    return parse_user_conf(path)


def test_nothing_set_means_the_harness_sizes_it(tmp_path: Path) -> None:
    conf = entries(tmp_path, "m.Server.min_duration = 1000\nother.Server.target_qps = 3\n")
    for scenario in ("Offline", "Server", "SingleStream"):
        assert explicit_rate(conf, "m", scenario, None) is None


@pytest.mark.parametrize(
    "line",
    ["m.Server.target_qps = 3", "*.Server.target_qps = 3", "m.*.target_qps = 3", "*.*.target_qps = 3"],
)
def test_user_conf_target_in_any_loadgen_form_is_kept(tmp_path: Path, line: str) -> None:
    choice = explicit_rate(entries(tmp_path, line + "\n"), "m", "Server", None)
    assert choice is not None and choice.source == "user.conf" and choice.value is None
    assert "target_qps = 3" in choice.reason


def test_command_line_wins_and_single_stream_takes_its_inverse(tmp_path: Path) -> None:
    conf = entries(tmp_path, "m.Server.target_qps = 3\n")
    server = explicit_rate(conf, "m", "Server", 7.0)
    assert server is not None and (server.source, server.value) == ("command line", 7.0)
    ss = explicit_rate(conf, "m", "SingleStream", 4.0)
    assert ss is not None and ss.setting == "single_stream_expected_latency_ms" and ss.value == 250.0


def test_single_stream_reads_target_latency_not_target_qps(tmp_path: Path) -> None:
    conf = entries(tmp_path, "m.SingleStream.target_qps = 3\n")
    assert explicit_rate(conf, "m", "SingleStream", None) is None
    conf = entries(tmp_path, "m.SingleStream.target_latency = 900\n")
    choice = explicit_rate(conf, "m", "SingleStream", None)
    assert choice is not None and choice.source == "user.conf"


def test_server_target_is_the_fraction_of_offline() -> None:
    choice = server_from_offline(0.4, 0.5, "m_offline")
    assert choice.value == pytest.approx(0.2)
    assert choice.measured_from == "m_offline" and choice.source == "measured"
    assert "0.5 × the Offline 0.4 samples/s measured by m_offline" in choice.reason


@pytest.mark.parametrize(
    ("scenario", "mode", "status", "invalid", "failed", "rerun"),
    [
        ("Offline", "performance", "INVALID", [MIN_DURATION_NOT_MET], 0, True),
        # LoadGen's recommendation follows the failed condition in the list
        ("Offline", "performance", "INVALID", [MIN_DURATION_NOT_MET, "Increase expected QPS ..."], 0, True),
        ("Offline", "performance", "INVALID", [MIN_DURATION_NOT_MET, "min query count not met"], 0, False),
        ("Offline", "performance", "INVALID", [MIN_DURATION_NOT_MET, "early_stopping_result: x"], 0, False),
        ("Offline", "performance", "INVALID", [MIN_DURATION_NOT_MET], 2, False),  # failures: no rerun
        ("Offline", "performance", "VALID", [], 0, False),
        ("Offline", "accuracy", "INVALID", [MIN_DURATION_NOT_MET], 0, False),
        ("Server", "performance", "INVALID", [MIN_DURATION_NOT_MET], 0, False),
    ],
)
def test_only_a_too_fast_offline_run_is_repeated(
    scenario: str, mode: str, status: str, invalid: list[str], failed: int, rerun: bool
) -> None:
    assert needs_offline_rerun(scenario, mode, status, invalid, failed) is rerun


def test_rerun_uses_the_measured_rate_with_headroom_and_keeps_the_first_reason() -> None:
    first = RateChoice(setting="offline_expected_qps", value=None, source="user.conf", reason="m.Offline...")
    second = offline_rerun(first, 740.0, 500.0)
    assert second.value == pytest.approx(740.0 * OFFLINE_RERUN_MARGIN)
    assert second.attempts == 2 and second.measured_from == "attempt-1"
    assert "expected QPS 500 measured 740 samples/s" in second.reason
    third = offline_rerun(second, 800.0, second.value)
    assert third.attempts == 3 <= MAX_OFFLINE_ATTEMPTS
    assert third.first_reason == second.first_reason == "user.conf: m.Offline..."
