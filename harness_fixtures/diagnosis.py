"""Why a run was INVALID, from what the run already collected: one verdict line and the next step.

The evidence is the run's own: LoadGen's percentiles against its limits, the engine's queue and
KV cache over LoadGen's measured window, its TTFT split into queue time and prefill time (the engine's
histogram deltas), the client's dispatch lag and CPU, achieved against scheduled QPS, and how fast the
engine answered the warm-up request alone. The rules, in order:

1. the client set the pace (the client-bound gate fired) while the engine's queue stayed mostly
   empty → a client problem, not the engine's;
2. one request alone already exceeds a limit → no load can pass: the limit is below the engine's
   unloaded latency;
3. requests waited in the engine's queue for a noticeable share of the window → the engine is
   saturated at this load (whatever the client's own lag): a lower target, or the capacity search;
4. otherwise the latency limit failed without queueing → the engine is too slow at this batch;
5. an Offline run still too short after its reruns at the measured rate → the engine's throughput
   grows with the samples it is given faster than the reruns raised the count: the rates measured
   per attempt, and an expected QPS or query count that issues enough samples.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from .loadgen.mllog import MIN_DURATION_NOT_MET, failed_checks
from .results import BenchmarkResult, ConstraintCheck, Diagnosis

SATURATED_WAITING_SHARE = 0.1  # requests waiting in the engine queue in >= 10 % of the window's samples
SUGGESTED_SHARE = 0.8  # suggest 80 % of the lowest bound on what the engine sustains (see _suggest)


def diagnose(
    result: BenchmarkResult,
    checks: list[ConstraintCheck],
    warmup: dict[str, Any],
    offline_samples_per_s: float | None,
    client_bound: list[str],
) -> Diagnosis:
    """The diagnosis of an INVALID performance run (``checks``: its latency limits and observations)."""
    engine = result.engine
    hist = engine.histograms if engine is not None else {}
    c = result.client
    evidence: dict[str, Any] = {
        "engine_waiting_share": engine.waiting_share if engine else None,
        "kv_cache_peak": engine.kv_cache_peak if engine else None,
        "preemptions": engine.preemptions if engine else None,
        "engine_ttft_mean_ms": _ms(hist["ttft"].mean) if "ttft" in hist else None,
        "engine_queue_mean_ms": _ms(hist["queue"].mean) if "queue" in hist else None,
        "engine_prefill_mean_ms": _ms(hist["prefill"].mean) if "prefill" in hist else None,
        "scheduled_qps": c.scheduled_qps,
        "achieved_qps": c.achieved_qps,
        "dispatch_lag_ms_p99": c.dispatch_lag_ms_p99,
        "client_cpu_bound_fraction": c.cpu_bound_fraction,
        "unloaded_ttft_ms": _ms(warmup.get("ttft_s")),
        "unloaded_tpot_ms": _ms(warmup.get("tpot_s")),
        "offline_samples_per_s": offline_samples_per_s,
    }
    evidence = {k: v for k, v in evidence.items() if v is not None}
    failed = [x for x in checks if x.margin is not None and x.margin > 1.0]
    what = "; ".join(
        f"{x.name.upper()} p{x.percentile * 100:g} {x.observed_ms:.0f} ms > limit {x.limit_ms:.0f} ms "
        f"({x.margin:.2f}×)"
        for x in failed
        if x.observed_ms is not None and x.margin is not None
    )
    target = c.target_qps or c.scheduled_qps

    share = evidence.get("engine_waiting_share")
    saturated = share is not None and share >= SATURATED_WAITING_SHARE
    if client_bound and not saturated:
        return Diagnosis(
            verdict=f"client-bound: {client_bound[0].split(':')[0]}; the numbers measure the client",
            next_step="add client processes (--harness-client-workers N) or a quieter client machine",
            constraints=checks,
            evidence=evidence,
        )
    unloaded: dict[str, float] = {
        k: v for k in ("ttft", "tpot") if isinstance(v := evidence.get(f"unloaded_{k}_ms"), (int, float))
    }
    below = [x for x in checks if x.name in unloaded and unloaded[x.name] > x.limit_ms]
    if below:
        x = below[0]
        return Diagnosis(
            verdict=(
                f"latency limit below the engine's unloaded {x.name.upper()}: one request alone took "
                f"{unloaded[x.name]:.0f} ms, the limit is {x.limit_ms:.0f} ms at p{x.percentile * 100:g}; "
                "no load can pass"
            ),
            next_step=f"raise {x.name}_latency in user.conf or serve a faster configuration",
            constraints=checks,
            evidence=evidence,
        )
    suggest = _suggest(target, result.samples_per_s if saturated else None, offline_samples_per_s)
    if saturated:
        offline = f"; Offline measured {offline_samples_per_s:.3g} samples/s" if offline_samples_per_s else ""
        queue, ttft = evidence.get("engine_queue_mean_ms"), evidence.get("engine_ttft_mean_ms")
        split = (
            f"; the engine's mean TTFT {ttft / 1e3:.3g} s, of which {queue / 1e3:.3g} s in its queue"
            if isinstance(queue, float) and isinstance(ttft, float) and ttft > 0
            else ""
        )
        done = (
            f"; it completed {result.samples_per_s:.3g} samples/s of the {target:.3g} QPS scheduled"
            if result.samples_per_s and target
            else ""
        )
        return Diagnosis(
            verdict=(
                f"engine saturated: requests waited in the engine queue {share:.0%} of the run"
                + (f" ({what})" if what else "")
                + split
                + done
                + offline
            ),
            next_step="try --harness-find-capacity"
            + (f" or a target <= {suggest:.3g} QPS" if suggest else ""),
            constraints=checks,
            evidence=evidence,
        )
    if failed:
        slow = "decoding" if failed[0].name == "tpot" else "prefill"
        return Diagnosis(
            verdict=(
                f"{failed[0].name.upper()} over the limit with little queueing: {slow} is too slow at this "
                f"load ({what})"
            ),
            next_step=(
                "lower the load"
                + (f" (a target <= {suggest:.3g} QPS)" if suggest else "")
                + ", a smaller batch (e.g. vLLM's --max-num-seqs), or raise the limit"
            ),
            constraints=checks,
            evidence=evidence,
        )
    if result.scenario == "Offline" and failed_checks(result.invalid_constraints) == [MIN_DURATION_NOT_MET]:
        return _offline_too_short(result, checks, evidence)
    return Diagnosis(
        verdict="INVALID without a latency limit failing: " + (result.reason or "LoadGen gave no reason"),
        next_step="run more queries or a longer min_duration so LoadGen's early stopping can be satisfied",
        constraints=checks,
        evidence=evidence,
    )


def _offline_too_short(
    result: BenchmarkResult, checks: list[ConstraintCheck], evidence: dict[str, Any]
) -> Diagnosis:
    """Offline ended before min_duration: the rate each attempt measured, and what issues enough."""
    earlier = result.rate.earlier_attempts if result.rate is not None else []
    rates = [float(a["samples_per_s"]) for a in earlier if isinstance(a.get("samples_per_s"), (int, float))]
    if result.samples_per_s is not None:
        rates.append(result.samples_per_s)
    measured = " → ".join(f"{r:.4g}" for r in rates)
    rising = len(rates) > 1 and all(b > a for a, b in pairwise(rates))
    verdict = (
        f"Offline ended before min_duration in {len(rates)} attempt(s), measuring {measured} samples/s"
        if rates
        else "Offline ended before min_duration"
    )
    if rising:
        verdict += ": the engine's throughput grows with the samples it is given"
    model = result.loadgen_model
    step = (
        f"set {model}.Offline.target_qps >= {2 * rates[-1]:.4g} (twice the last rate measured) or a "
        f"{model}.Offline.min_query_count that issues more samples, in user.conf"
        if rates
        else f"set {model}.Offline.target_qps or min_query_count in user.conf so more samples are issued"
    )
    return Diagnosis(verdict=verdict, next_step=step, constraints=checks, evidence=evidence)


def _ms(seconds: Any) -> float | None:
    return round(float(seconds) * 1e3, 3) if isinstance(seconds, (int, float)) else None


def _suggest(target: float | None, completed: float | None, offline: float | None) -> float | None:
    """A share of the lowest of: the load that failed, what a saturated engine completed per second
    (its throughput at this load: nothing above it can be sustained) and the Offline throughput."""
    bounds = [x for x in (target, completed, offline) if x]
    return SUGGESTED_SHARE * min(bounds) if bounds else None
