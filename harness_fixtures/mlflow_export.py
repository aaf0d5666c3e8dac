"""MLflow export of benchmark results: one run per test under one parent run per session.

Owns what a run holds (params, metrics, time series, tags, artifacts, built from a result dict, its
metadata dict and its folder), the find-or-create by a stable result id that makes uploads
idempotent, and both ways in: live (``MlflowLivePlugin``, registered by ``plugin.pytest_configure``)
and later (``upload()``, behind ``tools/upload_to_mlflow.py``). ``mlflow`` is imported only where a
run is logged. Credentials are never handled here: MLflow reads ``MLFLOW_TRACKING_TOKEN`` /
``_USERNAME`` / ``_PASSWORD`` from the environment itself, and their values are scrubbed from every
param and tag.
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
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import yaml
from pluggy import HookimplMarker

if TYPE_CHECKING:
    import pytest

log = logging.getLogger("harness_fixtures.mlflow")
# pytest's own marker (pytest.hookimpl is this object); taken from pluggy so that the upload tool,
# which imports this module, does not import pytest.
hookimpl = HookimplMarker("pytest")

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
# Files of a test folder logged as artifacts (requests.jsonl is left out: prompts and outputs, large).
TEST_FILES = (
    "result.yaml",
    "metadata.yaml",
    "harness.log",
    "timeline.csv",
    "client.json",
    "run_spec.json",
    "accuracy.txt",
)
TEST_DIRS = ("mlperf", "plots")
# Live logging must cost seconds, not minutes, when the server is down or slow.
# (timeout s, retries, backoff factor) of each MLflow HTTP request.
LIVE_HTTP = (5, 1, 1)
UPLOAD_HTTP = (60, 1, 1)
SECRET_ENV = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME")
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. :/]")
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


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
    """The session folder's name as recorded (stable when the folder is moved or copied)."""
    return Path(str((metadata.get("outputs") or {}).get("test_dir", ""))).parent.name


def result_id_of(metadata: dict[str, Any], test_id: str) -> str:
    key = "\0".join((session_name_of(metadata), test_id, str(metadata.get("started_utc", ""))))
    return hashlib.sha256(key.encode()).hexdigest()


def session_id_of(metadata: dict[str, Any]) -> str:
    hostname = str((metadata.get("environment") or {}).get("hostname", ""))
    return hashlib.sha256("\0".join(("session", session_name_of(metadata), hostname)).encode()).hexdigest()


def scrub(text: str) -> str:
    """Credential values from the environment and user:password@ in URLs → ``***``."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return _USERINFO.sub("***@", text)


def public_uri(uri: str) -> str:
    """A tracking URI without user:password, fit for messages and files."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        parts = parts._replace(netloc=host + (f":{parts.port}" if parts.port else ""))
    return urlunsplit(parts)


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


def read_timeline(path: Path, started_ms: int) -> list[SeriesPoint]:
    """timeline.csv (``t_s,source,series,value`` after a ``# ... t0_unix_s=`` line) → stepped points,
    step = milliseconds since the test's t0."""
    points: list[SeriesPoint] = []
    t0_ms: float = started_ms
    with path.open(newline="") as fh:
        lines = []
        for line in fh:
            if line.startswith("#"):
                m = re.search(r"t0_unix_s=([0-9.]+)", line)
                if m:
                    t0_ms = float(m.group(1)) * 1000
                continue
            lines.append(line)
    for row in csv.DictReader(lines):
        try:
            t_s = float(row["t_s"])
            value = float(row["value"])
        except (KeyError, TypeError, ValueError):
            continue
        if not (math.isfinite(t_s) and math.isfinite(value)):
            continue
        key = _key(f"timeline.{row.get('source')}.{row.get('series')}")
        points.append(SeriesPoint(key, value, int(t0_ms + t_s * 1000), round(t_s * 1000)))
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
    run_options = metadata.get("run_options") or {}
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
        "dataset.sample_count": run_options.get("sample_count"),
        "dataset.performance_sample_count": settings.get("performance_sample_count"),
        "git.sha": (env.get("git") or {}).get("sha"),
        "git.dirty": (env.get("git") or {}).get("dirty"),
    }
    for k, v in settings.items():
        p[f"loadgen.{k}"] = v
    for k, v in (case.get("generation") or {}).items():
        p[f"generation.{k}"] = v if v not in ({}, []) else None
    for k, v in run_options.items():
        p[f"run.{k}"] = v
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
        if k not in NOT_METRICS and k != "telemetry":
            _flatten_numbers(v, k, rec.metrics)
    # telemetry.summary.engine.running.mean → telemetry.engine.running.mean
    _flatten_numbers(
        {**telemetry, **(telemetry.get("summary") or {}), "summary": None}, "telemetry", rec.metrics
    )
    timeline = _relocate(telemetry.get("timeline"), recorded_dir, actual_dir)
    if timeline is None and (actual_dir / "timeline.csv").is_file():
        timeline = actual_dir / "timeline.csv"
    if timeline is not None:
        try:
            rec.series = read_timeline(timeline, started_ms)
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
@contextmanager
def http_limits(timeout_s: int, max_retries: int, backoff_factor: int, *, override: bool) -> Iterator[None]:
    """MLflow's HTTP timeout/retries for the calls inside (read from the environment per request);
    ``override=False`` keeps values the user set. Also silences MLflow's "View run" stdout lines and
    its warnings (pytest's ``filterwarnings = error`` would turn them into exceptions)."""
    wanted = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(backoff_factor),
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    }
    saved = {k: os.environ.get(k) for k in wanted}
    for k, v in wanted.items():
        if override or k not in os.environ:
            os.environ[k] = v
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


def is_transient(exc: BaseException) -> bool:
    """Connection refused/reset, timeouts, 408/429/5xx: worth another try."""
    import requests

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError)):
            return True
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        response = getattr(e, "response", None)
        if getattr(response, "status_code", None) in (408, 429, 500, 502, 503, 504):
            return True
        if getattr(e, "error_code", None) in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        e = e.__cause__ or e.__context__
    return False


def describe(exc: BaseException) -> str:
    """One line: the exception without MLflow's long URL-and-pool prose where a cause says more."""
    text = " ".join(str(exc).split())
    m = re.search(r"\[Errno \d+\] [^\"')]+", text)
    if m:
        text = f"{text.split(' failed with exception')[0]}: {m.group(0)}"
    return scrub(f"{type(exc).__name__}: {text}")[:500]


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class MlflowTarget:
    """One tracking server and experiment; runs are found or created by their result id."""

    def __init__(self, tracking_uri: str, experiment_name: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self._client: Any = None
        self.experiment_id: str | None = None

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                from mlflow.tracking import MlflowClient
            except ImportError:
                raise UploadError(
                    "mlflow is not installed in this environment; pip install 'harness-fixtures[mlflow]'"
                ) from None
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def connect(self) -> str:
        """The experiment's id, created if needed (the first call that reaches the server)."""
        if self.experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                try:
                    self.experiment_id = str(self.client.create_experiment(self.experiment_name))
                except Exception:
                    exp = self.client.get_experiment_by_name(self.experiment_name)  # created meanwhile
                    if exp is None:
                        raise
                    self.experiment_id = str(exp.experiment_id)
            else:
                self.experiment_id = str(exp.experiment_id)
        return self.experiment_id

    def run_url(self, run_id: str) -> str | None:
        uri = public_uri(self.tracking_uri)
        if not uri.startswith(("http://", "https://")):
            return None
        return f"{uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"

    def find(self, result_id: str) -> Any | None:
        runs = self.client.search_runs(
            [self.connect()], filter_string=f"tags.`{RESULT_ID_TAG}` = '{result_id}'", max_results=5
        )
        if not runs:
            return None
        # Prefer a complete run, then the oldest: stable when a crash ever left two.
        runs = sorted(runs, key=lambda r: (r.data.tags.get(COMPLETE_TAG) != "true", r.info.start_time))
        return runs[0]

    def start(self, rec: RunRecord, parent_run_id: str | None) -> tuple[str, str]:
        """(run id, ``created`` | ``resumed`` | ``exists``) of the run for ``rec``; nothing logged yet."""
        existing = self.find(rec.result_id)
        if existing is not None:
            state = "exists" if existing.data.tags.get(COMPLETE_TAG) == "true" else "resumed"
            return str(existing.info.run_id), state
        tags = dict(rec.tags)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.connect(), tags=tags, run_name=rec.run_name)
        return str(run.info.run_id), "created"

    def log(self, rec: RunRecord, parent_run_id: str | None = None) -> tuple[str, str]:
        """Log ``rec`` (skipped when a complete run with its result id exists; a partial one is
        completed). Returns (run id, ``created`` | ``resumed`` | ``exists``)."""
        from mlflow.entities import Metric, Param, RunTag

        run_id, state = self.start(rec, parent_run_id)
        c = self.client
        if state == "exists":
            extra = {k: v for k, v in rec.tags.items() if k.startswith("user.")}
            for k, v in extra.items():
                c.set_tag(run_id, k, v)
            return run_id, state
        tags = dict(rec.tags)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        for chunk in _chunks([Param(k, v) for k, v in sorted(rec.params.items())], BATCH_PARAMS):
            c.log_batch(run_id, params=chunk)
        for tchunk in _chunks([RunTag(k, v) for k, v in tags.items()], BATCH_TAGS):
            c.log_batch(run_id, tags=tchunk)
        ts = rec.metrics_timestamp_ms or int(time.time() * 1000)
        metrics = [Metric(k, v, ts, 0) for k, v in sorted(rec.metrics.items())]
        metrics += [Metric(p.key, p.value, p.timestamp_ms, p.step) for p in rec.series]
        for mchunk in _chunks(metrics, BATCH_METRICS):
            c.log_batch(run_id, metrics=mchunk)
        for path, artifact_dir in rec.files:
            if path.is_dir():
                c.log_artifacts(run_id, str(path), artifact_dir)
            else:
                c.log_artifact(run_id, str(path), artifact_dir)
        for name, content in rec.dicts.items():
            c.log_dict(run_id, content, name)
        c.set_tag(run_id, COMPLETE_TAG, "true")
        c.set_terminated(run_id, rec.status)
        return run_id, state


# -- upload of recorded results -------------------------------------------------------------------
@dataclass
class UploadSettings:
    """Command-line overrides of what the metadata holds."""

    tracking_uri: str | None = None
    experiment_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False
    retries: int = 3
    backoff_s: float = 1.0


def tracking_uri_from(host: str | None, port: int | None) -> str | None:
    """``--mlflow-host`` / ``--mlflow-port`` as the seed script took them (http, port 5000)."""
    if host is None and port is None:
        return None
    host = (host or "localhost").rstrip("/")
    if "://" not in host:
        host = f"http://{host}"
    if port is None and urlsplit(host).port is not None:
        return host
    return f"{host}:{port or 5000}"


def find_metadata(metadata_file: Path | None, results_dir: Path | None) -> list[Path]:
    """The metadata.yaml files to upload; UploadError when there are none."""
    if metadata_file is not None:
        if not metadata_file.is_file():
            raise UploadError(f"--metadata-file {str(metadata_file)!r} does not exist")
        return [metadata_file]
    assert results_dir is not None
    if not results_dir.is_dir():
        raise UploadError(f"--results-dir {str(results_dir)!r} is not a folder")
    files = sorted(results_dir.glob("*/metadata.yaml"))
    if not files:
        raise UploadError(
            f"no */metadata.yaml in {str(results_dir)!r}; pass one session folder "
            "(harness_output/<YYYYmmdd-HHMMSS>), not the output root"
        )
    return files


def load_test(metadata_file: Path) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(result, metadata, notes) of one test folder; the result is read through BenchmarkResult."""
    from pydantic import ValidationError

    from .results import BenchmarkResult

    notes: list[str] = []
    try:
        metadata = yaml.safe_load(metadata_file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UploadError(f"cannot read {str(metadata_file)!r}: {exc}") from None
    if not isinstance(metadata, dict) or "test_id" not in metadata:
        raise UploadError(f"{str(metadata_file)!r} is not a harness metadata.yaml (no test_id)")
    result_file = metadata_file.parent / "result.yaml"
    try:
        result = BenchmarkResult.load(result_file).model_dump(mode="json")
    except (OSError, yaml.YAMLError) as exc:
        raise UploadError(f"cannot read {str(result_file)!r}: {exc}") from None
    except ValidationError as exc:
        # A file of another harness version: its numbers are still worth logging as they are.
        raw = yaml.safe_load(result_file.read_text())
        if not isinstance(raw, dict) or "status" not in raw:
            raise UploadError(f"{str(result_file)!r} is not a harness result.yaml: {exc}") from None
        notes.append(f"{result_file}: not this harness version's schema ({exc.error_count()} differences)")
        result = raw
    return result, metadata, notes


def _target_for(metadata: dict[str, Any], s: UploadSettings) -> tuple[str, str]:
    recorded = metadata.get("mlflow") or {}
    uri = s.tracking_uri or recorded.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UploadError(
            "no MLflow tracking URI: pass --mlflow-tracking-uri URI (or --mlflow-host/--mlflow-port), "
            "or set MLFLOW_TRACKING_URI"
        )
    exp = (
        s.experiment_name
        or recorded.get("experiment_name")
        or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        or DEFAULT_EXPERIMENT
    )
    return str(uri), str(exp)


def _print_record(rec: RunRecord, out: Callable[[str], None], indent: str = "  ") -> None:
    out(f"{indent}params ({len(rec.params)}):")
    for k, v in sorted(rec.params.items()):
        out(f"{indent}  {k} = {v if len(v) <= 200 else v[:200] + '...'}")
    out(f"{indent}metrics ({len(rec.metrics)}):")
    for k, n in sorted(rec.metrics.items()):
        out(f"{indent}  {k} = {n:g}")
    keys = sorted({p.key for p in rec.series})
    out(f"{indent}time series ({len(keys)} series, {len(rec.series)} points, step = ms since t0):")
    for k in keys:
        out(f"{indent}  {k}")
    out(f"{indent}tags ({len(rec.tags)}):")
    for k, v in sorted(rec.tags.items()):
        v1 = v.splitlines()[0] if v else v
        out(f"{indent}  {k} = {v1 if len(v1) <= 200 else v1[:200] + '...'}")
    out(f"{indent}artifacts:")
    for path, artifact_dir in rec.files:
        out(f"{indent}  {path}{'/' if path.is_dir() else ''} -> {artifact_dir or '.'}")
    for name in rec.dicts:
        out(f"{indent}  (from the result dict) -> {name}")
    for m in rec.missing:
        out(f"{indent}  missing: {m}")


def _with_retries(
    what: str,
    s: UploadSettings,
    out: Callable[[str], None],
    fn: Callable[..., tuple[str, str]],
    *args: Any,
) -> tuple[str, str]:
    """``fn(*args)``, again after 1, 2, 4 ... s while it fails on a connection error (it is
    idempotent: a retry finds the run the failed try created and completes it)."""
    delay = s.backoff_s
    for attempt in range(s.retries + 1):
        try:
            return fn(*args)
        except UploadError:
            raise
        except Exception as exc:
            if not is_transient(exc) or attempt == s.retries:
                raise
            out(f"{what}: {describe(exc)}; retry {attempt + 1}/{s.retries} in {delay:g} s")
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def upload(
    metadata_files: list[Path],
    s: UploadSettings,
    out: Callable[[str], None] = print,
    err: Callable[[str], None] = _stderr,
) -> int:
    """Upload tests (their folders hold metadata.yaml + result.yaml) and their sessions' parent runs.

    Reads files only. Returns the exit status: 0 all uploaded (or already there), 1 otherwise.
    """
    tests = []
    for mf in metadata_files:
        result, metadata, notes = load_test(mf)
        for n in notes:
            err(f"note: {n}")
        tests.append((mf, result, metadata))
    targets: dict[tuple[str, str], MlflowTarget] = {}
    parents: dict[tuple[str, str, str], str] = {}
    done: list[str] = []
    if s.dry_run:
        out("dry run: nothing is sent to MLflow")
    for mf, result, metadata in tests:
        uri, exp = _target_for(metadata, s)
        test_dir = mf.parent
        extra = {f"user.{k}": scrub(v) for k, v in s.tags.items()}
        rec = build_record(result, metadata, test_dir, source="upload", extra_tags=extra)
        parent = build_session_record(metadata, test_dir.parent, source="upload")
        parent.tags.update(extra)
        test_id = rec.run_name
        pkey = (uri, exp, parent.result_id)
        if s.dry_run:
            if pkey not in parents:
                parents[pkey] = parent.result_id
                out(f"tracking URI: {public_uri(uri)}  experiment: {exp}")
                out(f"session run {parent.run_name!r} (result id {parent.result_id[:12]}):")
                _print_record(parent, out)
            out(f"run {test_id!r} (result id {rec.result_id[:12]}), child of {parent.run_name!r}:")
            _print_record(rec, out)
            done.append(test_id)
            continue
        target = targets.setdefault((uri, exp), MlflowTarget(uri, exp))
        try:
            with http_limits(*UPLOAD_HTTP, override=False):
                if pkey not in parents:
                    parents[pkey], pstate = _with_retries(parent.run_name, s, err, target.log, parent, None)
                    out(f"{parent.run_name}: {_WORDS[pstate]} run {parents[pkey]} in experiment {exp!r}")
                parent_id = parents[pkey]
                run_id, state = _with_retries(test_id, s, err, target.log, rec, parent_id)
        except Exception as exc:
            msg = str(exc) if isinstance(exc, UploadError) else describe(exc)
            err(f"error: {test_id}: upload to {public_uri(uri)} failed: {msg}")
            if isinstance(exc, UploadError) or is_transient(exc):
                break  # the same server is down for the rest too
            continue
        done.append(test_id)
        url = target.run_url(run_id)
        out(f"{test_id}: {_WORDS[state]} run {run_id}" + (f" ({url})" if url else ""))
    if len(done) < len(tests):
        left = [str(r.get("test_id")) for _, r, _ in tests if str(r.get("test_id")) not in done]
        err(
            f"error: {len(left)} of {len(tests)} results not uploaded ({', '.join(left)}); "
            "nothing on disk was changed: fix the cause and run the same command again"
        )
        return 1
    return 0


_WORDS = {"exists": "already uploaded as", "created": "uploaded as", "resumed": "completed"}


# -- live logging (pytest) ------------------------------------------------------------------------
class MlflowLivePlugin:
    """Logs each benchmark result as it is final; registered on the controller by plugin.py.

    Never fails or slows a benchmark for long: every MLflow call runs under short HTTP limits, the
    first failure stops logging for the rest of the session, and the terminal summary then says,
    once, how to upload the results on disk later.
    """

    def __init__(self, config: pytest.Config, tracking_uri: str, experiment: str) -> None:
        self.config = config
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.target = MlflowTarget(tracking_uri, experiment)
        self.parent_run_id: str | None = None
        self.session_dir: Path | None = None
        self.logged: list[str] = []
        self.failure: str | None = None

    def _fail(self, what: str, exc: BaseException) -> None:
        self.failure = f"{what}: {describe(exc) if not isinstance(exc, UploadError) else exc}"
        log.warning("MLflow live logging stopped: %s", self.failure)

    @hookimpl(trylast=True)
    def pytest_harness_result(
        self, config: pytest.Config, item_id: str, result: dict[str, Any], metadata: dict[str, Any]
    ) -> None:
        # trylast and registered after the reporter: result.yaml / metadata.yaml are written by now.
        test_dir = Path(str((metadata.get("outputs") or {}).get("test_dir", ".")))
        self.session_dir = test_dir.parent
        if self.failure is not None:
            return
        try:
            with http_limits(*LIVE_HTTP, override=True):
                if self.parent_run_id is None:
                    parent = build_session_record(metadata, None, source="live")
                    self.parent_run_id, _ = self.target.start(parent, None)
                    self._log_parent_fields(parent)
                rec = build_record(result, metadata, test_dir, source="live")
                run_id, _ = self.target.log(rec, self.parent_run_id)
            self.logged.append(run_id)
        except Exception as exc:
            self._fail(str(result.get("test_id")), exc)

    def _log_parent_fields(self, parent: RunRecord) -> None:
        from mlflow.entities import Param, RunTag

        assert self.parent_run_id is not None
        self.target.client.log_batch(
            self.parent_run_id,
            params=[Param(k, v) for k, v in parent.params.items()],
            tags=[RunTag(k, v) for k, v in parent.tags.items()],
        )

    @hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        # trylast: the reporter's session.yaml is written by now.
        if self.parent_run_id is None or self.failure is not None:
            return
        status = "FINISHED" if int(exitstatus) in (0, 1) else "KILLED" if int(exitstatus) == 2 else "FAILED"
        try:
            with http_limits(*LIVE_HTTP, override=True):
                c = self.target.client
                if self.session_dir is not None and (self.session_dir / "session.yaml").is_file():
                    c.log_artifact(self.parent_run_id, str(self.session_dir / "session.yaml"))
                c.set_tag(self.parent_run_id, COMPLETE_TAG, "true")
                c.set_terminated(self.parent_run_id, status)
        except Exception as exc:
            self._fail("session run", exc)

    def upload_command(self) -> str:
        """The command that uploads this session later (the tool of this source tree)."""
        tool = Path(__file__).resolve().parents[1] / "tools" / "upload_to_mlflow.py"
        tool_arg = str(tool) if tool.is_file() else "tools/upload_to_mlflow.py"
        here = self.config.invocation_params.dir
        if tool.is_file() and tool.is_relative_to(here):
            tool_arg = str(tool.relative_to(here))
        argv = [
            sys.executable,
            tool_arg,
            "--results-dir",
            str(self.session_dir),
            "--mlflow-tracking-uri",
            public_uri(self.tracking_uri),
            "--mlflow-experiment-name",
            self.experiment,
        ]
        return shlex.join(argv)

    @hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        tr = terminalreporter
        if self.failure is not None and self.session_dir is not None:
            tr.write_line(
                f"WARNING: MLflow live logging to {public_uri(self.tracking_uri)} failed ({self.failure}); "
                f"{len(self.logged)} run(s) logged, all results are on disk. Upload them later with: "
                f"{self.upload_command()}",
                yellow=True,
            )
        elif self.logged:
            url = self.target.run_url(self.parent_run_id or "")
            tr.write_line(
                f"MLflow: {len(self.logged)} run(s) in experiment {self.experiment!r} "
                f"at {public_uri(self.tracking_uri)}" + (f": {url}" if url else "")
            )
