"""MLflow export: run records from result dicts (unit), then against a real ``mlflow server`` (sqlite,
served artifacts): uploading a recorded session, uploading again, live logging during simulator runs,
an unreachable server, and credentials that must never reach a file."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harness_fixtures.exporters.mlflow.records import (
    RESULT_ID_TAG,
    build_record,
    build_session_record,
    public_uri,
    series_points,
)
from harness_fixtures.exporters.mlflow.upload import tracking_uri_from
from harness_fixtures.results import BenchmarkResult, Violation

if TYPE_CHECKING:
    pass

TOKEN = f"sekrit-{uuid.uuid4().hex}"
ACCURACY = {
    "scores": {"rouge1": 38.91, "rouge2": 16.02, "rougeL": 24.5, "gen_len": 812.0},
    "target": {"rouge1": 38.0},
}
# MLflow must not phone home from a test, nor read a developer's own tracking settings.
# The server's background job runner (four huey consumers) is not needed for tracking; it doubles the
# start time and ignores SIGTERM.


# -- a real MLflow server ---------------------------------------------------------------------------


# -- run records, no server ------------------------------------------------------------------------
def _result_and_metadata(tmp_path: Path, **result: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    test_dir = tmp_path / "20260101-000000" / "m_offline"
    test_dir.mkdir(parents=True)
    res = BenchmarkResult(
        test_id="m_offline",
        model="m",
        scenario="Offline",
        mode="performance",
        loadgen_model="m",
        status="VALID",
        tokens_per_s=123.5,
        settings={"target_qps": 5, "min_duration_ms": 100},
        **result,
    ).model_dump(mode="json")
    md = {
        "test_id": "m_offline",
        "started_utc": "2026-01-01T00:00:01+00:00",
        "finished_utc": "2026-01-01T00:01:01+00:00",
        "case": {"engine": {"kind": "vllm", "args": {"max-model-len": 4096}}, "dataset": {"path": "d.json"}},
        "engine": {"kind": "vllm", "version": "0.32.0", "argv": ["vllm", "serve", "--api-key", "***"]},
        "command_line": ["benchmarks", f"--harness-mlflow-uri=http://bob:{TOKEN}@mlflow:5000"],
        "environment": {
            "hostname": "h1",
            "cpu": {"model": "EPYC", "logical_cores": 8},
            "gpus": [{"name": "H100"}, {"name": "H100"}],
            "git": {"sha": "abc123"},
        },
        "outputs": {"test_dir": str(test_dir)},
        "run_spec": {"min_query_count": 10, "client": {"sample_count": 10}},
    }
    return res, md


def test_record_holds_params_metrics_tags_and_a_stable_result_id(tmp_path: Path) -> None:
    low = Violation.make("tokens_per_s", 1.0, 2.0, "higher_is_better", "threshold")
    res, md = _result_and_metadata(tmp_path, accuracy=ACCURACY, gate=[low])
    rec = build_record(res, md)
    assert rec.params["engine.kind"] == "vllm"
    assert rec.params["engine.version"] == "0.32.0"
    assert rec.params["engine.args"] == '{"max-model-len": 4096}'
    assert rec.params["loadgen.target_qps"] == "5"
    assert rec.params["dataset.sample_count"] == "10"
    assert rec.params["git.sha"] == "abc123"
    assert rec.metrics["tokens_per_s"] == 123.5
    assert rec.metrics["accuracy.scores.rouge1"] == 38.91
    assert rec.tags["status"] == "VALID"
    assert rec.tags["gate"] == "fail"
    assert rec.tags["gate.violations"] == low.message
    assert rec.tags["hardware.gpu"] == "2 x H100"
    assert rec.dicts.keys() == {"result.yaml", "metadata.yaml"}  # no files on disk: from the dicts
    assert build_record(res, md).result_id == rec.result_id
    assert build_record(res, {**md, "started_utc": "2026-01-02T00:00:00+00:00"}).result_id != rec.result_id
    parent = build_session_record(md, None)
    assert parent.tags[RESULT_ID_TAG] == parent.result_id != rec.result_id
    assert rec.tags["harness.session_id"] == parent.result_id


def test_each_endpoint_of_a_replicated_run_gets_its_own_metrics(tmp_path: Path) -> None:
    from harness_fixtures.results import EndpointStats

    endpoints = [
        EndpointStats(index=0, url="http://127.0.0.1:1", queries=10, share=0.5, ttft_ms_p99=80.0),
        EndpointStats(
            index=1,
            url="http://127.0.0.1:2",
            queries=10,
            share=0.5,
            failures=3,
            ttft_ms_p99=95.5,
            engine_window={"generation_tokens": 640},
        ),
    ]
    res, md = _result_and_metadata(tmp_path, endpoints=endpoints)
    rec = build_record(res, md)
    assert rec.metrics["endpoints.0.ttft_ms_p99"] == 80.0
    assert rec.metrics["endpoints.1.failures"] == 3
    assert rec.metrics["endpoints.1.share"] == 0.5
    assert rec.metrics["endpoints.1.engine_window.generation_tokens"] == 640
    assert not any(k.startswith("endpoints.") and k.endswith(".index") for k in rec.metrics)


def test_credentials_never_reach_params_or_tags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    res, md = _result_and_metadata(tmp_path, reason=f"server said {TOKEN}")
    for rec in (build_record(res, md), build_session_record(md, None)):
        text = repr((rec.params, rec.tags))
        assert TOKEN not in text
        assert "bob:" not in text
    assert public_uri(f"https://bob:{TOKEN}@mlflow.example:8443/x") == "https://***@mlflow.example:8443/x"


def test_timeline_becomes_stepped_series(tmp_path: Path) -> None:
    p = tmp_path / "timeline.csv"
    p.write_text(
        "# schema_version=1 t0_unix_s=1000.5\nt_s,source,series,value\n"
        "0.25,engine,running,1\n1.5,engine,running,3\n1.5,gpu,power_w,nan\nbad,row,x,1\n"
    )
    points = series_points(p, 0)
    assert [(x.key, x.step, x.value, x.timestamp_ms) for x in points] == [
        ("timeline.engine.running", 250, 1.0, 1000750),
        ("timeline.engine.running", 1500, 3.0, 1002000),
    ]


def test_seed_host_and_port_flags() -> None:
    assert tracking_uri_from("localhost", 5000) == "http://localhost:5000"
    assert tracking_uri_from(None, 5001) == "http://localhost:5001"
    assert tracking_uri_from("https://mlflow.example", None) == "https://mlflow.example:5000"
    assert tracking_uri_from("mlflow.example:8080", None) == "http://mlflow.example:8080"
    assert tracking_uri_from(None, None) is None


# -- against a real server -------------------------------------------------------------------------
