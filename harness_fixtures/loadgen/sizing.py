"""Load sizing: the rate LoadGen runs each test at, from the user's settings or from a measurement.

LoadGen's rate settings describe the system under test, and a number tuned on one machine is wrong
on the next (the same vLLM-CPU demo ran 42–90 output tok/s across 2-core boxes). Unless the user set
a rate on the command line or in user.conf, the harness derives it from what this machine measured:

- Server / Interactive ``target_qps`` = ``load.server_fraction`` × the model's Offline samples/s,
  measured by the same session's Offline test, or by a short Offline probe when it did not run.
- SingleStream expected latency = the warm-up request's latency, measured in the runner just before
  LoadGen starts. LoadGen pre-generates queries for twice the expected rate and stops once
  ``min_duration`` and ``min_query_count`` are met, so a system up to 2× faster still completes.
- Offline expected QPS only decides how many samples LoadGen issues (``1.1 × min_duration ×
  expected``); a system faster than that finishes early and the run is INVALID for "min duration
  not met" alone. Such a run is repeated at the measured rate × ``OFFLINE_RERUN_MARGIN`` (the
  user's value too: it is a sizing hint, not a target), at most ``MAX_OFFLINE_ATTEMPTS`` runs in
  all; every attempt's files are kept and the result says what was used and why.
"""

from __future__ import annotations

from typing import Any

from ..results import BenchmarkResult, RateChoice, RateSetting
from .mllog import MIN_DURATION_NOT_MET, failed_checks
from .userconf import ConfEntry, lookup

# Offline samples/s grows with the batch the engine sees; a rerun issues more samples than the run
# that measured the rate, so it needs headroom to still outlast min_duration.
OFFLINE_RERUN_MARGIN = 1.25
# A short first run measures a small batch, below what the engine reaches with more samples; one more
# rerun covers that. Each attempt measures at a larger sample count, so the estimate only rises.
MAX_OFFLINE_ATTEMPTS = 3

# The user.conf key that sets each LoadGen scenario's rate (LoadGen reads target_latency as the
# SingleStream expected latency, in ms), and the setting it becomes.
RATE_KEY: dict[str, tuple[str, RateSetting]] = {
    "Offline": ("target_qps", "offline_expected_qps"),
    "Server": ("target_qps", "server_target_qps"),
    "SingleStream": ("target_latency", "single_stream_expected_latency_ms"),
}


def explicit_rate(
    entries: list[ConfEntry], loadgen_model: str, loadgen_scenario: str, cli_value: float | None
) -> RateChoice | None:
    """The user's own rate for this run, or None when the harness should size it."""
    key, setting = RATE_KEY[loadgen_scenario]
    if cli_value is not None:
        value = 1000.0 / cli_value if setting == "single_stream_expected_latency_ms" else cli_value
        return RateChoice(
            setting=setting,
            value=value,
            source="command line",
            reason=f"--harness-target-qps {cli_value:g}",
        )
    found = lookup(entries, loadgen_model, loadgen_scenario, key)
    if found is None:
        return None
    return RateChoice(
        setting=setting,
        value=None,
        source="user.conf",
        reason=f"{loadgen_model}.{loadgen_scenario}.{key} = {found}",
    )


def server_from_offline(samples_per_s: float, fraction: float, measured_from: str) -> RateChoice:
    """Server target QPS as a share of the measured Offline throughput."""
    qps = round(samples_per_s * fraction, 4)
    return RateChoice(
        setting="server_target_qps",
        value=qps,
        source="measured",
        reason=f"{fraction:g} × the Offline {samples_per_s:.4g} samples/s measured by {measured_from}",
        measured_from=measured_from,
        measured_samples_per_s=samples_per_s,
        fraction=fraction,
    )


def single_stream_from_warmup() -> RateChoice:
    """SingleStream expected latency: the runner sets it from the warm-up request's latency."""
    return RateChoice(
        setting="single_stream_expected_latency_ms",
        value=None,
        source="measured",
        reason="the warm-up request's latency, measured just before LoadGen started",
    )


def offline_rate(loadgen_model: str) -> RateChoice:
    """Offline with no expected QPS of the user's: LoadGen's default, corrected by a rerun if needed."""
    return RateChoice(
        setting="offline_expected_qps",
        value=None,
        source="loadgen default",
        reason=f"no {loadgen_model}.Offline.target_qps in user.conf: LoadGen's default; an Offline run "
        "that ends before min_duration is repeated at the measured rate",
    )


def usable_offline_measurement(result: BenchmarkResult) -> float | None:
    """An Offline run's samples/s when it can size the model's Server load: completed without failures
    (VALID, or INVALID only because it outran min_duration)."""
    if (
        result.samples_per_s
        and result.queries.failed == 0
        and (result.status == "VALID" or failed_checks(result.invalid_constraints) == [MIN_DURATION_NOT_MET])
    ):
        return float(result.samples_per_s)
    return None


def needs_offline_rerun(scenario: str, mode: str, status: str, invalid: list[str], failed: int) -> bool:
    """An Offline performance run that is INVALID only because the system outran the sample count."""
    return (
        scenario == "Offline"
        and mode == "performance"
        and status == "INVALID"
        and failed_checks(invalid) == [MIN_DURATION_NOT_MET]
        and failed == 0
    )


def offline_rerun(previous: RateChoice, samples_per_s: float, previous_value: float | None) -> RateChoice:
    """The next Offline attempt: the rate the last one measured, with headroom, and why."""
    qps = round(samples_per_s * OFFLINE_RERUN_MARGIN, 4)
    was = f"{previous_value:g}" if previous_value is not None else "the configured value"
    return RateChoice(
        setting="offline_expected_qps",
        value=qps,
        source="measured",
        reason=(
            f"attempt {previous.attempts} at expected QPS {was} measured {samples_per_s:.4g} samples/s and "
            f"ended before min_duration (INVALID); attempt {previous.attempts + 1} at "
            f"{OFFLINE_RERUN_MARGIN:g} × the measured rate (first choice: {_first_reason(previous)})"
        ),
        measured_from=f"attempt-{previous.attempts}",
        measured_samples_per_s=samples_per_s,
        attempts=previous.attempts + 1,
        first_reason=_first_reason(previous),
    )


def _first_reason(choice: RateChoice) -> str:
    return choice.first_reason or f"{choice.source}: {choice.reason}"


def expected_queries(
    entries: list[Any],
    model: str,
    scenario: str,
    sample_count: int,
    target_qps: float | None = None,
    min_duration_ms: int | None = None,
    min_query_count: int | None = None,
) -> int | None:
    """LoadGen's query count, roughly: min_query_count and target_qps × min_duration, each from the
    run's overrides (command line, measured load) or else user.conf."""

    def num(key: str, override: float | None) -> float | None:
        if override is not None:
            return float(override)
        v = lookup(entries, model, scenario, key)
        return float(v) if v is not None else None

    min_q = num("min_query_count", min_query_count) or 0
    qps = num("target_qps", target_qps) or 0
    dur_s = (num("min_duration", min_duration_ms) or 0) / 1000
    if scenario == "Offline":
        return int(max(min_q, qps * dur_s * 1.1)) or sample_count
    return int(max(min_q, qps * dur_s)) or None
