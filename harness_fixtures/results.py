"""What the suite writes: one typed model per file (result.yaml, metadata.yaml, session.yaml).

Every file carries ``schema_version``; tools read results through :meth:`BenchmarkResult.load`,
:meth:`Metadata.load` and :meth:`SessionFile.load`. Writes are atomic (a temporary file, fsync, rename),
so a reader or a crash never sees half a file, and pass through the one redaction
(:mod:`harness_fixtures.redaction`), so no secret reaches a file.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from . import redaction

# 3: min, requests:, latency_limits:, compliance:, repeat, capacity:, engine:, diagnosis:; relative paths
SCHEMA_VERSION = 3

Status = Literal["VALID", "INVALID", "ERROR", "INTERRUPTED", "TIMEOUT"]
Direction = Literal["higher_is_better", "lower_is_better", "must_equal"]
FINISHED: tuple[Status, ...] = ("VALID", "INVALID")  # LoadGen ran to the end and judged the run
RateSetting = Literal["offline_expected_qps", "server_target_qps", "single_stream_expected_latency_ms"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Percentiles(_Model):
    """LoadGen's latency statistics of one quantity (ms), as its detail log has them."""

    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    p99_9: float | None = None
    mean: float | None = None
    min: float | None = None
    max: float | None = None


class Distribution(_Model):
    """One per-request quantity over a run's successful requests (ms, client clock), with
    harness_fixtures.stats' percentiles (LoadGen's definition)."""

    n: int = 0
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None


class LatencyLimits(_Model):
    """The latency limits LoadGen checked this run against, as requested (user.conf over mlperf.conf)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    percentile: float | None = Field(None, description="The fraction (0.99) the limits apply at.")


class RequestMetrics(_Model):
    """What the client measured per request (requests.jsonl) that LoadGen does not report."""

    input_tokens_total: int | None = Field(None, description="Prompt tokens of the successful requests.")
    input_tokens_mean: float | None = None
    output_tokens_mean: float | None = None
    ttft_ms: Distribution = Field(
        default_factory=Distribution, description="LoadGen issue → first token chunk parsed."
    )
    tpot_ms: Distribution = Field(
        default_factory=Distribution, description="(done − first token) / (tokens − 1), per request."
    )
    itl_ms: Distribution = Field(
        default_factory=Distribution, description="Gaps between token chunks, over all requests."
    )
    e2el_ms: Distribution = Field(default_factory=Distribution, description="LoadGen issue → last byte.")
    total_token_throughput: float | None = Field(
        None, description="(input + output) tokens/s: LoadGen's tokens_per_s × (input + output) / output."
    )
    good_requests: int | None = Field(
        None, description="Successful requests within every latency limit of the run (TTFT and TPOT)."
    )
    request_goodput: float | None = Field(
        None, description="Good requests per second: LoadGen's samples_per_s × good / completed."
    )


class QueryCounts(_Model):
    issued: int = 0
    completed: int = 0
    failed: int = 0
    output_tokens: int = 0
    first_error: str | None = None


class EndpointStats(_Model):
    """One endpoint of a run with several (``endpoints:`` of result.yaml), from requests.jsonl alone."""

    index: int
    url: str = Field(description="Without credentials.")
    queries: int = Field(0, description="Queries dispatched to it (answered or not).")
    share: float | None = Field(None, description="Its fraction of the run's queries.")
    completed: int = 0
    failures: int = 0
    first_error: str | None = None
    ttft_ms_p50: float | None = None
    ttft_ms_p99: float | None = None
    tpot_ms_p50: float | None = None
    tpot_ms_p99: float | None = None
    output_tokens: int = 0
    output_tokens_per_s: float | None = Field(None, description="Its output tokens / the LoadGen run's time.")
    taken_out: str | None = Field(None, description="Why dispatch stopped sending it queries mid-run.")
    engine_window: dict[str, Any] | None = Field(
        None, description="Its own /metrics before and after LoadGen (counters' deltas)."
    )


class ClientStats(_Model):
    """The client's side of a run: its own timings (harness_fixtures.stats percentiles) and its load."""

    ttft_ms_p50: float | None = Field(None, description="Request sent → first token, at the client.")
    ttft_ms_p99: float | None = None
    ttft_ms_mean: float | None = None
    dispatch_lag_ms_p50: float | None = Field(None, description="LoadGen issue → request sent.")
    dispatch_lag_ms_p99: float | None = None
    requests: int = 0
    target_qps: float | None = None
    scheduled_qps: float | None = Field(None, description="The rate of LoadGen's drawn schedule.")
    achieved_qps: float | None = None
    workers: int | None = None
    cpu_pct: float | None = Field(None, description="Client processes' CPU, % of one core.")
    cpu_bound_fraction: float | None = Field(
        None, description="Share of 1-s samples with the busiest client process at >= 90 % of a core."
    )
    cpu_samples: int | None = None
    token_count: str | None = Field(
        None, description="How output tokens were counted: token ids per chunk, or usage.completion_tokens."
    )
    max_connections: int | None = Field(None, description="Connections per client process, at most.")
    connections_note: str | None = Field(None, description="Why fewer connections than asked (file limit).")
    client_bound: list[str] = Field(default_factory=list, description="Why the client set the pace.")


class Consistency(_Model):
    """MLPerf TEST06's checks on every answer: what LoadGen was told must match the final response."""

    checked: int = 0
    first_token_mismatch: int = 0
    multiple_eos: int = 0
    n_tokens_mismatch: int = 0
    examples: dict[str, str] = Field(default_factory=dict)


class RateChoice(_Model):
    """The rate LoadGen ran at and why (harness_fixtures.loadgen.sizing)."""

    setting: RateSetting
    value: float | None = Field(
        description="What LoadGen was given; None: as user.conf / mlperf.conf set it, or not measured."
    )
    source: Literal[
        "command line", "user.conf", "measured", "loadgen default", "capacity search", "stored capacity"
    ]
    reason: str
    measured_from: str | None = Field(None, description="Test id or folder whose measurement sized it.")
    measured_samples_per_s: float | None = None
    fraction: float | None = Field(None, description="Server: share of the measured Offline samples/s.")
    attempts: int = Field(1, description="LoadGen runs of this test (more than 1 after Offline reruns).")
    first_reason: str | None = Field(None, description="After a rerun: why the first attempt used its rate.")
    earlier_attempts: list[dict[str, Any]] = Field(
        default_factory=list, description="Offline attempts that ended before min_duration, kept on disk."
    )


class GpuWatched(_Model):
    """One GPU the NVML collector watched (harness_fixtures.metrics.nvml)."""

    nvml_index: int = Field(description="NVML's index, as nvidia-smi shows it; the timeline's gpu<i>.")
    uuid: str | None = None
    name: str | None = None
    cuda_index: int | None = Field(None, description="The engine's CUDA device ordinal, when known.")
    mig_instance: str | None = Field(None, description="The MIG instance the engine was given on it.")
    energy_j: float | None = Field(None, description="Joules over LoadGen's measured window.")
    energy_source: Literal["counter", "power_integral"] | None = Field(
        None, description="The driver's energy counter (mJ), or power samples (mW) integrated."
    )
    note: str | None = None


class GpuTelemetry(_Model):
    """Which GPUs were measured and why, and what went wrong reading them."""

    selection: str = Field(description="What chose the GPUs (the engine's CUDA_VISIBLE_DEVICES ...).")
    warnings: list[str] = Field(default_factory=list, description="What could make the choice wrong.")
    watched: list[GpuWatched] = Field(default_factory=list)
    issues: dict[str, str] = Field(
        default_factory=dict, description="gpu<i> or gpu<i>.<field> → what failed (the rest was kept)."
    )


class CapacityProbe(_Model):
    """One short LoadGen run of the capacity search."""

    qps: float
    percentile: float | None = Field(
        None,
        description="The percentile (0–1) the probe was judged at: what LoadGen's early stopping demands "
        "of a full-length run at this load (at least the scenario's).",
    )
    ttft_margin: float | None = Field(None, description="Observed TTFT at that percentile / limit.")
    tpot_margin: float | None = Field(None, description="Observed TPOT at that percentile / limit.")
    verdict: Literal["pass", "fail"] = Field(description="pass: every margin ≤ 1 and no request failed.")
    duration_s: float
    dir: str | None = None
    diagnosis: str | None = Field(None, description="Why a failed probe failed (the diagnosis verdict).")


class CapacityConfirmation(_Model):
    """One full-length run after the search (``capacity.confirmations``)."""

    qps: float
    status: str
    percentile: float | None = Field(
        None, description="Where its margins are taken: the percentile its early stopping demanded (0–1)."
    )
    ttft_margin: float | None = Field(None, description="Observed TTFT at that percentile / limit.")
    tpot_margin: float | None = Field(None, description="Observed TPOT at that percentile / limit.")
    chosen: str = Field(description="Why this load: the probes' result, or what the INVALID runs showed.")
    dir: str = Field(description="Its files: '.' for the test's own run, else confirmation-<n>/.")

    @property
    def margin(self) -> float | None:
        """The binding margin: the larger of the two measured."""
        ms = [m for m in (self.ttft_margin, self.tpot_margin) if m is not None]
        return max(ms) if ms else None


class CapacityResult(_Model):
    """``capacity:`` of result.yaml: what the search found and how."""

    found_qps: float | None = Field(description="The highest load that passed; None when none did.")
    binding_constraint: Literal["ttft", "tpot"] | None = Field(
        None, description="The limit that stopped higher loads."
    )
    precision: float | None = Field(None, description="(lowest failing − found) / lowest failing.")
    target_precision: float
    upper_bound_qps: float
    upper_bound_from: str | None = None
    lowest_failing_qps: float | None = None
    probes: list[CapacityProbe] = Field(default_factory=list)
    stopped_because: str = ""
    plot: str | None = None
    confirmations: list[CapacityConfirmation] = Field(
        default_factory=list,
        description="The full-length runs at the load found and, after an INVALID one, below it; the "
        "last is the test's result.",
    )
    confirmed_qps: float | None = Field(
        None, description="The load of the last full-length run when it was VALID: the capacity to use."
    )


class HistogramWindow(_Model):
    """An engine histogram over LoadGen's measured window: its count, mean and bucket quantiles (s)."""

    count: float
    mean: float | None = None
    p50: float | None = None
    p99: float | None = None


class EngineWindow(_Model):
    """The engine's own view over LoadGen's measured window (the warm-up left out): counter deltas,
    histogram deltas and what the timeline showed, read from its /metrics."""

    generation_tokens: float | None = None
    prompt_tokens: float | None = None
    requests: float | None = None
    preemptions: float | None = None
    histograms: dict[str, HistogramWindow] = Field(
        default_factory=dict, description="ttft, itl, e2e, queue, prefill … in seconds."
    )
    waiting_share: float | None = Field(
        None, description="Share of the window's samples with requests waiting in the engine queue."
    )
    kv_cache_peak: float | None = Field(None, description="Highest KV-cache usage seen (0–1).")


class ConstraintCheck(_Model):
    name: Literal["ttft", "tpot"]
    observed_ms: float | None
    limit_ms: float
    percentile: float
    margin: float | None


class Diagnosis(_Model):
    """Why a run (or a probe) was INVALID, from data already collected."""

    verdict: str = Field(description="One line: what limited the run.")
    next_step: str = Field(description="What to try next.")
    constraints: list[ConstraintCheck] = Field(default_factory=list)
    evidence: dict[str, Any] = Field(default_factory=dict)


class TelemetryResult(_Model):
    status: str | None = Field(None, description="'not started' when the collectors never ran.")
    collectors: dict[str, str] = Field(default_factory=dict, description="Collector → status or why not.")
    summary: dict[str, dict[str, dict[str, float]]] = Field(
        default_factory=dict, description="{source: {series: {n, mean, std, min, max, p50, p99}}}."
    )
    timeline: str | None = None
    timeline_error: str | None = None
    plots: list[str] = Field(default_factory=list)
    plots_error: str | None = None
    gpu: GpuTelemetry | None = None
    gpu_energy_j: float | None = Field(
        None, description="Joules the engine's GPUs used over LoadGen's measured window."
    )
    energy_j_per_output_token: float | None = Field(
        None, description="gpu_energy_j / output tokens of LoadGen's queries (same window)."
    )
    energy_window_s: list[float] | None = Field(
        None, description="[start, end] of LoadGen's run, seconds since the test's t0 (timeline clock)."
    )
    energy_note: str | None = Field(None, description="Why gpu_energy_j is missing, when it is.")


class AccuracyResult(_Model):
    scores: dict[str, float] | None = None
    target: dict[str, float] | None = None
    ratios: dict[str, float] | None = None
    accuracy_txt: str | None = None
    error: str | None = Field(None, description="Why the run could not be scored.")


class Violation(_Model):
    """One failed gate: what, observed vs threshold, in which direction, and the line CI shows."""

    metric: str
    observed: float | str | None
    threshold: float | str | None
    direction: Direction
    source: str = Field(description="threshold | accuracy | baseline | validity | consistency | client")
    message: str

    @classmethod
    def make(
        cls, metric: str, observed: Any, threshold: Any, direction: Direction, source: str, note: str = ""
    ) -> Violation:
        op = {"higher_is_better": "<", "lower_is_better": ">", "must_equal": "!="}[direction]
        word = {"higher_is_better": "min", "lower_is_better": "max", "must_equal": "required"}[direction]
        how = direction.replace("_", " ")
        msg = f"{metric} {_num(observed)} {op} {word} {_num(threshold)} ({how}, {source})"
        return cls(
            metric=metric,
            observed=observed,
            threshold=threshold,
            direction=direction,
            source=source,
            message=msg + (f": {note}" if note else ""),
        )


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Test06Result(_Model):
    """MLPerf compliance TEST06 (LLM output consistency): a LoadGen run with the audit.config that logs
    100 sampled answers, verified by the test's three rules (docs/submission.md)."""

    dir: str = Field(description="The run's folder, relative to the session folder.")
    status: Status = Field(description="How the LoadGen run ended.")
    reason: str | None = None
    samples: int = Field(0, description="Answers in its mlperf_log_accuracy.json.")
    first_token: bool | None = Field(description="First token check; None: skipped (Offline).")
    eos: bool
    sample_length: bool
    passed: bool
    examples: dict[str, str] = Field(default_factory=dict, description="One failing answer per check.")


class ComplianceResult(_Model):
    TEST06: Test06Result | None = None


class BaselineRow(_Model):
    test_id: str
    metric: str
    baseline: float
    current: float
    change_pct: float
    allowed_regression_pct: float
    regressed: bool


class BaselineComparison(_Model):
    path: str
    warnings: list[str] = Field(default_factory=list)
    rows: list[BaselineRow] = Field(default_factory=list)


class BenchmarkResult(_Model):
    """What one benchmark test measured; result.yaml."""

    schema_version: int = SCHEMA_VERSION
    test_id: str
    model: str
    scenario: str
    mode: str
    loadgen_model: str
    status: Status = Field(description="LoadGen validity, or why the run did not finish.")
    reason: str | None = Field(None, description="Why INVALID / ERROR / INTERRUPTED / TIMEOUT.")
    invalid_constraints: list[str] = Field(default_factory=list)
    loadgen_errors: list[str] = Field(default_factory=list)
    queries: QueryCounts = Field(default_factory=QueryCounts)
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    ttft_ms: Percentiles = Field(default_factory=Percentiles)
    tpot_ms: Percentiles = Field(default_factory=Percentiles)
    latency_ms: Percentiles = Field(default_factory=Percentiles)
    duration_s: float | None = None
    engine_alive: bool = True
    settings: dict[str, Any] = Field(default_factory=dict, description="LoadGen's effective settings.")
    rate: RateChoice | None = None
    latency_limits: LatencyLimits | None = Field(
        None, description="The TTFT/TPOT limits LoadGen checked (Server scenarios with token latencies)."
    )
    requests: RequestMetrics = Field(default_factory=RequestMetrics)
    capacity: CapacityResult | None = None
    engine: EngineWindow | None = None
    diagnosis: Diagnosis | None = None
    client: ClientStats = Field(default_factory=ClientStats)
    endpoints: list[EndpointStats] = Field(
        default_factory=list, description="Per endpoint, when the run had more than one."
    )
    telemetry: TelemetryResult = Field(default_factory=TelemetryResult)
    accuracy: AccuracyResult | None = None
    consistency: Consistency = Field(default_factory=Consistency)
    compliance: ComplianceResult | None = Field(
        None, description="MLPerf compliance runs of this test (--harness-submission-dir): TEST06."
    )
    repeat: int | None = Field(None, description="With --harness-repeat N: this run's number, 1..N.")
    baseline: BaselineComparison | None = None
    gate: list[Violation] = Field(default_factory=list, description="Violated gates; empty = passed.")
    paths: dict[str, str] = Field(
        default_factory=dict, description="Files of the test, relative to the session folder."
    )

    @classmethod
    def load(cls, path: Path) -> BenchmarkResult:
        return cls.model_validate(yaml.safe_load(path.read_text()))


class EngineInfo(_Model):
    kind: str
    base_url: str
    served_model: str
    version: str | None = None
    argv: list[str] = Field(default_factory=list, description="Redacted.")
    log: str | None = None
    pid: int | None = None
    start_s: float | None = None
    start_number: int | None = Field(None, description="1 = the model's first engine start this session.")
    gpus: list[dict[str, Any]] | None = Field(
        None, description="--harness-gpus: the GPUs locked for this engine, {index, uuid, name} each."
    )
    cuda_visible_devices: str | None = Field(
        None, description="--harness-gpus: the CUDA_VISIBLE_DEVICES the suite gave the engine."
    )


class Metadata(BaseModel):
    """How a result was produced; metadata.yaml. Conftest hooks may add their own keys."""

    model_config = ConfigDict(extra="allow")
    schema_version: int = SCHEMA_VERSION
    test_id: str
    session: str | None = Field(None, description="The session folder's name; paths are relative to it.")
    nodeid: str | None = None
    case: dict[str, Any]
    scenario: str
    mode: str
    engine: EngineInfo | None = None
    endpoints: list[str] | None = Field(
        None, description="Every endpoint's URL (no credentials) when the run had more than one."
    )
    sut: str | None = Field(None, description="What the system under test is (Network SUT: remote hosts).")
    run_spec: dict[str, Any] = Field(default_factory=dict, description="The LoadGen run, no secrets.")
    command_line: list[str] = Field(default_factory=list)
    cwd: str | None = None
    started_utc: str
    finished_utc: str
    environment: dict[str, Any] = Field(default_factory=dict)
    outputs: dict[str, str] = Field(default_factory=dict)
    mlflow: dict[str, str] | None = None

    @classmethod
    def load(cls, path: Path) -> Metadata:
        return cls.model_validate(yaml.safe_load(path.read_text()))


class SessionFile(_Model):
    """session.yaml: every result of one pytest session."""

    schema_version: int = SCHEMA_VERSION
    started_utc: str
    finished_utc: str
    command_line: list[str] = Field(default_factory=list)
    results: list[dict[str, Any]] = Field(default_factory=list, description="result.yaml + nodeid each.")
    repeats: dict[str, dict[str, dict[str, float]]] = Field(
        default_factory=dict,
        description="--harness-repeat: {test id: {metric: {n, median, min, max, spread_pct}}}.",
    )
    shard: dict[str, Any] | None = Field(
        None,
        description="--harness-shard: {index, count} and, where this process collected the tests, "
        "tests (kept), of (selected before sharding) and models.",
    )

    @classmethod
    def load(cls, path: Path) -> SessionFile:
        return cls.model_validate(yaml.safe_load(path.read_text()))


def write_yaml(path: Path, data: Any) -> None:
    """Write atomically and durably, with every secret hidden (:mod:`harness_fixtures.redaction`)."""
    write_text_atomic(path, yaml.safe_dump(redaction.data(data), sort_keys=False, allow_unicode=True))


def write_json(path: Path, data: Any) -> None:
    """As :func:`write_yaml`, as JSON (client.json, run_spec.json)."""
    write_text_atomic(path, json.dumps(redaction.data(data), indent=1))


def write_text(path: Path, text: str) -> None:
    """As :func:`write_yaml`, for text already formatted (result.json, session.csv)."""
    write_text_atomic(path, redaction.text(text))


def write_text_atomic(path: Path, text: str) -> None:
    """A temporary file beside ``path``, fsync, rename: a reader or a crash never sees half a file,
    and a failed write leaves no temporary file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
