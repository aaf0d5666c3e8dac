"""Uploading records to an MLflow tracking server: find-or-create by result id, bounded HTTP, retries,
and the ``upload()`` behind ``tools/upload_to_mlflow.py`` (mlflow is imported only when used)."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml

if TYPE_CHECKING:
    pass

from .records import (
    BATCH_METRICS,
    BATCH_PARAMS,
    BATCH_TAGS,
    COMPLETE_TAG,
    DEFAULT_EXPERIMENT,
    RESULT_ID_TAG,
    UPLOAD_HTTP,
    RunRecord,
    UploadError,
    build_record,
    build_session_record,
    public_uri,
    scrub,
)

log = logging.getLogger("harness_fixtures.mlflow")


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

    from ...results import BenchmarkResult

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
    if not uri and s.dry_run:
        uri = "(none: a dry run contacts no server)"
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
