"""MLflow export: run records from result dicts (unit), then against a real ``mlflow server`` (sqlite,
served artifacts): uploading a recorded session, uploading again, live logging during simulator runs,
an unreachable server, and credentials that must never reach a file."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    from support import HarnessProject

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "upload_to_mlflow.py"
TOKEN = f"sekrit-{uuid.uuid4().hex}"
ACCURACY = {
    "scores": {"rouge1": 38.91, "rouge2": 16.02, "rougeL": 24.5, "gen_len": 812.0},
    "target": {"rouge1": 38.0},
}
# MLflow must not phone home from a test, nor read a developer's own tracking settings.
HERMETIC_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
# The server's background job runner (four huey consumers) is not needed for tracking; it doubles the
# start time and ignores SIGTERM.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
DROP_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"


def tree_digest(root: Path) -> str:
    """Names, sizes, mtimes and contents of every file under ``root``."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        h.update(f"{p.relative_to(root)}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def files_containing(root: Path, needle: str) -> list[Path]:
    data = needle.encode()
    return [p for p in root.rglob("*") if p.is_file() and data in p.read_bytes()]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
    return {**env, **HERMETIC_ENV, **extra}


def run_tool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env or clean_env(),
        cwd=ROOT,
    )


def load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("upload_to_mlflow", TOOL)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- a real MLflow server ---------------------------------------------------------------------------
@dataclass
class MlflowServer:
    uri: str
    root: Path  # holds mlflow.db, artifacts/ and server.log

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def runs(self, experiment: str) -> list[Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exp = self.client().get_experiment_by_name(experiment)
            return [] if exp is None else list(self.client().search_runs([exp.experiment_id]))

    def artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        out: list[str] = []
        for a in self.client().list_artifacts(run_id, path):
            out += self.artifacts(run_id, a.path) if a.is_dir else [a.path]
        return out


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """``mlflow server`` on a free loopback port with a sqlite store and served artifacts."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--serve-artifacts",
        "--workers",
        "1",
    ]
    log_path = root / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=root,
            env=clean_env(**SERVER_ENV),
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180  # schema migrations take ~20 s on two busy cores
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield MlflowServer(f"http://127.0.0.1:{port}", root)
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group, then SIGKILL for whatever is left (workers included)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def recorded_session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session folder of the repo's own simulator benchmark (``sim_tiny_offline``), recorded once."""
    out = tmp_path_factory.mktemp("recorded")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks",
            "-k",
            "sim_tiny_offline",
            "-q",
            "-p",
            "no:cacheprovider",
            "--harness-output-dir",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (session,) = [p for p in out.iterdir() if p.is_dir()]
    return session


@pytest.fixture
def session_copy(recorded_session: Path, tmp_path: Path) -> Path:
    """A copy of the recorded session whose result carries an ``accuracy:`` block."""
    dst = tmp_path / recorded_session.name
    shutil.copytree(recorded_session, dst)
    result_file = dst / "sim_tiny_offline" / "result.yaml"
    result = yaml.safe_load(result_file.read_text())
    result["accuracy"] = ACCURACY
    result_file.write_text(yaml.safe_dump(result, sort_keys=False))
    return dst


# -- run records, no server ------------------------------------------------------------------------


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tool = load_tool()
    assert tool.main(["--metadata-file", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert tool.main(["--results-dir", str(tmp_path)]) == 2
    assert "no */metadata.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        tool.main(["--results-dir", str(tmp_path), "--tag", "novalue"])
    assert exc.value.code == 2
    assert "is not KEY=VALUE" in capsys.readouterr().err


@pytest.mark.slow
def test_dry_run_prints_what_would_be_logged_and_sends_nothing(session_copy: Path) -> None:
    before = tree_digest(session_copy)
    r = run_tool("--results-dir", str(session_copy), "--mlflow-tracking-uri", closed_port_uri(), "--dry-run")
    assert r.returncode == 0, r.stderr
    for text in (
        "dry run: nothing is sent",
        "model = sim_tiny",
        "engine.kind = sim",
        "loadgen.scenario = Offline",
        "accuracy.scores.rouge1 = 38.91",
        "tokens_per_s = ",
        "timeline.engine.running",
        "status = VALID",
        "gate = pass",
        "-> mlperf",
        "-> plots",
        "engine.log -> engine",
    ):
        assert text in r.stdout
    assert tree_digest(session_copy) == before


@pytest.mark.slow
def test_dry_run_needs_no_server_and_no_uri(session_copy: Path) -> None:
    r = run_tool("--results-dir", str(session_copy), "--dry-run")  # clean_env: no MLFLOW_TRACKING_URI
    assert r.returncode == 0, r.stderr
    assert "tracking URI: (none: a dry run contacts no server)" in r.stdout
    for name in ("requests.jsonl", "user.conf", "result.json"):
        assert f"sim_tiny_offline/{name} -> ." in r.stdout


# -- against a real server -------------------------------------------------------------------------
@pytest.mark.slow
def test_upload_session_lands_params_metrics_artifacts_once(
    mlflow_server: MlflowServer, session_copy: Path
) -> None:
    before = tree_digest(session_copy)
    exp = "upload-once"
    args = (
        "--results-dir",
        str(session_copy),
        "--mlflow-tracking-uri",
        mlflow_server.uri,
        "--mlflow-experiment-name",
        exp,
    )
    r = run_tool(*args, "--tag", "ci=yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sim_tiny_offline: uploaded as run" in r.stdout
    runs = mlflow_server.runs(exp)
    (parent,) = [x for x in runs if x.data.tags["harness.kind"] == "session"]
    (child,) = [x for x in runs if x.data.tags["harness.kind"] == "test"]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert (child.info.status, parent.info.status) == ("FINISHED", "FINISHED")
    p, m, t = child.data.params, child.data.metrics, child.data.tags
    assert (p["model"], p["scenario"], p["mode"], p["engine.kind"]) == (
        "sim_tiny",
        "Offline",
        "performance",
        "sim",
    )
    assert p["loadgen.scenario"] == "Offline" and "git.sha" in p and "engine.version" in p
    assert m["tokens_per_s"] > 0 and m["queries.completed"] > 0
    assert m["accuracy.scores.rouge1"] == 38.91
    assert (t["status"], t["gate"], t["user.ci"]) == ("VALID", "pass", "yes")
    history = mlflow_server.client().get_metric_history(child.info.run_id, "timeline.engine.running")
    assert len({h.step for h in history}) >= 2
    artifacts = mlflow_server.artifacts(child.info.run_id)
    for name in (
        "result.yaml",
        "metadata.yaml",
        "mlperf/mlperf_log_summary.txt",
        "mlperf/mlperf_log_detail.txt",
        "plots/engine.png",
        "engine/engine.log",
        "timeline.csv",
        "harness.log",
        "requests.jsonl",
        "user.conf",
        "result.json",
    ):
        assert name in artifacts
    assert "session.yaml" in mlflow_server.artifacts(parent.info.run_id)

    # The uploaded session compares with its own files metric by metric: same numbers, both ways in.
    cmp = subprocess.run(
        [sys.executable, "-m", "harness_fixtures.compare", f"mlflow:{parent.info.run_id}", str(session_copy),
         "--mlflow-tracking-uri", mlflow_server.uri, "--json"],
        capture_output=True, text=True, timeout=120, env=clean_env(),
    )  # fmt: skip
    assert cmp.returncode == 0, cmp.stderr
    rows = json.loads(cmp.stdout)
    assert {r["test_id"] for r in rows} == {"sim_tiny_offline"} and len(rows) >= 3
    assert {r["verdict"] for r in rows} == {"unchanged"} and {r["change_pct"] for r in rows} == {0.0}

    # Again, the whole session and then the one test: still one run per result.
    r = run_tool(*args)
    assert r.returncode == 0, r.stderr
    assert "sim_tiny_offline: already uploaded as run " + child.info.run_id in r.stdout
    md = session_copy / "sim_tiny_offline" / "metadata.yaml"
    r = run_tool("--metadata-file", str(md), *args[2:])
    assert r.returncode == 0, r.stderr
    assert len(mlflow_server.runs(exp)) == 2
    assert tree_digest(session_copy) == before


@pytest.mark.slow
def test_upload_to_unreachable_server_fails_clearly_and_changes_nothing(session_copy: Path) -> None:
    before = tree_digest(session_copy)
    uri = closed_port_uri()
    t0 = time.monotonic()
    r = run_tool("--results-dir", str(session_copy), "--mlflow-tracking-uri", uri, "--retries", "1")
    assert r.returncode == 1
    assert "retry 1/1" in r.stderr
    assert f"upload to {uri} failed" in r.stderr and "Connection refused" in r.stderr
    assert "1 of 1 results not uploaded (sim_tiny_offline)" in r.stderr
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 60
    assert tree_digest(session_copy) == before


@pytest.mark.slow
def test_live_logging_parent_and_children_no_secret_anywhere(
    mlflow_server: MlflowServer, harness_project: HarnessProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k in DROP_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in HERMETIC_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)  # the server ignores it; nothing may write it
    harness_project.model("live", ("Offline", "Server"))
    exp = "live"
    r = harness_project.run(f"--harness-mlflow-uri={mlflow_server.uri}", f"--harness-mlflow-experiment={exp}")
    r.assert_outcomes(passed=2)
    r.stdout.fnmatch_lines([f"MLflow: 2 run(s) in experiment 'live' at {mlflow_server.uri}*"])
    runs = mlflow_server.runs(exp)
    (parent,) = [x for x in runs if x.data.tags["harness.kind"] == "session"]
    children = [x for x in runs if x.data.tags["harness.kind"] == "test"]
    assert sorted(x.info.run_name for x in children) == ["live_offline", "live_server"]
    assert {x.data.tags["mlflow.parentRunId"] for x in children} == {parent.info.run_id}
    assert {x.data.tags["harness.logged_by"] for x in children} == {"live"}
    assert parent.info.status == "FINISHED"
    assert "session.yaml" in mlflow_server.artifacts(parent.info.run_id)
    assert "result.yaml" in mlflow_server.artifacts(children[0].info.run_id)
    (session,) = harness_project.session_dirs()
    md = yaml.safe_load((session / "live_offline" / "metadata.yaml").read_text())
    assert md["mlflow"] == {"tracking_uri": mlflow_server.uri, "experiment_name": exp}

    # Uploading what live logging already logged finds every run (URI and experiment from metadata).
    r2 = run_tool("--results-dir", str(session), env=clean_env(MLFLOW_TRACKING_TOKEN=TOKEN))
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.count("already uploaded as run") == 3
    assert len(mlflow_server.runs(exp)) == 3

    leaks = files_containing(harness_project.path, TOKEN) + files_containing(mlflow_server.root, TOKEN)
    assert leaks == []


@pytest.mark.slow
def test_live_logging_unreachable_server_keeps_the_benchmark(
    mlflow_server: MlflowServer, harness_project: HarnessProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k in DROP_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in HERMETIC_ENV.items():
        monkeypatch.setenv(k, v)
    harness_project.model("down", ("Offline", "Server"))
    uri = closed_port_uri()
    t0 = time.monotonic()
    r = harness_project.run(f"--harness-mlflow-uri={uri}", "--harness-mlflow-experiment=later")
    assert time.monotonic() - t0 < 90
    r.assert_outcomes(passed=2)
    warnings_ = [line for line in r.outlines if "MLflow live logging" in line]
    assert len(warnings_) == 1, r.outlines
    assert not [line for line in r.errlines if "MLflow" in line]
    (session,) = harness_project.session_dirs()
    assert f"--results-dir {session}" in warnings_[0]
    for test in ("down_offline", "down_server"):
        assert (session / test / "result.yaml").is_file() and (session / test / "metadata.yaml").is_file()

    # The command the warning gives works once the server is back (here: pointed at a live one).
    command = shlex.split(warnings_[0].split("Upload them later with: ", 1)[1])
    assert command[1].endswith("tools/upload_to_mlflow.py")
    before = tree_digest(session)
    r2 = subprocess.run(
        [*command, "--mlflow-tracking-uri", mlflow_server.uri],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
        cwd=harness_project.path,
    )
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert sorted(x.info.run_name for x in mlflow_server.runs("later")) == [
        "down_offline",
        "down_server",
        f"session {session.name}",
    ]
    assert tree_digest(session) == before
