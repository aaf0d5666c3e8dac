"""The INVALID diagnosis on hand-made evidence: each rule, in its order, and the load it suggests."""

from __future__ import annotations

from typing import Any

import pytest

from harness_fixtures.diagnosis import SUGGESTED_SHARE, diagnose
from harness_fixtures.results import (
    BenchmarkResult,
    ClientStats,
    ConstraintCheck,
    EngineWindow,
    HistogramWindow,
)

TTFT_OVER = ConstraintCheck(name="ttft", observed_ms=52_800, limit_ms=10_000, percentile=0.9, margin=5.28)
UNLOADED = {"ttft_s": 0.4, "tpot_s": 0.05}


def result(waiting_share: float | None, **changes: Any) -> BenchmarkResult:
    engine = EngineWindow(
        waiting_share=waiting_share,
        histograms={
            "ttft": HistogramWindow(count=44, mean=30.0),
            "queue": HistogramWindow(count=44, mean=27.5),
            "prefill": HistogramWindow(count=44, mean=0.2),
        },
    )
    fields: dict[str, Any] = {
        "test_id": "m_server",
        "model": "m",
        "scenario": "Server",
        "mode": "performance",
        "loadgen_model": "m",
        "status": "INVALID",
        "samples_per_s": 0.43,
        "engine": engine,
        "client": ClientStats(target_qps=2.0, scheduled_qps=2.1, achieved_qps=0.5),
    }
    fields.update(changes)
    return BenchmarkResult(**fields)


def test_a_queue_in_the_engine_is_saturation_and_the_suggestion_is_below_what_it_completed() -> None:
    d = diagnose(result(0.67), [TTFT_OVER], UNLOADED, None, [])
    assert d.verdict.startswith("engine saturated: requests waited in the engine queue 67% of the run")
    assert "TTFT p90 52800 ms > limit 10000 ms (5.28×)" in d.verdict
    assert "of which 27.5 s in its queue" in d.verdict  # the TTFT split from the engine's histograms
    assert "completed 0.43 samples/s of the 2 QPS scheduled" in d.verdict
    # Far over capacity, 80 % of the failed target (1.6) would still fail: the bound is what it completed.
    assert d.next_step == f"try --harness-find-capacity or a target <= {SUGGESTED_SHARE * 0.43:.3g} QPS"
    assert d.evidence["engine_queue_mean_ms"] == pytest.approx(27_500)


def test_the_offline_throughput_bounds_the_suggestion_when_lower() -> None:
    d = diagnose(result(0.5), [TTFT_OVER], UNLOADED, 0.3, [])
    assert "Offline measured 0.3 samples/s" in d.verdict
    assert f"a target <= {SUGGESTED_SHARE * 0.3:.3g} QPS" in d.next_step


def test_client_bound_without_an_engine_queue_blames_the_client() -> None:
    d = diagnose(result(0.0), [TTFT_OVER], UNLOADED, None, ["dispatch lag: p99 120 ms > 50 ms"])
    assert d.verdict.startswith("client-bound: dispatch lag")
    assert "--harness-client-workers" in d.next_step
    # ... but a saturated engine is the engine's problem, whatever the client's lag.
    assert diagnose(result(0.8), [TTFT_OVER], UNLOADED, None, ["dispatch lag"]).verdict.startswith(
        "engine saturated"
    )


def test_a_limit_below_one_request_alone_cannot_pass_at_any_load() -> None:
    tight = ConstraintCheck(name="ttft", observed_ms=450, limit_ms=300, percentile=0.9, margin=1.5)
    d = diagnose(result(0.9), [tight], UNLOADED, None, [])
    assert d.verdict.startswith(
        "latency limit below the engine's unloaded TTFT: one request alone took 400 ms"
    )
    assert d.next_step.startswith("raise ttft_latency in user.conf")


def test_a_slow_decode_without_queueing_names_the_batch() -> None:
    tpot = ConstraintCheck(name="tpot", observed_ms=300, limit_ms=200, percentile=0.9, margin=1.5)
    d = diagnose(result(0.02), [tpot], UNLOADED, None, [])
    assert d.verdict.startswith("TPOT over the limit with little queueing: decoding is too slow")
    assert "--max-num-seqs" in d.next_step


def test_invalid_with_every_limit_met_points_at_early_stopping() -> None:
    met = ConstraintCheck(name="ttft", observed_ms=9_000, limit_ms=10_000, percentile=0.9, margin=0.9)
    d = diagnose(result(None, reason="early stopping not met"), [met], UNLOADED, None, [])
    assert d.verdict == "INVALID without a latency limit failing: early stopping not met"
    assert "min_duration" in d.next_step


def test_an_offline_run_still_too_short_after_its_reruns_shows_the_rising_rates() -> None:
    from harness_fixtures.loadgen.mllog import MIN_DURATION_NOT_MET
    from harness_fixtures.results import RateChoice

    rate = RateChoice(
        setting="offline_expected_qps",
        value=3565.0,
        source="measured",
        reason="attempt 3",
        attempts=3,
        earlier_attempts=[{"samples_per_s": 1206.0}, {"samples_per_s": 2852.0}],
    )
    r = result(
        None,
        scenario="Offline",
        loadgen_model="tiny",
        samples_per_s=4100.0,
        invalid_constraints=[MIN_DURATION_NOT_MET],
        rate=rate,
    )
    d = diagnose(r, [], UNLOADED, None, [])
    assert d.verdict == (
        "Offline ended before min_duration in 3 attempt(s), measuring 1206 → 2852 → 4100 samples/s: "
        "the engine's throughput grows with the samples it is given"
    )
    assert d.next_step.startswith("set tiny.Offline.target_qps >= 8200 (twice the last rate measured)")
    # A rate that did not rise is not called growth.
    flat = r.model_copy(
        update={"rate": rate.model_copy(update={"earlier_attempts": [{"samples_per_s": 5000.0}]})}
    )
    assert diagnose(flat, [], UNLOADED, None, []).verdict.endswith("measuring 5000 → 4100 samples/s")
