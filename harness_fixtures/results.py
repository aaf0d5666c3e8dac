"""Result models and LoadGen log parsing: ``mlperf_log_detail.txt`` MLLOG records → BenchmarkResult."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
MLLOG_PREFIX = ":::MLLOG "
PERCENTILES: tuple[str, ...] = ("50.00", "90.00", "95.00", "99.00", "99.90")

Status = Literal["VALID", "INVALID", "ERROR", "INTERRUPTED", "TIMEOUT"]


class MllogError(ValueError):
    """mlperf_log_detail.txt is missing or has no result records."""


def parse_mllog(path: Path) -> tuple[dict[str, Any], list[str]]:
    """Read MLLOG records: (last value per key, messages of records flagged as errors)."""
    if not path.is_file():
        raise MllogError(f"LoadGen detail log {str(path)!r} does not exist (LoadGen did not run or crashed)")
    values: dict[str, Any] = {}
    errors: list[str] = []
    with path.open(errors="replace") as fh:
        for line in fh:
            if not line.startswith(MLLOG_PREFIX):
                continue
            try:
                rec = json.loads(line[len(MLLOG_PREFIX) :])
            except json.JSONDecodeError:
                continue  # LoadGen can leave a torn last line when the process is killed
            key = rec.get("key")
            if not isinstance(key, str):
                continue
            values[key] = rec.get("value")
            meta = rec.get("metadata") or {}
            if meta.get("is_error"):
                errors.append(f"{key}: {rec.get('value')}")
    return values, errors


class Percentiles(BaseModel):
    model_config = ConfigDict(extra="forbid")
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    p99_9: float | None = None
    mean: float | None = None
    max: float | None = None


class QueryCounts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    issued: int = 0
    completed: int = 0
    failed: int = 0
    output_tokens: int = 0
    first_error: str | None = None


class BenchmarkResult(BaseModel):
    """What one benchmark test measured; written as result.yaml."""

    model_config = ConfigDict(extra="forbid")
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
    settings: dict[str, Any] = Field(default_factory=dict, description="LoadGen effective settings.")
    rate: dict[str, Any] = Field(
        default_factory=dict, description="The rate LoadGen ran at and why (harness_fixtures.sizing)."
    )
    client: dict[str, Any] = Field(default_factory=dict, description="Client-side timing summary.")
    telemetry: dict[str, Any] = Field(default_factory=dict)
    accuracy: dict[str, Any] = Field(default_factory=dict, description="Scores, target and ratios.")
    consistency: dict[str, Any] = Field(default_factory=dict, description="TEST06-style output checks.")
    baseline: dict[str, Any] = Field(default_factory=dict, description="Comparison with --harness-baseline.")
    gate: list[dict[str, Any]] = Field(default_factory=list, description="Violated thresholds.")
    paths: dict[str, str] = Field(default_factory=dict)

    def write(self, path: Path) -> None:
        write_yaml(path, self.model_dump(mode="json"))

    @classmethod
    def load(cls, path: Path) -> BenchmarkResult:
        return cls.model_validate(yaml.safe_load(path.read_text()))


def write_yaml(path: Path, data: Any) -> None:
    """Write atomically so a reader (or a crash) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    tmp.replace(path)


def _ns_to_ms(v: Any) -> float | None:
    return round(float(v) / 1e6, 3) if isinstance(v, (int, float)) else None


def _percentiles(values: dict[str, Any], fmt: str, mean_key: str | None, max_key: str | None) -> Percentiles:
    got = {p: _ns_to_ms(values.get(fmt.format(p))) for p in PERCENTILES}
    return Percentiles(
        p50=got["50.00"],
        p90=got["90.00"],
        p95=got["95.00"],
        p99=got["99.00"],
        p99_9=got["99.90"],
        mean=_ns_to_ms(values.get(mean_key)) if mean_key else None,
        max=_ns_to_ms(values.get(max_key)) if max_key else None,
    )


# LoadGen's validity conditions (MLLOG key → the words invalid_constraints uses when it failed).
VALIDITY_CHECKS: dict[str, str] = {
    "result_min_duration_met": "min duration not met",
    "result_min_queries_met": "min query count not met",
    "result_perf_constraints_met": "latency constraints not met",
    "early_stopping_met": "early stopping not met",
}
_EARLY_STOPPING_KEYS = ("early_stopping_ttft_result", "early_stopping_tpot_result", "early_stopping_result")


def invalid_constraints(values: dict[str, Any]) -> list[str]:
    """Which of LoadGen's validity conditions failed, in words, then LoadGen's own recommendation."""
    out: list[str] = []
    for key, text in VALIDITY_CHECKS.items():
        if values.get(key) is False:
            out.append(text)
    for key in _EARLY_STOPPING_KEYS:
        v = values.get(key)
        if isinstance(v, str) and "unsuccessful" in v:
            out.append(f"{key}: {' '.join(v.replace('*', ' ').split())}")
    reason = values.get("result_invalid_reason")
    if isinstance(reason, str) and reason.strip():
        out.append(reason.strip())
    return out


def failed_checks(invalid: list[str]) -> list[str]:
    """The failed validity conditions in an ``invalid_constraints`` list, without LoadGen's advice."""
    return [c for c in invalid if c in VALIDITY_CHECKS.values() or c.startswith(_EARLY_STOPPING_KEYS)]


def metrics_from_mllog(values: dict[str, Any]) -> dict[str, Any]:
    """The performance numbers of a LoadGen run, scenario-independent names."""
    samples = values.get("result_samples_per_second", values.get("result_completed_samples_per_sec"))
    tokens = values.get("result_tokens_per_second", values.get("result_completed_tokens_per_second"))
    return {
        "samples_per_s": float(samples) if isinstance(samples, (int, float)) else None,
        "tokens_per_s": float(tokens) if isinstance(tokens, (int, float)) else None,
        "ttft_ms": _percentiles(
            values,
            "result_first_token_{}_percentile_latency_ns",
            "result_first_token_mean_latency_ns",
            "result_first_token_max_latency_ns",
        ),
        "tpot_ms": _percentiles(
            values,
            "result_time_per_output_token_{}_percentile_ns",
            "result_time_to_output_token_mean",
            "result_time_to_output_token_max",
        ),
        "latency_ms": _percentiles(
            values, "result_{}_percentile_latency_ns", "result_mean_latency_ns", "result_max_latency_ns"
        ),
        "settings": {k[len("effective_") :]: v for k, v in values.items() if k.startswith("effective_")},
    }


def latency_limits(values: dict[str, Any]) -> tuple[dict[str, float] | None, float | None]:
    """LoadGen's TTFT/TPOT limits in ms (``{"ttft": ..., "tpot": ...}``) and the percentile (0.99)
    they are checked at; ``(None, None)`` unless the run was Server with token latencies.

    :param values: MLLOG values from `parse_mllog`.
    """
    if values.get("effective_scenario") != "Server" or values.get("requested_use_token_latencies") is False:
        return None, None
    limits: dict[str, float] = {}
    for name in ("ttft", "tpot"):
        ns = values.get(f"requested_server_{name}_latency")
        if isinstance(ns, (int, float)) and ns > 0:
            limits[name] = ns / 1e6  # unrounded: a 1 ns limit stays above zero
    pct = values.get("effective_target_latency_percentile")
    return (limits or None), (float(pct) if isinstance(pct, (int, float)) and 0 < pct < 1 else None)
