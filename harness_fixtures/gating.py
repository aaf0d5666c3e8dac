"""All gate policy, direction-aware: validity, thresholds, accuracy targets, output consistency,
client-bound runs and baselines → violations.

Pure functions over result dicts (``BenchmarkResult.model_dump()``); the pipeline writes the list into
``result.yaml`` under ``gate:`` and the test fails with one line per violation.
"""

from __future__ import annotations

import datetime as dt
import difflib
import math
import statistics
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .client.cpu import CPU_BOUND_PCT
from .config import Thresholds
from .results import Direction, Violation, write_yaml
from .stats import round4

# Metrics a baseline compares, with the direction in which they get better.
BASELINE_METRICS: dict[str, Direction] = {
    "tokens_per_s": "higher_is_better",
    "samples_per_s": "higher_is_better",
    "ttft_p99_ms": "lower_is_better",
    "tpot_p99_ms": "lower_is_better",
    "ttft_p50_ms": "lower_is_better",
    "tpot_p50_ms": "lower_is_better",
    "rouge1": "higher_is_better",
    "rouge2": "higher_is_better",
    "rougeL": "higher_is_better",
    "rougeLsum": "higher_is_better",
}


class GateError(ValueError):
    """A thresholds or baseline file is unusable; the message names the file, key and fix."""


def metric_values(result: dict[str, Any]) -> dict[str, float]:
    """Flat numeric view of a result: the names thresholds and baselines use."""
    out: dict[str, float] = {}
    for key in ("tokens_per_s", "samples_per_s"):
        if isinstance(result.get(key), (int, float)):
            out[key] = float(result[key])
    for group in ("ttft_ms", "tpot_ms", "latency_ms"):
        for p in ("p50", "p90", "p99"):
            v = (result.get(group) or {}).get(p)
            if isinstance(v, (int, float)):
                out[f"{group[:-3]}_{p}_ms"] = float(v)
    out["failed_requests"] = float((result.get("queries") or {}).get("failed", 0))
    frac = (result.get("client") or {}).get("cpu_bound_fraction")
    if isinstance(frac, (int, float)):
        out["client_cpu_bound_fraction"] = float(frac)
    for k, v in ((result.get("accuracy") or {}).get("scores") or {}).items():
        if isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def check_thresholds(result: dict[str, Any], t: Any) -> list[Violation]:
    """Absolute thresholds of a case (config.Thresholds)."""
    m = metric_values(result)
    out: list[Violation] = []
    if t.require_valid and result.get("status") == "INVALID":
        out.append(
            Violation.make(
                "validity",
                "INVALID",
                "VALID",
                "must_equal",
                "validity",
                result.get("reason") or "LoadGen gave no reason",
            )
        )
    if result.get("status") in ("ERROR", "TIMEOUT", "INTERRUPTED"):
        out.append(
            Violation.make(
                "status",
                result["status"],
                "completed",
                "must_equal",
                "validity",
                (result.get("reason") or "").splitlines()[0] if result.get("reason") else "",
            )
        )
    failed = int(m.get("failed_requests", 0))
    if failed > t.max_failed_requests:
        q = result.get("queries") or {}
        out.append(
            Violation.make(
                "failed_requests",
                failed,
                t.max_failed_requests,
                "lower_is_better",
                "threshold",
                f"{failed} of {q.get('issued')} failed; first error: {q.get('first_error')}",
            )
        )
    pairs: list[tuple[str, float | None, Direction]] = [
        ("tokens_per_s", t.min_tokens_per_s, "higher_is_better"),
        ("samples_per_s", t.min_samples_per_s, "higher_is_better"),
        ("ttft_p99_ms", t.max_ttft_p99_ms, "lower_is_better"),
        ("tpot_p99_ms", t.max_tpot_p99_ms, "lower_is_better"),
        ("client_cpu_bound_fraction", t.max_client_cpu_bound_fraction, "lower_is_better"),
    ]
    for metric, limit, direction in pairs:
        if limit is None:
            continue
        observed = m.get(metric)
        if observed is None:
            if result.get("status") in ("VALID", "INVALID") and metric != "client_cpu_bound_fraction":
                out.append(Violation.make(metric, None, limit, direction, "threshold", "not measured"))
            continue
        if _worse(observed, limit, direction):
            out.append(Violation.make(metric, observed, limit, direction, "threshold"))
    return out


def _worse(observed: float, limit: float, direction: Direction) -> bool:
    return observed < limit if direction == "higher_is_better" else observed > limit


def check_accuracy(
    scores: dict[str, Any], target: dict[str, Any], min_ratio: float, gen_len_band: tuple[float, float]
) -> list[Violation]:
    """MLPerf rule: each ROUGE ≥ min_ratio × target; gen_len within the band around the target.

    Compared as the submission checker compares them: the ROUGE values rounded to 4 decimals as
    accuracy.txt prints them, against the unrounded ``target × min_ratio``.
    """
    out: list[Violation] = []
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        if key not in target:
            continue
        need = float(target[key]) * min_ratio
        got = scores.get(key)
        shown = None if got is None else round4(float(got))
        if shown is None or shown < need:
            out.append(
                Violation.make(
                    key,
                    shown,
                    round(need, 4),
                    "higher_is_better",
                    "accuracy",
                    f"{min_ratio:.0%} of target {target[key]}",
                )
            )
    if target.get("gen_len"):
        lo, hi = (float(target["gen_len"]) * f for f in gen_len_band)
        got = scores.get("gen_len")
        if got is None or float(got) < lo:
            out.append(
                Violation.make(
                    "gen_len",
                    got,
                    round(lo),
                    "higher_is_better",
                    "accuracy",
                    f"{gen_len_band[0]:.0%} of target {target['gen_len']}",
                )
            )
        elif float(got) > hi:
            out.append(
                Violation.make(
                    "gen_len",
                    got,
                    round(hi),
                    "lower_is_better",
                    "accuracy",
                    f"{gen_len_band[1]:.0%} of target {target['gen_len']}",
                )
            )
    return out


def check_consistency(consistency: dict[str, Any]) -> list[Violation]:
    """MLPerf compliance TEST06 in spirit, on every request of every run."""
    out = []
    for key, what in (
        ("first_token_mismatch", "first token reported to LoadGen != first token of the final response"),
        ("multiple_eos", "response with more than one EOS token"),
        ("n_tokens_mismatch", "n_tokens != number of tokens in the response data"),
    ):
        n = int(consistency.get(key, 0) or 0)
        if n:
            ex = (consistency.get("examples") or {}).get(key)
            out.append(
                Violation.make(
                    key, n, 0, "lower_is_better", "consistency", f"{what}" + (f"; e.g. {ex}" if ex else "")
                )
            )
    return out


def check_compliance(compliance: dict[str, Any] | None) -> list[Violation]:
    """MLPerf compliance runs of a submission (TEST06): one violation per failed check."""
    t06 = (compliance or {}).get("TEST06")
    if not t06 or t06.get("passed"):
        return []
    examples = t06.get("examples") or {}
    out = []
    if t06.get("status") not in ("VALID", "INVALID"):
        out.append(
            Violation.make(
                "TEST06.run",
                t06.get("status"),
                "completed",
                "must_equal",
                "compliance",
                t06.get("reason") or "",
            )
        )
    for check in ("first_token", "eos", "sample_length"):
        if t06.get(check) is False:
            out.append(
                Violation.make(
                    f"TEST06.{check}", "fail", "pass", "must_equal", "compliance",
                    f"{examples.get(check, '')} ({t06.get('dir')}/verify_accuracy.txt)",
                )
            )  # fmt: skip
    if not out:
        out.append(
            Violation.make(
                "TEST06", "fail", "pass", "must_equal", "compliance", examples.get("error", "not verified")
            )
        )
    return out


@dataclass(frozen=True)
class ClientBoundLimits:
    """When a run counts as client-bound: the load generator, not the server, set the pace.

    A healthy client dispatches within a few ms of LoadGen's issue and keeps the schedule; a saturated
    one builds a backlog, so lag p99 and the rate shortfall grow without bound. The bounds leave room
    for scheduler noise on a shared machine. Percentiles and rates need ``min_requests``; CPU
    saturation needs ``min_cpu_samples`` one-second samples.
    """

    max_dispatch_lag_p99_ms: float = 10.0  # LoadGen issue → request sent (Server, SingleStream)
    min_achieved_qps_ratio: float = 0.95  # sends per second / LoadGen's scheduled rate (Server)
    max_cpu_bound_fraction: float = 0.5  # share of samples with a client process at >= 90 % of a core
    min_requests: int = 100
    min_cpu_samples: int = 5


CLIENT_BOUND_FIX = (
    "the client limited this run, so its numbers measure the client; add client processes "
    "(--harness-client-workers N) or accept it with --harness-allow-client-bound"
)


def check_client_bound(result: dict[str, Any], opts: ClientBoundLimits | None = None) -> list[Violation]:
    """Client-bound detection on a performance run: dispatch lag, achieved vs scheduled QPS, client CPU.

    Reads ``result.client``: requests.jsonl statistics, and for CPU ``cpu_bound_fraction`` (the runner
    and each client worker measure themselves; the busiest process counts, since each is one GIL).
    """
    lim = opts or ClientBoundLimits()
    if result.get("mode") != "performance" or result.get("status") not in ("VALID", "INVALID"):
        return []
    c = result.get("client") or {}
    scenario = result.get("scenario")
    enough = (c.get("requests") or 0) >= lim.min_requests
    out: list[Violation] = []
    lag = c.get("dispatch_lag_ms_p99")
    if (
        scenario != "Offline"
        and enough
        and isinstance(lag, (int, float))
        and lag > lim.max_dispatch_lag_p99_ms
    ):
        out.append(
            Violation.make(
                "dispatch_lag_p99_ms",
                lag,
                lim.max_dispatch_lag_p99_ms,
                "lower_is_better",
                "client",
                CLIENT_BOUND_FIX,
            )
        )
    achieved, scheduled = c.get("achieved_qps"), c.get("scheduled_qps") or c.get("target_qps")
    server = scenario in ("Server", "Interactive")
    if server and enough and achieved and scheduled and achieved / scheduled < lim.min_achieved_qps_ratio:
        out.append(
            Violation.make(
                "achieved_qps",
                round(float(achieved), 3),
                round(lim.min_achieved_qps_ratio * scheduled, 3),
                "higher_is_better",
                "client",
                f"{achieved / scheduled:.0%} of LoadGen's scheduled {scheduled:.4g} QPS "
                f"(target {c.get('target_qps')}); {CLIENT_BOUND_FIX}",
            )
        )
    frac = c.get("cpu_bound_fraction")
    if (
        isinstance(frac, (int, float))
        and (c.get("cpu_samples") or 0) >= lim.min_cpu_samples
        and frac > lim.max_cpu_bound_fraction
    ):
        out.append(
            Violation.make(
                "client_cpu_bound_fraction",
                float(frac),
                lim.max_cpu_bound_fraction,
                "lower_is_better",
                "client",
                f"a client process was at >= {CPU_BOUND_PCT:.0f} % of a core in {frac:.0%} of its samples; "
                + CLIENT_BOUND_FIX,
            )
        )
    return out


# -- thresholds file --------------------------------------------------------------------------
def load_threshold_overrides(
    path: Path, known_fields: set[str], names: Collection[str] | None = None
) -> dict[str, dict[str, Any]]:
    """``--harness-thresholds FILE``: {case name or test id: {threshold: value}}.

    Keys, values (as the model YAML's ``thresholds:`` would take them) and, given ``names`` (the
    cases and test ids there are), the names are checked here, before any engine starts: a bad value
    found after the run would cost the whole run, a misspelt name would silently gate nothing.
    """
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise GateError(f"thresholds file {str(path)!r}: cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise GateError(
            f"thresholds file {str(path)!r}: expected a mapping of case name or test id to thresholds"
        )
    for name, values in data.items():
        if not isinstance(values, dict):
            raise GateError(f"{path}: {name}: expected a mapping of threshold names to values")
        unknown = set(values) - known_fields
        if unknown:
            raise GateError(
                f"{path}: {name}: unknown threshold(s) {sorted(unknown)}; known: {sorted(known_fields)}"
            )
        try:
            Thresholds.model_validate(values)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(x) for x in err["loc"])
            raise GateError(
                f"{path}: {name}: {key}: {err['msg']} (got {err.get('input')!r}); fix the value in that file"
            ) from None
    if names is not None:
        known = set(names)
        for name in data:
            if str(name) not in known:
                hint = difflib.get_close_matches(str(name), sorted(known), n=1)
                fix = f"did you mean {hint[0]!r}?" if hint else f"known: {sorted(known)}"
                raise GateError(
                    f"{path}: {name!r} is neither a case name nor a test id, so it would gate nothing; {fix}"
                )
    return data


def apply_overrides(base: Any, overrides: dict[str, dict[str, Any]], case_name: str, test_id: str) -> Any:
    """Case-level entries first, then the test id's (more specific wins); validated by the model."""
    merged = base.model_dump()
    for key in (case_name, test_id):
        merged.update(overrides.get(key, {}))
    try:
        return type(base).model_validate(merged)
    except ValidationError as exc:
        raise GateError(
            f"thresholds for {test_id}: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
        ) from None


# -- baselines --------------------------------------------------------------------------------
class Baseline(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int = 1
    created_utc: str
    hardware: dict[str, Any] = Field(default_factory=dict)
    results: dict[str, dict[str, Any]] = Field(
        description="test id → {metrics: {...}, engine_version, settings_digest}"
    )

    @field_validator("results")
    @classmethod
    def _metrics_are_numbers(cls, results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for test_id, entry in results.items():
            metrics = entry.get("metrics", {})
            if not isinstance(metrics, dict):
                raise ValueError(f"results.{test_id}.metrics is {type(metrics).__name__}, not a mapping")
            for metric, v in metrics.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"results.{test_id}.metrics.{metric} is {v!r}, not a finite number")
        return results

    @classmethod
    def load(cls, path: Path) -> Baseline:
        """A baseline file, or a session folder (or its session.yaml) taken as one."""
        if path.is_dir() or path.name == "session.yaml":
            return baseline_from_session(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise GateError(
                f"baseline {str(path)!r} is unusable: {exc}; re-create it with --harness-save-baseline"
            ) from None
        if not isinstance(data, dict):
            raise GateError(
                f"baseline {str(path)!r} is unusable: expected a mapping, got {type(data).__name__}; "
                "re-create it with --harness-save-baseline"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(_problem(e) for e in exc.errors())
            raise GateError(
                f"baseline {str(path)!r} is unusable: {problems}; fix it or re-create it with "
                "--harness-save-baseline"
            ) from None


def _problem(e: Any) -> str:
    where = ".".join(str(x) for x in e["loc"]) or "top level"
    msg = str(e["msg"]).removeprefix("Value error, ")
    return msg if msg.startswith(where) else f"{where}: {msg}"


def stable_args(argv: list[str], session_dir: str = "") -> list[str]:
    """Engine args that define the configuration: without the executable, the per-run port and the
    session folder (the simulator's settings file lives there: a new path every session)."""
    out: list[str] = []
    skip = False
    for a in argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--port", "--host"):
            skip = True
            continue
        out.append(a.replace(session_dir, "<session>") if session_dir else a)
    return out


def baseline_entry(result: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    engine = metadata.get("engine") or {}
    test_dir = (metadata.get("outputs") or {}).get("test_dir")
    return {
        "metrics": {
            k: v for k, v in metric_values(result).items() if k in BASELINE_METRICS and math.isfinite(v)
        },
        "status": result.get("status"),
        "engine_version": engine.get("version"),
        # Older metadata held absolute paths: their session folder becomes <session>, as new files have it.
        "engine_args": stable_args(
            engine.get("argv") or [],
            str(Path(test_dir).parent) if test_dir and Path(test_dir).is_absolute() else "",
        ),
        "settings": {
            k: (result.get("settings") or {}).get(k)
            for k in ("target_qps", "min_duration_ms", "min_query_count", "scenario")
        },
    }


def merge_repeats(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One baseline entry from the entries of a test's repeated runs: each metric's median, and every
    run's value under ``values`` (what makes a later comparison noise-aware)."""
    if len(entries) == 1:
        return entries[0]
    values: dict[str, list[float]] = {}
    for e in entries:
        for k, v in (e.get("metrics") or {}).items():
            values.setdefault(k, []).append(v)
    return {
        **entries[-1],
        "metrics": {k: float(statistics.median(v)) for k, v in values.items()},
        "values": values,
    }


def hardware_of(metadata: dict[str, Any]) -> dict[str, Any]:
    env = metadata.get("environment") or {}
    return {
        "cpu": (env.get("cpu") or {}).get("model"),
        "gpus": [g.get("name") for g in env.get("gpus") or []],
    }


def baseline_from_session(path: Path) -> Baseline:
    """Any session as a baseline: each test's entry from its result.yaml and metadata.yaml (repeated
    runs merged into medians with every run's values), created at the session's end.

    :raises GateError: not a session folder.
    """
    folder = path.parent if path.name == "session.yaml" else path
    entries: dict[str, list[dict[str, Any]]] = {}
    hardware: dict[str, Any] = {}
    finished = ""
    for rf in sorted(folder.glob("*/result.yaml")):
        try:
            result = yaml.safe_load(rf.read_text())
            metadata = yaml.safe_load((rf.parent / "metadata.yaml").read_text())
        except (OSError, yaml.YAMLError):
            continue  # a test that left no readable files has nothing to compare against
        if not isinstance(result, dict) or not isinstance(metadata, dict) or "test_id" not in result:
            continue
        entries.setdefault(str(result["test_id"]), []).append(baseline_entry(result, metadata))
        hardware = hardware or hardware_of(metadata)
        finished = max(finished, str(metadata.get("finished_utc") or ""))
    if not entries:
        raise GateError(
            f"{str(path)!r} is not a session folder (no */result.yaml with metadata.yaml); pass a baseline "
            "file from --harness-save-baseline or a harness_output/<session> folder"
        )
    return Baseline(
        created_utc=finished or dt.datetime.now(dt.timezone.utc).isoformat(),
        hardware=hardware,
        results={t: merge_repeats(e) for t, e in entries.items()},
    )


def save_baseline(path: Path, entries: dict[str, dict[str, Any]], hardware: dict[str, Any]) -> None:
    b = Baseline(created_utc=dt.datetime.now(dt.timezone.utc).isoformat(), hardware=hardware, results=entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_yaml(path, b.model_dump())


def compare_baseline(
    test_id: str,
    result: dict[str, Any],
    metadata: dict[str, Any],
    baseline: Baseline,
    max_regression_pct: float,
    per_metric_pct: dict[str, float],
) -> tuple[list[Violation], list[str], list[dict[str, Any]]]:
    """(violations, warnings, comparison rows) for one test against a stored baseline."""
    entry = baseline.results.get(test_id)
    if entry is None:
        return [], [f"{test_id}: not in the baseline (saved {baseline.created_utc})"], []
    warnings: list[str] = []
    now = baseline_entry(result, metadata)
    if hardware_of(metadata) != baseline.hardware:
        warnings.append(
            f"{test_id}: baseline hardware {baseline.hardware} differs from {hardware_of(metadata)}"
        )
    if now["engine_version"] != entry.get("engine_version"):
        warnings.append(
            f"{test_id}: engine version {now['engine_version']} vs baseline {entry.get('engine_version')}"
        )
    if now["settings"] != entry.get("settings") or now["engine_args"] != entry.get("engine_args"):
        warnings.append(f"{test_id}: LoadGen settings or engine args differ from the baseline's")
    violations: list[Violation] = []
    rows: list[dict[str, Any]] = []
    for metric, base in (entry.get("metrics") or {}).items():
        direction = BASELINE_METRICS.get(metric)
        cur = now["metrics"].get(metric)
        if direction is None or cur is None or not base:
            continue
        change_pct = (cur - base) / abs(base) * 100
        regression = -change_pct if direction == "higher_is_better" else change_pct
        allowed = per_metric_pct.get(metric, max_regression_pct)
        rows.append(
            {
                "test_id": test_id,
                "metric": metric,
                "baseline": base,
                "current": cur,
                "change_pct": round(change_pct, 2),
                "allowed_regression_pct": allowed,
                "regressed": regression > allowed,
            }
        )
        if regression > allowed:
            limit = (
                base * (1 - allowed / 100) if direction == "higher_is_better" else base * (1 + allowed / 100)
            )
            violations.append(
                Violation.make(
                    metric,
                    round(cur, 4),
                    round(limit, 4),
                    direction,
                    "baseline",
                    f"{regression:.1f}% worse than baseline {base:.4g} (allowed {allowed}%)",
                )
            )
    return violations, warnings, rows
