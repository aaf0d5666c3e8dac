"""What an MLflow run of a benchmark result holds: params, metrics, time series, tags and artifacts,
built from a test's result dict, its metadata dict and its folder, and the stable ids that make
uploads idempotent. The same records serve live logging (exporters.mlflow.live) and later uploads
(exporters.mlflow.upload). Credential values never reach a record: MLflow reads them from the
environment itself, and every param and tag is scrubbed.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import logging
import math
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

from ... import redaction
from ...metrics.timeline import read_timeline

log = logging.getLogger("harness_fixtures.mlflow")
DEFAULT_EXPERIMENT = "harness-fixtures"
RESULT_ID_TAG = "harness.result_id"
COMPLETE_TAG = "harness.complete"
# MLflow's limits: 6000 characters per param value (>= 2.x), 8000 per tag value; per log_batch call
# 100 params, 100 tags, 1000 metrics.
MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 5000
BATCH_PARAMS = 100
BATCH_TAGS = 100
BATCH_METRICS = 1000
# Result fields that are not metrics: settings are params, the rest text or paths.
NOT_METRICS = frozenset({"schema_version", "settings", "paths", "gate", "baseline"})
# Files of a test folder logged as artifacts. requests.jsonl holds timings and token counts per
# request (no prompts, no text).
TEST_FILES = (
    "result.yaml",
    "metadata.yaml",
    "result.json",
    "harness.log",
    "timeline.csv",
    "requests.jsonl",
    "user.conf",
    "client.json",
    "run_spec.json",
    "accuracy.txt",
)
TEST_DIRS = ("mlperf", "plots", "TEST06", "accuracy")
# Live logging must cost seconds, not minutes, when the server is down or slow.
# (timeout s, retries, backoff factor) of each MLflow HTTP request.
LIVE_HTTP = (5, 1, 1)
UPLOAD_HTTP = (60, 1, 1)
SECRET_ENV = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME")
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. :/]")


class UploadError(Exception):
    """An upload could not be done; the message says why and what to do."""


# -- what a run holds -----------------------------------------------------------------------------
@dataclass
class SeriesPoint:
    key: str
    value: float
    timestamp_ms: int
    step: int


@dataclass
class RunRecord:
    """Everything one MLflow run will hold; built without MLflow, so a dry run needs no server."""

    result_id: str
    run_name: str
    status: str = "FINISHED"
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_timestamp_ms: int = 0
    series: list[SeriesPoint] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    files: list[tuple[Path, str | None]] = field(default_factory=list)  # (file or dir, artifact dir)
    dicts: dict[str, dict[str, Any]] = field(default_factory=dict)  # artifact file name → content
    missing: list[str] = field(default_factory=list)


def session_name_of(metadata: dict[str, Any]) -> str:
    """The session folder's name as recorded (stable when the folder is moved or copied); files
    written before metadata had ``session`` give it as their absolute test folder's parent."""
    if metadata.get("session"):
        return str(metadata["session"])
    return Path(str((metadata.get("outputs") or {}).get("test_dir", ""))).parent.name


def result_id_of(metadata: dict[str, Any], test_id: str) -> str:
    key = "\0".join((session_name_of(metadata), test_id, str(metadata.get("started_utc", ""))))
    return hashlib.sha256(key.encode()).hexdigest()


def session_id_of(metadata: dict[str, Any]) -> str:
    hostname = str((metadata.get("environment") or {}).get("hostname", ""))
    return hashlib.sha256("\0".join(("session", session_name_of(metadata), hostname)).encode()).hexdigest()


def scrub(text: str) -> str:
    """Secret values from the environment and user:password@ in URLs → ``***`` (one redaction for
    every file, log line and MLflow field: harness_fixtures.redaction)."""
    return redaction.text(text, [os.environ.get(name, "") for name in SECRET_ENV])


def public_uri(uri: str) -> str:
    """A tracking URI without its credentials, fit for messages and files."""
    return redaction.scrub_url(uri)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _key(text: str) -> str:
    return _KEY_BAD.sub("_", text)[:250]


def _flatten_numbers(data: Any, prefix: str, out: dict[str, float]) -> None:
    if isinstance(data, dict):
        for k, v in data.items():
            _flatten_numbers(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif (n := _number(data)) is not None:
        out[_key(prefix)] = n


def _ms(iso: Any) -> int | None:
    try:
        return int(dt.datetime.fromisoformat(str(iso)).timestamp() * 1000)
    except ValueError:
        return None


def _text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def series_points(path: Path, started_ms: int) -> list[SeriesPoint]:
    """timeline.csv → stepped points, step = milliseconds since the test's t0 (its wall time from the
    file, else ``started_ms``)."""
    timeline = read_timeline(path)
    t0_ms = timeline.t0_unix_s * 1000 if timeline.t0_unix_s is not None else float(started_ms)
    points: list[SeriesPoint] = []
    for sample in timeline.samples:
        if not (math.isfinite(sample.t_s) and math.isfinite(sample.value)):
            continue
        key = _key(f"timeline.{sample.source}.{sample.series}")
        step = round(sample.t_s * 1000)
        points.append(SeriesPoint(key, sample.value, int(t0_ms + sample.t_s * 1000), step))
    return points


def _relocate(recorded: Any, recorded_root: Path, actual_root: Path) -> Path | None:
    """A path recorded under the session folder, found where that folder is now."""
    if not recorded:
        return None
    p = Path(str(recorded))
    try:
        candidate = actual_root / p.relative_to(recorded_root)
    except ValueError:
        candidate = p
    if candidate.exists():
        return candidate
    return p if p.exists() else None


def _hardware_tags(metadata: dict[str, Any]) -> dict[str, str]:
    env = metadata.get("environment") or {}
    tags: dict[str, str] = {}
    cpu = env.get("cpu") or {}
    if cpu.get("model"):
        tags["hardware.cpu"] = f"{cpu.get('model')} ({cpu.get('logical_cores')} cores)"
    gpus = [str(g.get("name")) for g in env.get("gpus") or [] if isinstance(g, dict)]
    tags["hardware.gpu"] = ", ".join(f"{gpus.count(n)} x {n}" for n in dict.fromkeys(gpus)) or "none"
    for key, name in (
        ("hostname", "hardware.hostname"),
        ("memory_gib", "hardware.memory_gib"),
        ("os", "hardware.os"),
    ):
        if env.get(key) is not None:
            tags[name] = str(env[key])
    return tags


def _params(result: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    case = metadata.get("case") or {}
    engine = metadata.get("engine") or {}
    case_engine = case.get("engine") or {}
    dataset = case.get("dataset") or {}
    run_spec = metadata.get("run_spec") or {}
    client = run_spec.get("client") or {}
    settings = result.get("settings") or {}
    env = metadata.get("environment") or {}
    p: dict[str, Any] = {
        "test_id": result.get("test_id"),
        "model": result.get("model"),
        "scenario": result.get("scenario"),
        "mode": result.get("mode"),
        "loadgen_model": result.get("loadgen_model"),
        "engine.kind": engine.get("kind") or case_engine.get("kind"),
        "engine.version": engine.get("version"),
        "engine.model": case_engine.get("model") or None,
        "engine.served_model": engine.get("served_model"),
        "engine.args": case_engine.get("args") or None,
        "engine.argv": shlex.join(str(a) for a in engine["argv"]) if engine.get("argv") else None,
        "dataset.path": dataset.get("path"),
        "dataset.format": dataset.get("format"),
        "dataset.max_samples": dataset.get("max_samples"),
        "dataset.sample_count": client.get("sample_count"),
        "dataset.performance_sample_count": settings.get("performance_sample_count"),
        "git.sha": (env.get("git") or {}).get("sha"),
        "git.dirty": (env.get("git") or {}).get("dirty"),
    }
    for k, v in settings.items():
        p[f"loadgen.{k}"] = v
    for k, v in (case.get("generation") or {}).items():
        p[f"generation.{k}"] = v if v not in ({}, []) else None
    # The run's own settings (what LoadGen and the client were told), not where its files went.
    for k, v in run_spec.items():
        if not isinstance(v, dict) and k not in ("out_dir", "test_id", "t0_monotonic_ns"):
            p[f"run.{k}"] = v
    for k in ("request_timeout_s", "max_connections", "api_key_env", "sample_count"):
        p[f"run.{k}"] = client.get(k, (client.get("http") or {}).get(k))
    for k, v in (env.get("packages") or {}).items():
        p[f"package.{k}"] = v
    return p


def build_record(
    result: dict[str, Any],
    metadata: dict[str, Any],
    test_dir: Path | None = None,
    *,
    source: str = "upload",
    extra_tags: dict[str, str] | None = None,
) -> RunRecord:
    """One test's run, from its result and metadata dicts and the folder its files are in now.

    :param test_dir: where the test's files are (default: the recorded ``outputs.test_dir``).
    :param source: ``live`` or ``upload``, kept as a tag.
    """
    outputs = metadata.get("outputs") or {}
    recorded_dir = Path(str(outputs.get("test_dir") or "."))
    actual_dir = test_dir or recorded_dir
    test_id = str(result.get("test_id") or metadata.get("test_id"))
    rid = result_id_of(metadata, test_id)
    status = str(result.get("status"))
    gate = result.get("gate") or []
    started_ms = _ms(metadata.get("started_utc")) or int(time.time() * 1000)
    rec = RunRecord(
        result_id=rid,
        run_name=test_id,
        status={"ERROR": "FAILED", "TIMEOUT": "FAILED", "INTERRUPTED": "KILLED"}.get(status, "FINISHED"),
        metrics_timestamp_ms=_ms(metadata.get("finished_utc")) or started_ms,
    )
    for k, v in _params(result, metadata).items():
        if v is not None and v != "":
            rec.params[_key(k)] = scrub(_text(v))[:MAX_PARAM_CHARS]
    telemetry = result.get("telemetry") or {}
    for k, v in result.items():
        if k not in NOT_METRICS and k not in ("telemetry", "endpoints"):
            _flatten_numbers(v, k, rec.metrics)
    # A run over several endpoints: each one's numbers under its index (endpoints.1.ttft_ms_p99), so
    # MLflow can chart one replica against the others across runs.
    for ep in result.get("endpoints") or []:
        if isinstance(ep, dict) and isinstance(ep.get("index"), int):
            _flatten_numbers(
                {k: v for k, v in ep.items() if k != "index"}, f"endpoints.{ep['index']}", rec.metrics
            )
    # telemetry.summary.engine.running.mean → telemetry.engine.running.mean
    _flatten_numbers(
        {**telemetry, **(telemetry.get("summary") or {}), "summary": None}, "telemetry", rec.metrics
    )
    timeline = _relocate(telemetry.get("timeline"), recorded_dir, actual_dir)
    if timeline is None and (actual_dir / "timeline.csv").is_file():
        timeline = actual_dir / "timeline.csv"
    if timeline is not None:
        try:
            rec.series = series_points(timeline, started_ms)
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            rec.missing.append(f"timeline {timeline}: {exc}")
    summary = f"{test_id}: {status}"
    for key, label in (("tokens_per_s", "tok/s"), ("samples_per_s", "samples/s")):
        if (n := _number(result.get(key))) is not None:
            summary += f", {n:.1f} {label}"
    ttft = (result.get("ttft_ms") or {}).get("p99")
    if _number(ttft) is not None:
        summary += f", TTFT p99 {ttft} ms"
    tags = {
        RESULT_ID_TAG: rid,
        "harness.kind": "test",
        "harness.session": session_name_of(metadata),
        "harness.session_id": session_id_of(metadata),
        "harness.test_id": test_id,
        "harness.nodeid": str(metadata.get("nodeid", "")),
        "harness.logged_by": source,
        "harness.started_utc": str(metadata.get("started_utc", "")),
        "status": status,
        "gate": "pass" if not gate else "fail",
        "engine_alive": str(result.get("engine_alive")).lower(),
        "mlflow.runName": test_id,
        "mlflow.source.name": "harness-fixtures",
        "mlflow.note.content": summary,
        **_hardware_tags(metadata),
    }
    if gate:
        tags["gate.violations"] = "\n".join(str(v.get("message", v)) for v in gate if isinstance(v, dict))
    if result.get("reason"):
        tags["reason"] = str(result["reason"])
    if sha := ((metadata.get("environment") or {}).get("git") or {}).get("sha"):
        tags["mlflow.source.git.commit"] = str(sha)
    for name, st in (telemetry.get("collectors") or {}).items():
        tags[f"telemetry.{name}"] = str(st)
    tags.update(extra_tags or {})
    rec.tags = {_key(k): scrub(v)[:MAX_TAG_CHARS] for k, v in tags.items() if v != ""}
    # Artifacts: the folder's files where they are now; result/metadata YAML from the dicts if absent.
    for name in TEST_FILES:
        p = actual_dir / name
        if p.is_file():
            rec.files.append((p, None))
        elif name == "result.yaml":
            rec.dicts[name] = result
        elif name == "metadata.yaml":
            rec.dicts[name] = metadata
    for name in TEST_DIRS:
        p = actual_dir / name
        if p.is_dir() and any(p.iterdir()):
            rec.files.append((p, name))
    engine_log = _relocate((metadata.get("engine") or {}).get("log"), recorded_dir.parent, actual_dir.parent)
    if engine_log is not None and engine_log.is_file():
        rec.files.append((engine_log, "engine"))
    elif (metadata.get("engine") or {}).get("log"):
        rec.missing.append(f"engine log {metadata['engine']['log']}")
    return rec


def build_session_record(
    metadata: dict[str, Any], session_dir: Path | None, *, source: str = "upload"
) -> RunRecord:
    """The parent run of a session, from any one of its tests' metadata."""
    name = session_name_of(metadata)
    env = metadata.get("environment") or {}
    tags = {
        RESULT_ID_TAG: session_id_of(metadata),
        "harness.kind": "session",
        "harness.session": name,
        "harness.logged_by": source,
        "mlflow.runName": f"session {name}",
        "mlflow.source.name": "harness-fixtures",
        "harness.command_line": shlex.join(str(a) for a in metadata.get("command_line") or []),
        **_hardware_tags(metadata),
    }
    if sha := (env.get("git") or {}).get("sha"):
        tags["mlflow.source.git.commit"] = str(sha)
    rec = RunRecord(
        result_id=session_id_of(metadata),
        run_name=f"session {name}",
        tags={_key(k): scrub(v)[:MAX_TAG_CHARS] for k, v in tags.items() if v != ""},
    )
    if sha:
        rec.params["git.sha"] = str(sha)
    if session_dir is not None and (session_dir / "session.yaml").is_file():
        rec.files.append((session_dir / "session.yaml", None))
    return rec


# -- talking to MLflow ----------------------------------------------------------------------------
