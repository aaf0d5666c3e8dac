"""Processes the suite starts are its own until they are gone: they die with pytest however it ends,
a pidfile lets the next session stop what a killed one left, and a launch that goes wrong in any way
stops its engine. Real processes (Python sleepers, the simulator, tiny HTTP servers)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from support import sim_case

from harness_fixtures.servers import EngineError, LaunchContext
from harness_fixtures.servers import launchers as launchers_mod
from harness_fixtures.servers.launchers import ProcessLauncher, SimLauncher
from harness_fixtures.servers.process import (
    OWNED,
    PIDFILE_DIR,
    ProcessRecord,
    ProcessStartError,
    connect_host,
    free_port,
    start_process,
    stop_leftovers,
    stop_process_group,
)

# Sleeps until killed; ignores SIGTERM when asked (a stuck engine).
SLEEPER = (
    "import signal, sys, time\n"
    "if 'stubborn' in sys.argv: signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(300)\n"
)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _ready(log: Path) -> None:
    """The sleeper has set up its signals (its first line)."""
    assert _wait(lambda: log.is_file() and "ready" in log.read_text(), 10), "the sleeper did not start"


@pytest.fixture
def cleanup() -> Iterator[list[int]]:
    """Pids a test started outside the harness (each its own group); killed at teardown."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def test_free_port_ipv6_and_a_host_that_is_not_here() -> None:
    assert 0 < free_port("::1") < 65536
    assert connect_host("::1") == "[::1]" and connect_host("0.0.0.0") == "127.0.0.1"
    assert connect_host("::") == "[::1]" and connect_host("10.0.0.1") == "10.0.0.1"
    with pytest.raises(
        ProcessStartError, match=r"engine.host 'no-such-host.invalid' cannot be bound.*engine.host in"
    ):
        free_port("no-such-host.invalid")


def test_sim_engine_on_ipv6_loopback(tmp_path: Path) -> None:
    case = sim_case(tmp_path)
    case = case.model_copy(update={"engine": case.engine.model_copy(update={"host": "::1"})})
    launcher = SimLauncher()
    endpoint = launcher.start(LaunchContext(case=case, run_dir=tmp_path / "engine"))
    try:
        assert endpoint.base_url.startswith("http://[::1]:") and endpoint.alive()
        assert endpoint.version  # /version answered over IPv6
    finally:
        launcher.stop(endpoint)
    assert _gone(endpoint.pid or 0)


def test_engine_host_that_cannot_be_bound_is_an_engine_error(tmp_path: Path) -> None:
    case = sim_case(tmp_path)
    case = case.model_copy(update={"engine": case.engine.model_copy(update={"host": "no-such-host.invalid"})})
    with pytest.raises(EngineError, match=r"engine\.host 'no-such-host\.invalid' cannot be bound"):
        SimLauncher().start(LaunchContext(case=case, run_dir=tmp_path / "engine"))
    assert not (tmp_path / "engine" / "engine.log").exists()  # nothing was started


# A server that is healthy but answers /v1/models with something that is not a model list.
BAD_MODELS_SERVER = textwrap.dedent(
    """
    import http.server, sys

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = {"/health": b"", "/v1/models": sys.argv[2].encode()}.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")
        def log_message(self, *args):
            pass

    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
    """
)


class BadModelsLauncher(ProcessLauncher):
    kind = "bad-models"

    def __init__(self, script: Path, answer: str) -> None:
        self.script, self.answer = script, answer

    def build_argv(self, ctx: LaunchContext, host: str, port: int) -> list[str]:
        return [sys.executable, str(self.script), str(port), self.answer]


@pytest.mark.parametrize("answer", ['{"data": ["m"]}', "not json", '{"data": {"id": "m"}}'])
def test_unreadable_models_answer_is_an_engine_error_and_stops_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    script = tmp_path / "server.py"
    script.write_text(BAD_MODELS_SERVER)
    started: list[int] = []
    real = launchers_mod.start_process

    def recording(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = real(*args, **kwargs)
        started.append(proc.pid)
        return proc

    monkeypatch.setattr(launchers_mod, "start_process", recording)
    with pytest.raises(EngineError, match=r"/v1/models answered .*not an OpenAI model list"):
        BadModelsLauncher(script, answer).start(
            LaunchContext(case=sim_case(tmp_path), run_dir=tmp_path / "e")
        )
    (pid,) = started
    assert _gone(pid)
    assert OWNED.pids() == []


def test_processes_die_with_the_process_that_started_them(tmp_path: Path, cleanup: list[int]) -> None:
    """A parent that is SIGKILLed runs no teardown: the kernel's parent-death signal stops its child."""
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text(SLEEPER)
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path\n"
            "from harness_fixtures.servers.process import start_process\n"
            f"p = start_process([sys.executable, {str(sleeper)!r}], None, Path({str(tmp_path / 'log')!r}))\n"
            "print(p.pid, flush=True)\nimport time; time.sleep(300)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    ) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        cleanup.append(child)
        _ready(tmp_path / "log")
        parent.kill()
        parent.wait(10)
    assert _wait(lambda: _gone(child), 10), "the child outlived its SIGKILLed parent"


def _record_of_a_dead_owner(session: Path, records: list[ProcessRecord]) -> Path:
    """A pidfile as a killed session leaves it: its owner (a process that has exited) and records."""
    # alive until its stdin closes: recorded while it runs (a process that already exited is a zombie
    # until waited for, and has no command line to record), then gone
    owner = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    owner_record = ProcessRecord.of(owner.pid, "pytest")
    assert owner.stdin is not None
    owner.stdin.close()
    owner.wait(10)
    path = session / PIDFILE_DIR / "1.json"
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps({"owner": owner_record.__dict__, "processes": [r.__dict__ for r in records]}, indent=1)
    )
    return path


def test_next_session_stops_only_what_it_can_prove_is_a_leftover(tmp_path: Path, cleanup: list[int]) -> None:
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text(SLEEPER)

    def start(*args: str) -> subprocess.Popen[bytes]:
        log = tmp_path / f"sleeper-{len(cleanup)}.log"
        with log.open("wb") as fh:
            p = subprocess.Popen([sys.executable, str(sleeper), *args], stdout=fh, start_new_session=True)
        cleanup.append(p.pid)
        _ready(log)
        return p

    leftover = start("stubborn")  # ignores SIGTERM: only SIGKILL after the grace period ends it
    reused = start()  # its pid is recorded with another start time: a different process now
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(10)
    records = [
        ProcessRecord.of(leftover.pid, "engine"),
        ProcessRecord.of(reused.pid, "engine").__class__(
            **{**ProcessRecord.of(reused.pid, "engine").__dict__, "create_time": 1.0}
        ),
        ProcessRecord(gone.pid, 2.0, "0" * 64, "", "engine", "gone"),
    ]
    root = tmp_path / "out"
    pidfile = _record_of_a_dead_owner(root / "20300101-000000", records)
    # A live session's pidfile: its processes are its own, even though one is recorded there.
    live = root / "20300101-000001" / PIDFILE_DIR / f"{os.getpid()}.json"
    live.parent.mkdir(parents=True)
    live.write_text(
        json.dumps(
            {
                "owner": ProcessRecord.of(os.getpid(), "pytest").__dict__,
                "processes": [ProcessRecord.of(reused.pid, "engine").__dict__],
            }
        )
    )

    messages = stop_leftovers(root, grace_s=0.5)
    assert leftover.wait(10) == -signal.SIGKILL
    assert reused.poll() is None and live.is_file()
    assert not pidfile.exists() and not pidfile.parent.exists()
    (message,) = messages
    assert "stopped 1 process(es) left running by session 20300101-000000" in message
    assert f"pid {leftover.pid} (engine: " in message
    assert stop_leftovers(root) == []  # nothing is done twice
    reused.kill()
    reused.wait(10)


def test_pidfile_lists_running_processes_and_is_removed_when_all_stopped(tmp_path: Path) -> None:
    session = tmp_path / "session"
    session.mkdir()
    OWNED.track_in(session)
    try:
        proc = start_process([sys.executable, "-c", "import time; time.sleep(60)"], None, tmp_path / "log")
        doc = json.loads((session / PIDFILE_DIR / f"{os.getpid()}.json").read_text())
        (record,) = doc["processes"]
        assert record["pid"] == proc.pid and record["role"] == "engine"
        assert ProcessRecord(**record).matches(psutil.Process(proc.pid))
        assert doc["owner"]["pid"] == os.getpid()
        stop_process_group(proc, 5)
        assert not (session / PIDFILE_DIR).exists()
    finally:
        OWNED.track_in(None)


def test_a_second_interrupt_while_stopping_still_kills_the_group(tmp_path: Path) -> None:
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text(SLEEPER)
    proc = start_process([sys.executable, str(sleeper), "stubborn"], None, tmp_path / "log")
    _ready(tmp_path / "log")
    # Ctrl-C arrives while we wait out the grace period of a process that ignores SIGTERM.
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            stop_process_group(proc, grace_s=60)
    finally:
        timer.cancel()
    assert time.monotonic() - t0 < 10
    assert _gone(proc.pid)
    assert proc.pid not in OWNED.pids()


def test_ctrl_c_while_the_engine_starts_stops_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = sim_case(tmp_path, startup_delay_s=60)  # nothing listens for a minute
    pids: list[int] = []
    real = launchers_mod.start_process

    def then_ctrl_c(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = real(*args, **kwargs)
        pids.append(proc.pid)
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        return proc

    monkeypatch.setattr(launchers_mod, "start_process", then_ctrl_c)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        SimLauncher().start(LaunchContext(case=case, run_dir=tmp_path / "engine"))
    assert time.monotonic() - t0 < 20
    (pid,) = pids
    assert _wait(lambda: _gone(pid), 5)
    assert OWNED.pids() == []
