"""pytest glue: options, hooks, parametrization, fixtures; the work is in harness_fixtures.pipeline.

Registered once through the ``pytest11`` entry point and inert unless a test uses the harness
fixtures. Results flow one way: test → ``user_properties`` → controller's reporter
(harness_fixtures.reporting) → ``pytest_harness_result`` → files → terminal summary.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import pytest

from . import hookspecs, redaction
from .client.httpconfig import HttpConfig, ServerUrl
from .config import BenchmarkCase, ConfigError, PlannedRun, load_cases, plan_runs
from .gating import GateError, load_threshold_overrides
from .loadgen.userconf import UserConfError, parse_user_conf
from .options import OPTIONS, HarnessOptions, Option, OptionError, check_output_root, check_writable_file
from .pipeline import Outcome, RunInterrupted, Suite, check_endpoints, run_test
from .reporting import (
    RESULT_PROP,
    STATE,
    HarnessState,
    TerminalEvents,
    keep_shard,
    planned_run,
    register_reporters,
    session_dir,
    write_test_files,
)
from .results import BenchmarkResult
from .servers import Endpoint, EngineError
from .servers.gpus import GpuAllocator, GpuError, check_gpu_needs, resolve_pool
from .servers.manager import EngineManager
from .servers.process import OWNED


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness", "LLM serving benchmarks (harness-fixtures)")
    for opt in OPTIONS:
        extra: dict[str, Any] = {"action": "store_true"} if opt.kind == "bool" else {}
        if opt.kind == "list":
            extra["action"] = "append"
        if opt.choices:
            extra["choices"] = opt.choices
        help_ = f"{opt.help} Default: {opt.default}."
        group.addoption(opt.flag, dest=opt.dest, default=None, help=help_, **extra)
        ini_type: Literal["bool", "string", "linelist"] = (
            "bool" if opt.kind == "bool" else "linelist" if opt.kind == "list" else "string"
        )
        default: Any = False if opt.kind == "bool" else [] if opt.kind == "list" else opt.default
        parser.addini(opt.dest, help=help_, type=ini_type, default=default)


def _raw(config: pytest.Config) -> Any:
    def get(opt: Option) -> tuple[Any, Literal["cli", "ini"] | None]:
        cli = config.getoption(opt.dest)
        if cli not in (None, False):
            return cli, "cli"
        ini = config.getini(opt.dest)
        # An ini value equal to the built-in default is the default (relative to the rootdir alike).
        return (ini, "ini") if ini not in (None, "", False, []) else (None, None)

    return get


def pytest_configure(config: pytest.Config) -> None:
    """Every option, file and case is read and checked here, once: a bad one is a usage error before
    any engine starts."""
    config.addinivalue_line("markers", "harness_benchmark: a LoadGen benchmark test of the harness")
    redaction.protect_loggers()
    try:
        options = HarnessOptions.build(_raw(config), config.invocation_params.dir, config.rootpath)
        suite = Suite(
            options,
            root=config.rootpath,
            command_line=list(config.invocation_params.args),
            cwd=config.invocation_params.dir,
        )
        # Options (headers, keys, TLS files) checked now; the environment's proxies and CA variables at
        # the first request, so runs without benchmarks never fail on them.
        suite.http = HttpConfig.from_options(options, check_environment=False)
        for url in options.endpoint_urls():
            suite.http.headers_for(ServerUrl.parse(url, "--harness-server-url"))
        state = HarnessState(suite)
        if options.models_dir is not None and (options.models_dir.is_dir() or options.models_dir_explicit):
            state.cases = load_cases(options.models_dir)
        if options.user_conf is not None and (options.user_conf.is_file() or options.user_conf_explicit):
            parse_user_conf(options.user_conf)
        if state.cases is not None:
            for case in state.cases:  # hidden from every file, log and terminal line from now on
                redaction.add_secrets(redaction.case_secrets(case.engine.model_dump()))
            suite.check_user_confs(state.cases)  # every line's model name is one a case uses
            check_endpoints(state.cases, options)
        if options.thresholds is not None:
            from .config import Thresholds

            names = None
            if state.cases is not None:
                names = {c.name for c in state.cases} | {
                    r.test_id for c in state.cases for r in plan_runs(c, options.mode)
                }
            suite.threshold_overrides = load_threshold_overrides(
                options.thresholds, set(Thresholds.model_fields), names
            )
        if options.baseline is not None:
            from .gating import Baseline

            suite.baseline = Baseline.load(options.baseline)
        if options.save_baseline is not None:
            check_writable_file(options.save_baseline, "--harness-save-baseline")
        if options.output_dir_explicit and not hasattr(config, "workerinput"):
            check_output_root(options.output_dir)  # ini values: once harness tests are selected
        if options.gpus is not None:
            state.gpus = GpuAllocator(resolve_pool(options.gpus), wait_s=options.gpu_wait_s)
    except (OptionError, ConfigError, UserConfError, GateError, GpuError) as exc:
        raise pytest.UsageError(str(exc)) from None
    if options.shard is not None:
        state.shard = {"index": options.shard[0], "count": options.shard[1]}
    config.stash[STATE] = state
    if hasattr(config, "workerinput"):
        sd = config.workerinput.get("harness_session_dir")
        state.session_dir = Path(sd) if sd else None
        OWNED.track_in(state.session_dir)  # this worker's own pidfile in the controller's folder
    else:
        register_reporters(config, state)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist: workers write into the controller's session folder (claimed by the controller)."""
    node.workerinput["harness_session_dir"] = str(session_dir(node.config.stash[STATE]))


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: the shards split what was selected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """--harness-shard I/N: keep shard I's tests. Every node computes the same split (same selection,
    same function), so N CI jobs together run each selected test exactly once. Then the selected
    cases' GPU needs against --harness-gpus."""
    state = config.stash.get(STATE, None)
    if state is None:
        return
    if state.suite.options.shard is not None:
        keep_shard(config, state, items)
    if state.gpus is not None:
        selected = {run.case.name: run.case for run in map(planned_run, items) if run is not None}
        try:
            check_gpu_needs(state.gpus, list(selected.values()), state.suite.options.server_url)
        except GpuError as exc:
            raise pytest.UsageError(str(exc)) from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "harness_run" not in metafunc.fixturenames:
        return
    state = metafunc.config.stash[STATE]
    if state.cases is None:
        raise pytest.UsageError(
            f"no benchmark cases: models folder {state.suite.options.models_dir} not found; "
            "set --harness-models-dir or the harness_models_dir ini key"
        )
    n = state.suite.options.repeat
    params = [
        pytest.param(
            run,
            id=run.run_id,
            # keeps a model's tests on one xdist worker with --dist loadgroup (one engine)
            marks=[pytest.mark.xdist_group(run.case.name), pytest.mark.harness_benchmark],
        )
        for case in state.cases
        for planned in plan_runs(case, state.suite.options.mode)
        # --harness-repeat N: the runs of a test one after another (an Offline run sizes the next Server)
        for run in ([planned] if n == 1 else [replace(planned, repeat=k) for k in range(1, n + 1)])
    ]
    metafunc.parametrize("harness_run", params)


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def harness_engines(pytestconfig: pytest.Config) -> Iterator[EngineManager]:
    options = pytestconfig.stash[STATE].suite.options
    manager = EngineManager(
        server_url=options.server_url,
        server_urls=options.endpoint_urls(),
        api_key=options.api_key(),
        http=pytestconfig.stash[STATE].suite.http_config(),
        make_launcher=lambda kind: pytestconfig.hook.pytest_harness_make_launcher(
            config=pytestconfig, kind=kind
        ),
        on_message=TerminalEvents(pytestconfig).message,
        gpus=pytestconfig.stash[STATE].gpus,
    )
    previous = _install_sigterm()
    try:
        yield manager
    finally:
        manager.stop()
        signal.signal(signal.SIGTERM, previous)
        pytestconfig.stash[STATE].suite.http_config().close()


def _install_sigterm() -> Any:
    """SIGTERM becomes KeyboardInterrupt, so teardown (engine stop, partial results) runs as on Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return signal.SIG_DFL


@pytest.fixture
def harness_case(harness_run: PlannedRun) -> BenchmarkCase:
    return harness_run.case


@pytest.fixture
def harness_scenario(harness_run: PlannedRun) -> str:
    return harness_run.scenario


@pytest.fixture
def harness_test_dir(pytestconfig: pytest.Config, harness_run: PlannedRun) -> Path:
    d = session_dir(pytestconfig.stash[STATE]) / harness_run.run_id
    d.mkdir(parents=True, exist_ok=False)  # a fresh session folder: an existing test dir is a bug
    return d


@pytest.fixture
def harness_endpoints(
    pytestconfig: pytest.Config, harness_engines: EngineManager, harness_case: BenchmarkCase
) -> list[Endpoint]:
    """Every endpoint of the case: one engine, its ``engine.replicas``, or each server URL."""
    engine_dir = session_dir(pytestconfig.stash[STATE]) / f"engine-{harness_case.name}"
    try:
        return harness_engines.get_all(harness_case, engine_dir)
    except EngineError as exc:
        pytest.fail(redaction.text(str(exc)), pytrace=False)


@pytest.fixture
def harness_engine(harness_endpoints: list[Endpoint]) -> Endpoint:
    """The case's (first) engine."""
    return harness_endpoints[0]


class HarnessBenchmark:
    """What a benchmark test calls: ``run()`` then ``check(result)``."""

    def __init__(self, request: pytest.FixtureRequest, run: PlannedRun, test_dir: Path) -> None:
        self.request = request
        self.config = request.config
        self.planned = run
        self.test_dir = test_dir
        self.result: BenchmarkResult | None = None

    def run(self) -> BenchmarkResult:
        suite = self.config.stash[STATE].suite

        def endpoint() -> list[Endpoint]:
            try:
                eps: list[Endpoint] = self.request.getfixturevalue("harness_endpoints")
            except pytest.fail.Exception as exc:
                raise EngineError(str(exc.msg)) from None
            return eps

        try:
            outcome = run_test(
                self.planned,
                endpoint,
                suite,
                self.test_dir,
                TerminalEvents(self.config),
                self.request.node.nodeid,
            )
        except RunInterrupted as exc:
            # The report may never reach the controller: write the files now (controller only).
            self._emit(exc.outcome, write_now=True)
            raise
        if outcome.skippable and suite.options.skip_missing:
            pytest.skip(outcome.result.reason or "dataset missing")
        self._emit(outcome)
        self.result = outcome.result
        return outcome.result

    def _emit(self, outcome: Outcome, write_now: bool = False) -> None:
        payload = json.dumps(
            {
                "result": outcome.result.model_dump(mode="json"),
                "metadata": outcome.metadata.model_dump(mode="json"),
            }
        )
        self.request.node.user_properties.append((RESULT_PROP, payload))
        if write_now and not hasattr(self.config, "workerinput"):
            write_test_files(
                outcome.result.model_dump(mode="json"),
                outcome.metadata.model_dump(mode="json"),
                self.test_dir.parent,
            )

    def check(self, result: BenchmarkResult) -> None:
        """Fail the test with one line per violation; an engine's log tail follows when it died."""
        if not result.gate:
            return
        # One line per violation, the first one first: CI's one-line summaries show something useful.
        lines = [v.message for v in result.gate]
        if result.status == "INVALID" and result.rate is not None:
            r = result.rate
            value = "as configured" if r.value is None else f"{r.value:g}"
            lines.append(f"load: {r.setting} {value} ({r.source}: {r.reason})")
        if result.diagnosis is not None:
            lines.append(f"why: {result.diagnosis.verdict}")
            lines.append(f"next: {result.diagnosis.next_step}")
        if result.status in ("ERROR", "TIMEOUT") and result.reason and "\n" in result.reason:
            lines.append(result.reason)
        pytest.fail("\n".join(lines), pytrace=False)


@pytest.fixture
def harness_benchmark(
    request: pytest.FixtureRequest, harness_run: PlannedRun, harness_test_dir: Path
) -> HarnessBenchmark:
    return HarnessBenchmark(request, harness_run, harness_test_dir)
