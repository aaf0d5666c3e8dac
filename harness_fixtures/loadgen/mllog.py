"""LoadGen's detail log: ``mlperf_log_detail.txt`` MLLOG records → the numbers and verdict of a run.

LoadGen's own values are the truth for LoadGen metrics: the percentiles here are read, never
recomputed, and everything the suite prints, writes or plots for them comes from :class:`LoadGenRun`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..results import Percentiles

MLLOG_PREFIX = ":::MLLOG "
_PERCENTILE_KEYS = (
    ("p50", "50.00"),
    ("p90", "90.00"),
    ("p95", "95.00"),
    ("p99", "99.00"),
    ("p99_9", "99.90"),
)

# LoadGen's validity conditions (MLLOG key → the words `invalid_constraints` uses when one failed).
VALIDITY_CHECKS: dict[str, str] = {
    "result_min_duration_met": "min duration not met",
    "result_min_queries_met": "min query count not met",
    "result_perf_constraints_met": "latency constraints not met",
    "early_stopping_met": "early stopping not met",
}
MIN_DURATION_NOT_MET = VALIDITY_CHECKS["result_min_duration_met"]
_EARLY_STOPPING_KEYS = ("early_stopping_ttft_result", "early_stopping_tpot_result", "early_stopping_result")


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


def _ns_to_ms(v: Any) -> float | None:
    return round(float(v) / 1e6, 3) if isinstance(v, (int, float)) else None


def _percentiles(values: dict[str, Any], fmt: str, mean_key: str, min_key: str, max_key: str) -> Percentiles:
    got = {name: _ns_to_ms(values.get(fmt.format(p))) for name, p in _PERCENTILE_KEYS}
    return Percentiles(
        **got,
        mean=_ns_to_ms(values.get(mean_key)),
        min=_ns_to_ms(values.get(min_key)),
        max=_ns_to_ms(values.get(max_key)),
    )


def invalid_constraints(values: dict[str, Any]) -> list[str]:
    """Which of LoadGen's validity conditions failed, in words, then LoadGen's own recommendation."""
    out = [text for key, text in VALIDITY_CHECKS.items() if values.get(key) is False]
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


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


@dataclass(frozen=True)
class LoadGenRun:
    """What LoadGen said about one run: its numbers, verdict, settings and limits."""

    values: dict[str, Any]
    errors: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, mlperf_dir: Path) -> LoadGenRun:
        values, errors = parse_mllog(mlperf_dir / "mlperf_log_detail.txt")
        return cls(values, errors)

    @property
    def validity(self) -> Literal["VALID", "INVALID"] | None:
        v = self.values.get("result_validity")
        return "VALID" if v == "VALID" else "INVALID" if v == "INVALID" else None

    @property
    def invalid_constraints(self) -> list[str]:
        return invalid_constraints(self.values) if self.validity == "INVALID" else []

    @property
    def samples_per_s(self) -> float | None:
        v = self.values
        return _number(v.get("result_samples_per_second", v.get("result_completed_samples_per_sec")))

    @property
    def tokens_per_s(self) -> float | None:
        v = self.values
        return _number(v.get("result_tokens_per_second", v.get("result_completed_tokens_per_second")))

    @property
    def ttft_ms(self) -> Percentiles:
        return _percentiles(
            self.values,
            "result_first_token_{}_percentile_latency_ns",
            "result_first_token_mean_latency_ns",
            "result_first_token_min_latency_ns",
            "result_first_token_max_latency_ns",
        )

    @property
    def tpot_ms(self) -> Percentiles:
        return _percentiles(
            self.values,
            "result_time_per_output_token_{}_percentile_ns",
            "result_time_to_output_token_mean",
            "result_time_to_output_token_min",
            "result_time_to_output_token_max",
        )

    @property
    def latency_ms(self) -> Percentiles:
        return _percentiles(
            self.values,
            "result_{}_percentile_latency_ns",
            "result_mean_latency_ns",
            "result_min_latency_ns",
            "result_max_latency_ns",
        )

    @property
    def settings(self) -> dict[str, Any]:
        """LoadGen's effective settings, without the ``effective_`` prefix."""
        return {k[len("effective_") :]: v for k, v in self.values.items() if k.startswith("effective_")}

    @property
    def scheduled_qps(self) -> float | None:
        return _number(self.values.get("result_scheduled_samples_per_sec"))

    def latency_limits(self) -> tuple[dict[str, float] | None, float | None]:
        """The Server TTFT/TPOT limits in ms and the percentile (0.99) they are checked at;
        ``(None, None)`` unless the run was Server with token latencies."""
        v = self.values
        if v.get("effective_scenario") != "Server" or v.get("requested_use_token_latencies") is False:
            return None, None
        limits: dict[str, float] = {}
        for name in ("ttft", "tpot"):
            ns = v.get(f"requested_server_{name}_latency")
            if isinstance(ns, (int, float)) and ns > 0:
                limits[name] = ns / 1e6  # unrounded: a 1 ns limit stays above zero
        pct = v.get("effective_target_latency_percentile")
        return (limits or None), (float(pct) if isinstance(pct, (int, float)) and 0 < pct < 1 else None)
