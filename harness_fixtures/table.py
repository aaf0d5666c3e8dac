"""Results as flat rows: the one mapping from result.yaml fields to the metric names and columns that
session.csv, ``harness_fixtures.compare`` and ``harness_fixtures.report`` use.

A metric's value is always the result.yaml value it names (LoadGen's where LoadGen measured it, the
client's ``requests:`` block otherwise), so a number reads the same in every table.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Better = Literal["higher", "lower"]


@dataclass(frozen=True)
class Metric:
    name: str
    path: tuple[str, ...]  # keys into a result dict
    better: Better | None  # None: neither direction is better (gen_len)
    label: str
    source: Literal["LoadGen", "client", "accuracy"]


def _pcts(
    group: str, label: str, source: Literal["LoadGen", "client"], keys: tuple[str, ...]
) -> list[Metric]:
    name = group.removesuffix("_ms")  # ttft_p99_ms ...: the names thresholds and baselines use
    path = ("requests", group) if source == "client" else (group,)
    return [Metric(f"{name}_{p}_ms", (*path, p), "lower", f"{label} {p} ms", source) for p in keys]


METRICS: tuple[Metric, ...] = (
    Metric("tokens_per_s", ("tokens_per_s",), "higher", "output tok/s", "LoadGen"),
    Metric("samples_per_s", ("samples_per_s",), "higher", "samples/s", "LoadGen"),
    *_pcts("ttft_ms", "TTFT", "LoadGen", ("p50", "p90", "p99")),
    *_pcts("tpot_ms", "TPOT", "LoadGen", ("p50", "p90", "p99")),
    *_pcts("latency_ms", "E2E latency", "LoadGen", ("p50", "p99")),
    *_pcts("itl_ms", "ITL", "client", ("p50", "p99")),
    Metric(
        "total_token_throughput", ("requests", "total_token_throughput"), "higher", "total tok/s", "client"
    ),
    Metric("request_goodput", ("requests", "request_goodput"), "higher", "goodput req/s", "client"),
    Metric("failed_requests", ("queries", "failed"), "lower", "failed requests", "client"),
    *(
        Metric(k, ("accuracy", "scores", k), "higher", k, "accuracy")
        for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")
    ),
    Metric("gen_len", ("accuracy", "scores", "gen_len"), None, "gen_len", "accuracy"),
)
BY_NAME = {m.name: m for m in METRICS}
# Columns that say what a row is (before the metrics).
ID_COLUMNS = ("session", "test_id", "repeat", "model", "scenario", "mode", "loadgen_model", "status")
EXTRA_COLUMNS = (
    "queries_issued",
    "queries_completed",
    "input_tokens_mean",
    "output_tokens_mean",
    "duration_s",
    "rate_setting",
    "rate_value",
    "engine",
    "gate",
)


def _get(data: Any, path: Iterable[str]) -> Any:
    for key in path:
        data = data.get(key) if isinstance(data, Mapping) else None
    return data


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def metric_values(result: Mapping[str, Any]) -> dict[str, float]:
    """Every metric of :data:`METRICS` the result has a number for."""
    out = {}
    for m in METRICS:
        v = _number(_get(result, m.path))
        if v is not None:
            out[m.name] = v
    return out


def flat_row(
    result: Mapping[str, Any], session: str = "", metadata: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One CSV row of a result: what it is, every metric (empty when not measured), a few counts."""
    rate = result.get("rate") or {}
    engine = (metadata or {}).get("engine") or {}
    values = metric_values(result)
    row: dict[str, Any] = {
        "session": session,
        **{k: result.get(k) for k in ID_COLUMNS[1:]},
        **{m.name: values.get(m.name) for m in METRICS},
        "queries_issued": _get(result, ("queries", "issued")),
        "queries_completed": _get(result, ("queries", "completed")),
        "input_tokens_mean": _get(result, ("requests", "input_tokens_mean")),
        "output_tokens_mean": _get(result, ("requests", "output_tokens_mean")),
        "duration_s": result.get("duration_s"),
        "rate_setting": rate.get("setting"),
        "rate_value": rate.get("value"),
        "engine": " ".join(str(x) for x in (engine.get("kind"), engine.get("version")) if x),
        "gate": "pass" if not result.get("gate") else "fail",
    }
    return row


def columns() -> list[str]:
    return [*ID_COLUMNS, *(m.name for m in METRICS), *EXTRA_COLUMNS]


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as CSV text with a fixed header (empty cells for missing values); pandas reads it as is."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns(), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


@dataclass(frozen=True)
class Spread:
    """Several runs' values of one metric: their median and how far apart they are."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float:
        return float(statistics.median(self.values))

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    @property
    def spread_pct(self) -> float | None:
        """(max − min) / |median|, in percent; None for a single value or a zero median."""
        if self.n < 2 or self.median == 0:
            return None
        return (self.high - self.low) / abs(self.median) * 100

    def summary(self) -> dict[str, float]:
        out = {"n": float(self.n), "median": self.median, "min": self.low, "max": self.high}
        if self.spread_pct is not None:
            out["spread_pct"] = round(self.spread_pct, 3)
        return out


def group_metrics(results: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Spread]]:
    """test id → metric → the values of every run of that test (repeats, or several sessions)."""
    values: dict[str, dict[str, list[float]]] = {}
    for r in results:
        test = values.setdefault(str(r.get("test_id")), {})
        for name, v in metric_values(r).items():
            test.setdefault(name, []).append(v)
    return {t: {m: Spread(tuple(v)) for m, v in ms.items()} for t, ms in values.items()}


def repeat_summary(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """session.yaml's ``repeats:``: for each test run more than once, each metric's median and spread."""
    repeated = [r for r in results if r.get("repeat") is not None]
    return {
        test: {m: s.summary() for m, s in metrics.items()}
        for test, metrics in group_metrics(repeated).items()
        if any(s.n > 1 for s in metrics.values())
    }
