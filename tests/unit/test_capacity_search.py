"""The capacity search (harness_fixtures.loadgen.capacity) against synthetic latency curves: it brackets,
refines on the margins, looks twice at contradicting verdicts and names the binding limit."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness_fixtures.loadgen.capacity import (
    STEP_SLOPE,
    CapacitySearch,
    Limits,
    drift,
    early_stopping_percentile,
    isotonic,
    probe_margins,
    probe_slope,
    step_down,
)
from harness_fixtures.results import CapacityProbe

Curve = Callable[[float], float]


def queue_curve(capacity: float, unloaded: float = 0.3) -> Curve:
    """Latency / limit of an M/M/1-like server: ``unloaded`` at no load, 1.0 at ``capacity``."""
    diverges = capacity / (1 - unloaded)  # the load at which latency grows without bound

    def margin(q: float) -> float:
        rho = q / diverges
        return unloaded / (1 - rho) if rho < 1 else math.inf

    return margin


def probe_for(
    ttft: Curve, tpot: Curve | None = None, noise: float = 0.0, seed: int = 0
) -> Callable[[float], CapacityProbe]:
    rng = random.Random(seed)

    def probe(qps: float) -> CapacityProbe:
        a = ttft(qps) * (rng.lognormvariate(0, noise) if noise else 1.0)
        b = None if tpot is None else tpot(qps) * (rng.lognormvariate(0, noise) if noise else 1.0)
        ok = a <= 1.0 and (b is None or b <= 1.0)
        return CapacityProbe(
            qps=qps, ttft_margin=a, tpot_margin=b, verdict="pass" if ok else "fail", duration_s=1.0
        )

    return probe


def crossing(curve: Curve, upper: float) -> float:
    """The load where ``curve`` reaches 1, by bisection (the truth the search must find)."""
    lo, hi = 0.0, upper
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if curve(mid) <= 1 else (lo, mid)
    return lo


@pytest.mark.parametrize("capacity", [3.0, 17.0, 40.0, 250.0])
@pytest.mark.parametrize("upper_factor", [1.2, 2.5, 6.0])
def test_finds_the_boundary_within_precision_in_few_probes(capacity: float, upper_factor: float) -> None:
    curve = queue_curve(capacity)
    upper = capacity * upper_factor
    truth = crossing(curve, upper)
    result = CapacitySearch(probe_for(curve), upper_qps=upper, precision=0.05, max_probes=8).run()
    assert result.found_qps is not None
    assert truth * 0.95 <= result.found_qps <= truth, (result.found_qps, truth, result.probes)
    assert len(result.probes) <= 8
    assert result.precision is not None and result.precision <= 0.05
    assert result.binding_constraint == "ttft"


@pytest.mark.parametrize("capacity_share", [0.15, 0.25, 0.9])
def test_a_margin_that_barely_moves_with_load_is_bracketed_without_creeping(capacity_share: float) -> None:
    # Latency mostly fixed (a limit just above the unloaded latency): the margin is 0.9 at no load and
    # only 1.45 at the upper bound, so margin-sized steps alone would move 10 % at a time.
    upper = 28.0
    capacity = capacity_share * upper

    def curve(q: float) -> float:
        return 0.9 + 0.1 * q / capacity if q <= capacity else 1.0 + 0.45 * (q - capacity) / (upper - capacity)

    truth = crossing(curve, upper)
    result = CapacitySearch(probe_for(curve), upper_qps=upper, precision=0.05, max_probes=8).run()
    assert result.found_qps is not None, result.probes
    assert truth * 0.95 <= result.found_qps <= truth, (
        result.found_qps,
        truth,
        [p.qps for p in result.probes],
    )
    assert len(result.probes) <= 8


@settings(max_examples=60, deadline=None)
@given(capacity=st.floats(0.5, 2000.0), unloaded=st.floats(0.05, 0.9), upper_factor=st.floats(1.05, 20.0))
def test_the_found_load_never_fails_and_the_bracket_is_honest(
    capacity: float, unloaded: float, upper_factor: float
) -> None:
    curve = queue_curve(capacity, unloaded)
    result = CapacitySearch(probe_for(curve), upper_qps=capacity * upper_factor, max_probes=12).run()
    passed = {p.qps for p in result.probes if p.verdict == "pass"}
    failed = {p.qps for p in result.probes if p.verdict == "fail"}
    assert result.found_qps is None or result.found_qps in passed
    if result.found_qps is not None and result.lowest_failing_qps is not None:
        assert result.found_qps < result.lowest_failing_qps and result.lowest_failing_qps in failed


def test_noisy_verdicts_still_converge_and_name_the_binding_limit() -> None:
    ttft = queue_curve(20.0, unloaded=0.5)
    tpot = queue_curve(14.0, unloaded=0.6)  # TPOT reaches its limit first
    truth = crossing(lambda q: max(ttft(q), tpot(q)), 100.0)
    found = []
    for seed in range(8):
        r = CapacitySearch(probe_for(ttft, tpot, noise=0.08, seed=seed), upper_qps=40.0, max_probes=10).run()
        assert r.found_qps is not None and r.binding_constraint == "tpot", r
        found.append(r.found_qps)
    # Noise moves single verdicts; the search still lands within 10 % of the truth in most seeds.
    assert sum(abs(f / truth - 1) <= 0.10 for f in found) >= 6, (found, truth)


def test_an_unlucky_verdict_is_probed_again() -> None:
    calls: list[float] = []
    curve = queue_curve(10.0)

    def probe(qps: float) -> CapacityProbe:
        calls.append(qps)
        m = curve(qps)
        # The second probe (below capacity) comes out unlucky once: over the limit by noise.
        if len(calls) == 2:
            m = 1.05
        return CapacityProbe(qps=qps, ttft_margin=m, verdict="pass" if m <= 1 else "fail", duration_s=1)

    r = CapacitySearch(probe, upper_qps=30.0, max_probes=10).run()
    assert calls.count(calls[1]) == 2, calls  # the doubtful load was looked at twice
    truth = crossing(curve, 30.0)
    assert r.found_qps is not None and truth * 0.9 <= r.found_qps <= truth, (r.found_qps, truth, calls)


def test_no_load_passes_when_the_limit_is_below_unloaded_latency() -> None:
    r = CapacitySearch(probe_for(lambda q: 1.5 + q), upper_qps=50.0, max_probes=12).run()
    assert r.found_qps is None
    assert "no load passes" in r.stopped_because


def test_passing_at_the_upper_bound_stops_there() -> None:
    r = CapacitySearch(probe_for(lambda q: 0.2), upper_qps=50.0).run()
    assert r.found_qps == 50.0 and "upper bound" in r.stopped_because


def test_isotonic_fit_is_monotone_and_pools_violators() -> None:
    fit = isotonic([(1, 0.5), (2, 0.9), (3, 0.7), (4, 1.5)])
    assert [y for _, y in fit] == pytest.approx([0.5, 0.8, 1.5])
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(fit))


def _allowed_overlatency(n: int, p: float, confidence: float = 0.99) -> int:
    """Brute force: the most overlatency queries among n that LoadGen's early stopping accepts."""
    cdf, allowed = 0.0, -1
    for t in range(n + 1):
        cdf += math.comb(n, t) * (1 - p) ** t * p ** (n - t)
        if cdf > 1 - confidence:
            break
        allowed = t
    return allowed


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=600), st.sampled_from([0.5, 0.9, 0.95, 0.99]))
def test_early_stopping_percentile_admits_exactly_the_overlatency_loadgen_accepts(n: int, p: float) -> None:
    allowed = _allowed_overlatency(n, p)
    got = early_stopping_percentile(n, p)
    if allowed < 0:
        assert got is None  # too few queries: no run of n passes early stopping
        return
    assert got is not None and got >= p - 1 / n
    # LoadGen's percentile index floor(n·q) must land on the (n − allowed)-th latency: the run passes
    # early stopping iff that latency is within the limit.
    assert math.floor(n * got + 1e-9) == n - allowed - 1


def test_early_stopping_percentile_tends_to_the_scenario_percentile() -> None:
    # 500 queries at p90 may have 34 over the limit (p93); a long run approaches p90 from above.
    assert early_stopping_percentile(500, 0.9) == pytest.approx(0.93)
    short, long = early_stopping_percentile(1_000, 0.9), early_stopping_percentile(270_336, 0.9)
    assert short is not None and long is not None and 0.9 < long < short
    assert long < 0.902
    assert early_stopping_percentile(40, 0.9) is None  # 0.9^40 > 1 %: even 0 overlatency cannot pass


def test_probe_margins_read_the_request_log_at_the_percentile_asked() -> None:
    requests = [
        {"status": "ok", "issued_s": 0.0, "first_token_s": i / 1000, "done_s": 1.0, "n_tokens": 5}
        for i in range(1, 101)
    ]
    limits = Limits(ttft_ms=90.0, tpot_ms=None, percentile=0.9)
    at_p90 = probe_margins(requests, limits, 0.9)["ttft"]
    at_p95 = probe_margins(requests, limits, 0.95)["ttft"]
    assert at_p90 is not None and at_p95 is not None and at_p95 > at_p90
    assert at_p90 == pytest.approx(91 / 90, rel=0.02)
    assert "tpot" not in probe_margins(requests, limits, 0.9)  # no limit, no margin


def _rising(
    slope_ms_per_s: float, n: int = 100, rate: float = 20.0, seed: int = 3
) -> list[dict[str, object]]:
    """Requests issued at ``rate`` per second whose TTFT is 20 ms plus noise plus a linear climb."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = i / rate
        ttft_ms = 20 + rng.expovariate(1 / 5) + slope_ms_per_s * t
        out.append({"status": "ok", "issued_s": t, "first_token_s": t + ttft_ms / 1000, "n_tokens": 1})
    return out


@given(st.floats(min_value=-5, max_value=50), st.integers(min_value=0, max_value=1000))
@settings(max_examples=40, deadline=None)
def test_drift_recovers_a_linear_climb_through_the_noise(slope: float, seed: int) -> None:
    requests = _rising(slope, n=400, seed=seed)  # 20 s: the slope's standard error about 0.1 ms/s
    points = [
        (float(r["issued_s"]), (float(r["first_token_s"]) - float(r["issued_s"])) * 1000) for r in requests
    ]
    assert drift(points) == pytest.approx(slope, abs=1.0)


def test_a_probe_whose_latency_climbs_is_judged_at_the_full_runs_length() -> None:
    limits = Limits(ttft_ms=80.0, tpot_ms=None, percentile=0.9)
    climbing, flat, falling = _rising(10.0), _rising(0.0), _rising(-3.0)
    span = 99 / 20.0
    short = probe_margins(climbing, limits, 0.9)["ttft"]
    full = probe_margins(climbing, limits, 0.9, full_s=50.0)["ttft"]
    assert short is not None and full is not None
    # a queue still building: its p90 a full run later is 0.9 × 10 ms/s × (50 s − the probe's span) higher
    assert full * 80 - short * 80 == pytest.approx(0.9 * 10.0 * (50.0 - span), rel=0.15)
    for steady in (flat, falling):  # nothing added where latency does not climb
        assert probe_margins(steady, limits, 0.9, full_s=50.0)["ttft"] == pytest.approx(
            probe_margins(steady, limits, 0.9)["ttft"], abs=0.02
        )
    assert probe_margins(climbing, limits, 0.9, full_s=1.0) == probe_margins(climbing, limits, 0.9)


# -- after an INVALID full-length run ---------------------------------------------------------------
def _probes(points: list[tuple[float, float]]) -> list[CapacityProbe]:
    return [
        CapacityProbe(qps=q, ttft_margin=m, verdict="pass" if m <= 1 else "fail", duration_s=1)
        for q, m in points
    ]


# The probes of a 2-slot simulator on the project machine (tools/bench_capacity.py): a relative slope of
# 5.7 where their fit crosses 1.
PROBES_2_SLOTS = _probes(
    [(19.72, 0.56), (24.77, 0.79), (27.76, 0.87), (30.27, 0.965), (31.11, 1.14), (35.11, 1.26)]
)


def test_probe_slope_is_the_relative_slope_where_the_fit_crosses_one() -> None:
    slope = probe_slope(PROBES_2_SLOTS)
    assert slope is not None
    y0, y1 = 1 / 0.965, 1 / 1.14
    assert slope == pytest.approx((y0 - y1) / (31.11 - 30.27) * (30.27 + 31.11) / 2)
    assert probe_slope(_probes([(10, 0.5), (20, 0.8)])) is None  # never crosses: no slope


def test_one_invalid_full_run_steps_down_by_its_margin_and_the_bounded_probe_slope() -> None:
    lo, hi = STEP_SLOPE
    qps, how = step_down([(30.27, 2.02)], PROBES_2_SLOTS, 0.05)
    aim = 1 + 0.05 / 2
    rel = min(hi, max(lo, probe_slope(PROBES_2_SLOTS) or lo))
    assert qps == pytest.approx(30.27 * (1 - (aim - 1 / 2.02) / rel), rel=1e-5)
    assert "2.02× the limit" in how and f"bounded to {lo:g}–{hi:g}" in how
    # a cliff in the probes (a huge slope) is bounded: the step is the one of the largest slope allowed
    cliff = _probes([(100.0, 0.5), (140.0, 0.9), (141.0, 1.5)])
    assert step_down([(140.0, 1.5)], cliff, 0.05)[0] == pytest.approx(
        140 * (1 - (aim - 1 / 1.5) / hi), rel=1e-5
    )
    # just over the limit: a small step, but at least one precision step
    qps, how = step_down([(100.0, 1.001)], PROBES_2_SLOTS, 0.05)
    assert qps == pytest.approx(100 * (1 - 0.05)) and "kept within 5 %" in how
    # far over, and no probe slope (the low end of the range, the largest step): at most half
    assert step_down([(100.0, 50.0)], [], 0.05)[0] == pytest.approx(50.0)


def test_two_invalid_full_runs_step_down_along_their_line() -> None:
    # margins 2.02 at 30.27 and 1.21 at 26.26 QPS: the line crosses 1 / 1.05 (aim 1 + 5 %) at ...
    qps, how = step_down([(30.27, 2.02), (26.26, 1.21)], PROBES_2_SLOTS, 0.05)
    y0, y1 = 1 / 1.21, 1 / 2.02
    expected = 26.26 - (1.05 - y0) / ((y0 - y1) / (30.27 - 26.26))
    assert qps == pytest.approx(expected, rel=1e-5) and qps < 26.26
    assert how.startswith("the line through the full runs at 26.26 and 30.27 QPS")
    # a second run no better than the first (noise): the line is useless, the probes' slope decides
    noisy, how = step_down([(30.0, 1.5), (28.0, 1.6)], PROBES_2_SLOTS, 0.05)
    assert noisy < 28.0 and "probes' slope" in how


@given(
    runs=st.lists(
        st.tuples(st.floats(1, 1000), st.floats(1.0001, 100)),
        min_size=1,
        max_size=3,
        unique_by=lambda r: r[0],
    ),
    precision=st.floats(0.01, 0.2),
)
@settings(max_examples=200, deadline=None)
def test_a_step_down_goes_a_precision_step_below_the_lowest_invalid_run_and_at_most_halves_it(
    runs: list[tuple[float, float]], precision: float
) -> None:
    qps, _ = step_down(runs, PROBES_2_SLOTS, precision)
    lowest = min(q for q, _ in runs)
    assert lowest / 2 - 1e-6 <= qps <= lowest * (1 - precision) + 1e-6
