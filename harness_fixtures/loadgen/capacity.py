"""Capacity search: the highest Server/Interactive load whose latencies stay within LoadGen's limits.

Each probe is a short LoadGen PerformanceOnly run (the same child process and client as a test)
judged by LoadGen's latency constraints at the percentile its early stopping will demand of the
full-length run at that load (:func:`early_stopping_percentile`: stricter than the scenario's
percentile, e.g. p93 for a 500-query p90 run), so that a load that passes as a probe passes as a full
run, and with the latency's climb over the probe projected to the full run's length
(:func:`probe_margins`). Besides the verdict a probe yields a *margin* per constraint, that percentile
/ limit (1.0 = exactly at the limit), and the search works on those margins rather than on pass/fail
alone:

1. bracket: the first probe at half the upper bound (the measured Offline throughput: a Server run
   cannot complete more than the system does with no latency limit), then steps up or down scaled
   by how far the margin is from 1, growing geometrically while probes keep landing on one side (a
   flat margin says little about the distance to the limit);
2. refine: fit the reciprocal margins (limit / observed) as a monotone (isotonic, pool-adjacent-
   violators) function of load and probe where the fit crosses 1, kept a quarter of the bracket
   away from either end (:data:`EDGE`) so every probe shrinks it; when an interpolated probe shrank
   the bracket by less than half, the next one bisects; stop at the relative precision asked for;
3. noise: a load whose verdict its neighbours contradict is probed once more, only when the
   neighbours' prediction is surer than the probe's own margin and than the precision asked for; a
   load probed twice passes by majority, a tie by its mean margin.

4. confirm: a full-length run at the load found. A short probe starts with an empty queue and
   rarely sees the congestion episodes a full run at the same load contains, so near the limit it
   is optimistic; a full run that is INVALID is evidence, not only a verdict. The next full run's
   load comes from it (:func:`step_down`): from its margin and the probes' slope after the first,
   from the line through the two full runs after the second, each aiming a little below the limit.

LoadGen's own FindPeakPerformance mode doubles the load until a full-length run fails and then
bisects to an absolute 0.1 QPS, with no second look at a noisy verdict; tools/bench_capacity.py
compares the two.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from ..client.requestlog import tpot_ms, ttft_ms
from ..results import CapacityProbe, CapacityResult, ConstraintCheck
from ..stats import percentile
from .mllog import LoadGenRun

# LoadGen logs these latency percentiles; other target percentiles are computed from the request log
# with LoadGen's definition (harness_fixtures.stats).
_LOGGED = {50.0: "50.00", 90.0: "90.00", 95.0: "95.00", 97.0: "97.00", 99.0: "99.00", 99.9: "99.90"}
START_FRACTION = 0.5  # the first probe, as a share of the upper bound
MIN_STEP, MAX_STEP = 1.1, 2.0  # how far one bracketing step may move the load (×, ÷)
GIVE_UP_FRACTION = 1 / 64  # failing below this share of the upper bound: no load passes
NEAR_LIMIT = 0.2  # |log margin| below this: a verdict noise could have flipped
EDGE = 0.25  # an interpolated probe stays this share of the bracket away from either end
# A full run's reciprocal margin falls with load less steeply than the probes' near the limit (their
# curve is a cliff where a full run's is a slope: tools/bench_capacity.py measured relative slopes of
# 2.4, 4.0 and 6.0 between full runs where the probes showed 2.4, 8 and 17). The first step down uses
# the probes' slope bounded to the range full runs showed.
STEP_SLOPE = (2.0, 6.0)
MAX_CONFIRMATIONS = 3  # full-length runs after a search: at the load found and up to two steps down


@dataclass(frozen=True)
class Limits:
    """The scenario's latency limits (ms) and the percentile (0–1) LoadGen checks them at."""

    ttft_ms: float | None
    tpot_ms: float | None
    percentile: float


def limits_of(run: LoadGenRun) -> Limits | None:
    """A run's latency limits, as LoadGen applied them; None unless it was a token-latency Server run."""
    limits, pct = run.latency_limits()
    if not limits or pct is None:
        return None
    return Limits(limits.get("ttft"), limits.get("tpot"), pct)


def constraint_checks(
    run: LoadGenRun, requests: Sequence[dict[str, Any]], limits: Limits
) -> list[ConstraintCheck]:
    """Each latency limit with what the run observed at the scenario's percentile: LoadGen's value
    when LoadGen logs that percentile, else the request log's with LoadGen's definition."""
    q = limits.percentile * 100
    key = _LOGGED.get(round(q, 1))
    if key is not None:
        ttft = _ns_ms(run.values.get(f"result_first_token_{key}_percentile_latency_ns"))
        tpot = _ns_ms(run.values.get(f"result_time_per_output_token_{key}_percentile_ns"))
    else:
        ttft = percentile((v for r in requests if (v := ttft_ms(r)) is not None), q)
        tpot = percentile((v for r in requests if (v := tpot_ms(r)) is not None), q)
    out = []
    pairs: tuple[tuple[Literal["ttft", "tpot"], float | None, float | None], ...] = (
        ("ttft", ttft, limits.ttft_ms),
        ("tpot", tpot, limits.tpot_ms),
    )
    for name, observed, limit in pairs:
        if limit:
            margin = None if observed is None else round(observed / limit, 4)
            out.append(
                ConstraintCheck(
                    name=name,
                    observed_ms=observed,
                    limit_ms=limit,
                    percentile=limits.percentile,
                    margin=margin,
                )
            )
    return out


def early_stopping_percentile(n_queries: int, percentile: float, confidence: float = 0.99) -> float | None:
    """The percentile (0–1) a run of ``n_queries`` must meet for LoadGen's early stopping to pass.

    LoadGen accepts a Server run only if, with t of its n queries over the latency limit, t or fewer
    would happen with probability ≤ 1 − confidence were the true percentile exactly at the limit
    (binomial with a per-query overlatency chance 1 − percentile; loadgen/early_stopping.cc, tolerance
    0, confidence 0.99). The largest such t makes the (n − t)-th latency the one that must stay within
    the limit: at 500 queries and p90 that is the 93.2th percentile, at 24,576 the 90.4th. A probe is
    judged at this stricter percentile so that a load it passes also passes the full-length run.
    None when no count of overlatency queries passes (too few queries).
    """
    q = 1.0 - percentile
    if n_queries <= 0 or not 0.0 < q < 1.0:
        return None
    log_pmf = n_queries * math.log(percentile)  # P(0 of n over the limit)
    step = math.log(q / percentile)
    cdf = 0.0
    t = 0
    while t <= n_queries:
        cdf += math.exp(log_pmf)
        if cdf > 1.0 - confidence:
            break
        log_pmf += math.log((n_queries - t) / (t + 1)) + step  # pmf(t + 1) / pmf(t)
        t += 1
    allowed = t - 1  # the most overlatency queries that still pass
    if allowed < 0:
        return None
    return (n_queries - allowed - 1) / n_queries  # LoadGen's index floor(n·q) lands on the (n − t)-th


def probe_margins(
    requests: Sequence[dict[str, Any]],
    limits: Limits,
    at_percentile: float,
    full_s: float | None = None,
) -> dict[str, float | None]:
    """Each limited latency's value at ``at_percentile`` (0–1) / its limit, from the request log
    (LoadGen's percentile definition), projected to a run of ``full_s`` seconds.

    A short probe at a load the system cannot sustain sees a queue that is still building: latency
    climbs through the probe, and a full-length run would see it climb for ten times as long (measured
    on the simulator: a 3 s probe passing at 1.37× the load a 40 s run can sustain). So the latency's
    drift over the probe, the Theil–Sen slope of latency against issue time (robust to the tail), is
    carried forward: a run whose latencies rise linearly by ``s`` per second has its ``p``-th percentile
    ``p · s · Δt`` higher when it lasts ``Δt`` longer. A falling or flat latency adds nothing.
    """
    out: dict[str, float | None] = {}
    for name, read, limit in (("ttft", ttft_ms, limits.ttft_ms), ("tpot", tpot_ms, limits.tpot_ms)):
        if not limit:
            continue
        points = [(float(r["issued_s"]), v) for r in requests if (v := read(r)) is not None]
        observed = percentile((v for _, v in points), at_percentile * 100)
        if observed is None:
            out[name] = None
            continue
        if full_s is not None and len(points) >= 10:
            times = [t for t, _ in points]
            span = max(times) - min(times)
            observed += at_percentile * max(0.0, drift(points)) * max(0.0, full_s - span)
        out[name] = round(observed / limit, 4)
    return out


def drift(points: Sequence[tuple[float, float]], most: int = 400) -> float:
    """The Theil–Sen slope of (time, value) points: the median of the pairwise slopes (0 for < 2
    distinct times), over at most ``most`` points evenly taken in time order."""
    pts = sorted(points)
    if len(pts) > most:
        pts = [pts[round(i * (len(pts) - 1) / (most - 1))] for i in range(most)]
    t = np.array([p[0] for p in pts])
    v = np.array([p[1] for p in pts])
    i, j = np.triu_indices(len(pts), k=1)
    dt = t[j] - t[i]
    keep = dt > 0
    if not keep.any():
        return 0.0
    return float(np.median((v[j] - v[i])[keep] / dt[keep]))


def _ns_ms(v: Any) -> float | None:
    return float(v) / 1e6 if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def margin_of(p: CapacityProbe) -> float:
    """The binding margin of a probe: the larger of its constraints' (inf when nothing was measured)."""
    ms = [m for m in (p.ttft_margin, p.tpot_margin) if m is not None]
    return max(ms) if ms else math.inf


def isotonic(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pool-adjacent-violators: the non-decreasing fit of (x, y) points sorted by x (equal x pooled)."""
    blocks: list[list[float]] = []  # [x_weighted_sum, y_sum, weight, x_min]
    for x, y in sorted(points):
        blocks.append([x, y, 1.0, x])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] > blocks[-1][1] / blocks[-1][2]:
            a, b = blocks[-2], blocks.pop()
            a[0] += b[0]
            a[1] += b[1]
            a[2] += b[2]
    return [(b[0] / b[2], b[1] / b[2]) for b in blocks]


@dataclass
class CapacitySearch:
    """The search over loads; ``probe(qps)`` runs one probe and returns it.

    :param upper_qps: no Server load above this can pass (the measured Offline samples/s).
    :param precision: stop when (fail − pass) / fail is at or below this (0.05 = 5 %).
    :param max_probes: stop after this many probes whatever the precision reached.
    """

    probe: Callable[[float], CapacityProbe]
    upper_qps: float
    precision: float = 0.05
    max_probes: int = 8
    probes: list[CapacityProbe] = field(default_factory=list)
    _last_ratio: float | None = None  # fail / ok of the bracket when the last refining probe was chosen

    def run(self) -> CapacityResult:
        next_qps: float | None = self.upper_qps * START_FRACTION
        reason = ""
        while next_qps is not None and len(self.probes) < self.max_probes:
            self.probes.append(self.probe(round(next_qps, 6)))
            next_qps, reason = self._next()
        return self._result(reason or f"stopped after {len(self.probes)} probes")

    # -- the state of the search -------------------------------------------------------------------
    def _by_load(self) -> list[tuple[float, bool, float]]:
        """(qps, passed, mean binding margin) per probed load, ascending. A load probed more than once
        passes by majority, a tie by its mean margin."""
        loads: dict[float, list[CapacityProbe]] = {}
        for p in self.probes:
            loads.setdefault(p.qps, []).append(p)
        out = []
        for qps, ps in sorted(loads.items()):
            finite = [m for p in ps if math.isfinite(m := margin_of(p))]
            mean = sum(finite) / len(finite) if finite else math.inf
            votes = sum(1 if p.verdict == "pass" else -1 for p in ps)
            out.append((qps, votes > 0 or (votes == 0 and mean <= 1.0), mean))
        return out

    def _bracket(self) -> tuple[float | None, float | None]:
        """(highest passing load below the lowest failing one, lowest failing load)."""
        loads = self._by_load()
        fail = min((q for q, ok, _ in loads if not ok), default=None)
        ok = max((q for q, good, _ in loads if good and (fail is None or q < fail)), default=None)
        return ok, fail

    def _doubtful(self) -> float | None:
        """A load probed once whose verdict its neighbours contradict: a pass above a failure, or a
        verdict near the limit (margin within ±20 %) opposite to what the loads on either side predict
        for it, and predict more surely than the probe's own margin. A verdict far from the limit is
        not noise."""
        loads = self._by_load()
        once = {q for q in {p.qps for p in self.probes} if sum(1 for p in self.probes if p.qps == q) == 1}
        for i, (q, ok, m) in enumerate(loads):
            if q not in once:
                continue
            if ok and any(not ok_b for qb, ok_b, _ in loads[:i]):
                return q
            if 0 < i < len(loads) - 1 and abs(math.log(max(m, 1e-9))) < NEAR_LIMIT:
                (qa, _, ma), (qb, _, mb) = loads[i - 1], loads[i + 1]
                ya, yb = 1 / ma, 1 / mb  # reciprocal margins: about linear in load (see _interpolate)
                predicted = ya + (yb - ya) * (q - qa) / (qb - qa)
                # Only when the neighbours are surer than the probe itself (and than the precision asked):
                # a verdict a hair off a straight line through them is the curve's shape, not noise.
                sure = abs(math.log(max(predicted, 1e-9))) > max(abs(math.log(max(m, 1e-9))), self.precision)
                if (predicted >= 1.0) != ok and sure:
                    return q
        return None

    def _next(self) -> tuple[float | None, str]:
        doubtful = self._doubtful()
        if doubtful is not None:
            return doubtful, ""
        loads = self._by_load()
        ok, fail = self._bracket()
        if ok is not None and fail is not None:
            if (fail - ok) / fail <= self.precision:
                return (
                    None,
                    f"bracketed within {100 * (fail - ok) / fail:.1f} % (asked: {100 * self.precision:g} %)",
                )
            ratio, last = fail / ok, self._last_ratio
            self._last_ratio = ratio
            if last is not None and math.log(ratio) > 0.5 * math.log(last):
                # The last interpolation shrank the bracket by less than half (a fit that crosses 1 near
                # one end, as with a kinked curve): bisect, so the bracket at least halves every 2 probes.
                return math.sqrt(ok * fail), ""
            return self._interpolate(ok, fail), ""
        if fail is None:
            assert ok is not None
            if ok >= self.upper_qps:
                return None, "passed at the upper bound (the measured Offline throughput)"
            m = next(m for q, _, m in loads if q == ok)
            step = min(MAX_STEP, max(MIN_STEP, 1 / m if m > 0 else MAX_STEP, self._last_step()))
            return min(self.upper_qps, ok * step), ""
        if fail <= self.upper_qps * GIVE_UP_FRACTION:
            return None, "no load passes: the latency limit is below what the engine does unloaded"
        m = next(m for q, _, m in loads if q == fail)
        step = min(MAX_STEP * 2, max(MIN_STEP, m if math.isfinite(m) else MAX_STEP * 2, self._last_step()))
        return fail / step, ""

    def _last_step(self) -> float:
        """The next step's floor: the last bracketing step squared (1 before the second probe). While
        every probe lands on the same side the steps grow geometrically (a galloping search): a margin
        that barely moves with load (latency dominated by a fixed part, such as one batch's prefill)
        would otherwise creep at 10 % a probe."""
        if len(self.probes) < 2:
            return 1.0
        a, b = self.probes[-2].qps, self.probes[-1].qps
        return (max(a, b) / min(a, b)) ** 2

    def _interpolate(self, ok: float, fail: float) -> float:
        """Next to where the fitted margin crosses 1: just above it after a pass, just below after a
        failure, so the next probe closes the bracket from the side that has not moved. The fit is
        isotonic on the reciprocal margin (limit / observed), which falls about linearly with load
        for a queueing server (latency ∝ 1 / (1 − load / saturation)), so its linear interpolation
        lands near the crossing where the margin itself, convex in load, would undershoot. Kept in
        the bracket's inner 80 % so every probe shrinks it."""
        # isotonic() fits non-decreasing: fit −1/margin (0 for a margin too large to measure).
        fit = [(x, -y) for x, y in isotonic([(q, -1 / m) for q, _, m in self._by_load()])]
        root = (ok + fail) / 2
        for (x0, y0), (x1, y1) in itertools.pairwise(fit):
            if y0 >= 1.0 > y1 and x1 > x0:
                root = x0 + (y0 - 1.0) * (x1 - x0) / (y0 - y1)
                break
        last_passed = self.probes[-1].verdict == "pass"
        guess = root * (1 + self.precision / 2) if last_passed else root * (1 - self.precision / 2)
        lo, hi = ok + EDGE * (fail - ok), fail - EDGE * (fail - ok)
        return min(hi, max(lo, guess))

    def _result(self, reason: str) -> CapacityResult:
        ok, fail = self._bracket()
        binding = None
        decisive = [p for p in self.probes if fail is not None and p.qps == fail] or [
            p for p in self.probes if ok is not None and p.qps == ok
        ]
        if decisive:
            p = max(decisive, key=margin_of)
            pairs = [("ttft", p.ttft_margin), ("tpot", p.tpot_margin)]
            named = [(m, name) for name, m in pairs if m is not None]
            binding = max(named)[1] if named else None
        achieved = (fail - ok) / fail if ok is not None and fail is not None else None
        return CapacityResult(
            found_qps=ok,
            binding_constraint=binding,
            precision=None if achieved is None else round(achieved, 4),
            target_precision=self.precision,
            upper_bound_qps=self.upper_qps,
            lowest_failing_qps=fail,
            probes=list(self.probes),
            stopped_because=reason,
        )


def step_down(
    full_runs: Sequence[tuple[float, float]], probes: Sequence[CapacityProbe], precision: float
) -> tuple[float, str]:
    """The load of the next full-length run after INVALID ones, and how it was chosen.

    :param full_runs: (load, binding margin) of each full run so far, all INVALID.
    :param probes: the search's probes, for the slope when there is one full run.
    :param precision: the search's relative precision: the aim is (1 + precision / 2) in reciprocal
        margin after one full run, (1 + precision) after two (the line through two full runs
        overestimates where the curve bends), and every step goes at least one precision step below
        the lowest INVALID load (the probes could not tell loads closer than that apart) and at most
        halves it.

    The reciprocal margin y = limit / observed is about linear in load near the limit (see
    ``CapacitySearch._interpolate``). With two full runs the line through them crosses the aim; with
    one, the line through it with the probes' relative slope (q · dy/dq where their isotonic fit
    crosses 1, bounded to :data:`STEP_SLOPE`).
    """
    runs = sorted((q, 1 / m) for q, m in full_runs if m > 0 and math.isfinite(m))
    if not runs:
        lowest = min(q for q, _ in full_runs)
        return lowest * (1 - 2 * precision), "no margin measured: 2 × the precision lower"
    q0, y0 = runs[0]
    how = ""
    guess = None
    if len(runs) >= 2:
        q1, y1 = runs[1]
        aim = 1 + precision
        if y0 > y1 and q1 > q0:
            slope = (y0 - y1) / (q1 - q0)
            guess = q0 - (aim - y0) / slope
            how = (
                f"the line through the full runs at {q0:.4g} and {q1:.4g} QPS (margins {1 / y0:.3g}, "
                f"{1 / y1:.3g}) reaches {1 / aim:.3g} of the limit there"
            )
    if guess is None:
        aim = 1 + precision / 2
        rel = probe_slope(probes)
        lo, hi = STEP_SLOPE
        rel = lo if rel is None else min(hi, max(lo, rel))
        guess = q0 * (1 - (aim - y0) / rel)
        how = (
            f"the full run at {q0:.4g} QPS had {1 / y0:.3g}× the limit; with the probes' slope "
            f"({rel:.2g}, bounded to {lo:g}–{hi:g}) {1 / aim:.3g} of the limit is there"
        )
    bounded = min(q0 * (1 - precision), max(q0 / 2, guess))
    if bounded != guess:
        how += f" (kept within {100 * precision:g} %–50 % below {q0:.4g} QPS)"
    return round(bounded, 6), how


def probe_slope(probes: Sequence[CapacityProbe]) -> float | None:
    """The probes' relative slope of the reciprocal margin, −q · dy/dq, where their isotonic fit
    crosses 1 (None: it does not)."""
    points = [(p.qps, -1 / m) for p in probes if math.isfinite(m := margin_of(p)) and m > 0]
    fit = [(x, -y) for x, y in isotonic(points)]
    for (x0, y0), (x1, y1) in itertools.pairwise(fit):
        if y0 >= 1.0 > y1 and x1 > x0:
            return (y0 - y1) / (x1 - x0) * (x0 + x1) / 2
    return None


def store_key(
    model: str, scenario: str, loadgen_model: str, engine: str, hardware: str, limits: Limits
) -> str:
    """What a stored capacity is valid for: the model, the engine (kind, version, arguments), the
    hardware and the latency limits it was found under."""
    return " | ".join(
        (
            f"{model}/{scenario} ({loadgen_model})",
            engine,
            hardware,
            f"TTFT {limits.ttft_ms:g} ms, TPOT {limits.tpot_ms:g} ms at p{limits.percentile * 100:g}",
        )
    )


def load_store(path: Path) -> dict[str, dict[str, Any]]:
    """The stored capacities (``<output dir>/capacity.yaml``); {} when there are none or it is unreadable."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def save_capacity(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Remember the capacity found for ``key`` (the latest wins); written atomically."""
    from ..results import write_yaml

    data = load_store(path)
    data[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    write_yaml(path, data)
