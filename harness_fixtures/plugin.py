"""pytest glue: options, hooks, fixtures, report plumbing and the terminal summary.

Registered once through the ``pytest11`` entry point and inert unless a test uses the harness
fixtures. Results flow one way: test → ``user_properties`` → controller's
``pytest_runtest_logreport`` → ``pytest_harness_result`` → files → terminal summary.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from . import hookspecs
from .accuracy_run import AccuracyRunError, score_run
from .benchmark import RunOptions, build_result, read_requests, run_benchmark
from .config import LOADGEN_SCENARIO, SCENARIOS, BenchmarkCase, ConfigError, load_cases
from .dataset import DatasetError, load_dataset
from .environment import capture as capture_environment
from .environment import redact_argv, scrub_url_credentials
from .gating import (
    Baseline,
    GateError,
    Violation,
    apply_overrides,
    baseline_entry,
    check_accuracy,
    check_client_bound,
    check_consistency,
    check_thresholds,
    compare_baseline,
    hardware_of,
    load_threshold_overrides,
    save_baseline,
)
from .progress import RunProgress, expected_queries
from .results import BenchmarkResult, MllogError, failed_checks, latency_limits, parse_mllog, write_yaml
from .servers import LAUNCHERS, Endpoint, EngineError, LaunchContext
from .sizing import (
    MAX_OFFLINE_ATTEMPTS,
    MIN_DURATION_ONLY,
    LoadChoice,
    explicit_rate,
    needs_offline_rerun,
    offline_rerun,
    server_from_offline,
    single_stream_from_warmup,
)
from .telemetry import TestTelemetry
from .userconf import UserConfError, parse_user_conf

log = logging.getLogger("harness_fixtures")
RESULT_PROP = "harness_result_json"


@dataclass
class HarnessState:
    """Session-wide state in ``config.stash``."""

    cases: list[BenchmarkCase] | None = None
    cases_error: str | None = None
    user_conf: Path | None = None
    session_dir: Path | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    threshold_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    baseline: Baseline | None = None
    baseline_path: Path | None = None
    baseline_entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    write_errors: list[str] = field(default_factory=list)  # result files that could not be written
    # Offline samples/s per model, measured this session (Offline test or probe) → (value, where);
    # sizes the model's Server/Interactive load. A model's tests share one xdist worker.
    offline_measured: dict[str, tuple[float, str]] = field(default_factory=dict)


STATE = pytest.StashKey[HarnessState]()


# -- options -------------------------------------------------------------------------------------
def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


_OPTIONS: list[tuple[str, dict[str, Any], str, str | None]] = [
    ("models-dir", {}, "Folder of model YAML files.", "benchmarks/models"),
    ("user-conf", {}, "LoadGen user.conf.", "benchmarks/user.conf"),
    ("output-dir", {}, "Where each session writes a new folder of results.", "harness_output"),
    ("server-url", {}, "Benchmark a running OpenAI-compatible server instead of starting one.", None),
    (
        "api-key-env",
        {},
        "Name of the env var holding a bearer token to send (its value is never written).",
        None,
    ),
    ("mode", {"choices": ("performance", "accuracy")}, "LoadGen mode.", "performance"),
    ("target-qps", {"type": float}, "Override the target QPS (Server) / expected QPS (Offline).", None),
    ("min-duration-ms", {"type": int}, "Override LoadGen min_duration (ms).", None),
    ("min-query-count", {"type": int}, "Override LoadGen min_query_count.", None),
    ("sample-count", {"type": int}, "Use only the first N dataset samples.", None),
    ("request-timeout-s", {"type": float}, "Per-request deadline (s).", "600"),
    ("test-timeout-s", {"type": float}, "Per-test deadline (s).", "7200"),
    ("thresholds", {}, "YAML of threshold overrides: {case name or test id: {threshold: value}}.", None),
    ("baseline", {}, "Compare against this baseline file (from --harness-save-baseline).", None),
    ("save-baseline", {}, "Write this session's results as a baseline file.", None),
    ("max-regression", {"type": float}, "Allowed regression vs the baseline, percent (per case: YAML).", "5"),
    (
        "mlflow-uri",
        {},
        "MLflow tracking URI for live logging (or $MLFLOW_TRACKING_URI); off when unset.",
        None,
    ),
    ("mlflow-experiment", {}, "MLflow experiment for live logging.", "harness-fixtures"),
    (
        "skip-missing",
        {"action": "store_true"},
        "Skip (not fail) tests whose model or dataset is missing.",
        None,
    ),
    (
        "client-workers",
        {},
        "Client processes sending requests: 'auto' (one in-process client up to 400 QPS, then "
        "ceil(QPS/400) worker processes, at most cores-1) or a number (1: the in-process client).",
        "auto",
    ),
    (
        "allow-client-bound",
        {"action": "store_true"},
        "Do not fail a run whose client was the bottleneck (dispatch lag p99 > 10 ms, achieved < 95 "
        "percent of scheduled QPS, or a client process CPU-saturated); it is still reported.",
        None,
    ),
]


def _client_workers(config: pytest.Config) -> int | None:
    """``--harness-client-workers``: None for auto, else a count >= 1."""
    value = _opt(config, "client-workers")
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        n = int(str(value))
    except ValueError:
        n = 0
    if n < 1:
        raise pytest.UsageError(
            f"--harness-client-workers / ini harness_client_workers: {value!r} is not 'auto' or a count >= 1"
        )
    return n


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness", "LLM serving benchmarks (harness-fixtures)")
    for name, kw, help_, default in _OPTIONS:
        dest = "harness_" + name.replace("-", "_")
        action = kw.get("action")
        group.addoption(
            f"--harness-{name}", dest=dest, default=None, help=f"{help_} Default: {default}.", **kw
        )
        parser.addini(
            dest,
            help=f"{help_} Default: {default}.",
            type="bool" if action else "string",  # type: ignore[arg-type,maybe-unrecognized-str-typeform]
            default=False if action else default,
        )


def _opt(config: pytest.Config, name: str) -> Any:
    dest = "harness_" + name.replace("-", "_")
    value = config.getoption(dest)
    if value is None or value is False:
        value = config.getini(dest)
        if value in ("", None):
            return None
    return value


def _path_opt(config: pytest.Config, name: str) -> Path | None:
    """CLI paths are relative to where pytest was started; ini paths to the rootdir."""
    dest = "harness_" + name.replace("-", "_")
    cli = config.getoption(dest)
    if cli is not None:
        return (config.invocation_params.dir / str(cli)).resolve()
    ini = config.getini(dest)
    return (config.rootpath / ini).resolve() if ini else None


def _float_opt(config: pytest.Config, name: str) -> float | None:
    value = _opt(config, name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise pytest.UsageError(
            f"--harness-{name} / ini harness_{name.replace('-', '_')}: {value!r} is not a number"
        ) from None


# -- configure -----------------------------------------------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "harness_benchmark: a LoadGen benchmark test of the harness")
    state = HarnessState()
    config.stash[STATE] = state
    models_dir = _path_opt(config, "models-dir")
    explicit = config.getoption("harness_models_dir") is not None
    if models_dir is not None and (models_dir.is_dir() or explicit):
        try:
            state.cases = load_cases(models_dir)
        except ConfigError as exc:
            # Known before any engine starts: a clean usage error, no traceback.
            raise pytest.UsageError(str(exc)) from None
    user_conf = _path_opt(config, "user-conf")
    if user_conf is not None and (user_conf.is_file() or config.getoption("harness_user_conf")):
        try:
            parse_user_conf(user_conf)
        except UserConfError as exc:
            raise pytest.UsageError(str(exc)) from None
        state.user_conf = user_conf
    thresholds = _path_opt(config, "thresholds")
    if thresholds is not None:
        from .config import Thresholds

        try:
            state.threshold_overrides = load_threshold_overrides(thresholds, set(Thresholds.model_fields))
        except GateError as exc:
            raise pytest.UsageError(str(exc)) from None
    baseline = _path_opt(config, "baseline")
    if baseline is not None:
        try:
            state.baseline = Baseline.load(baseline)
        except GateError as exc:
            raise pytest.UsageError(str(exc)) from None
        state.baseline_path = baseline
    for name in ("target-qps", "request-timeout-s", "test-timeout-s", "max-regression"):
        v = _float_opt(config, name)
        if v is not None and v <= 0:
            raise pytest.UsageError(f"--harness-{name} must be > 0, got {v!r}")
    _client_workers(config)
    if hasattr(config, "workerinput"):
        sd = config.workerinput.get("harness_session_dir")
        state.session_dir = Path(sd) if sd else None
    else:
        if config.getoption("harness_output_dir") is not None:
            # Asked for on the command line: say now if it is unusable (ini values: once harness
            # tests are selected, see HarnessReporter.pytest_collection_modifyitems).
            _check_output_root(_output_root(config))
        config.pluginmanager.register(HarnessReporter(config), "harness-reporter")
        mlflow_uri = _opt(config, "mlflow-uri") or os.environ.get("MLFLOW_TRACKING_URI")
        if mlflow_uri:
            from .mlflow_export import MlflowLivePlugin

            experiment = _opt(config, "mlflow-experiment") or "harness-fixtures"
            config.pluginmanager.register(MlflowLivePlugin(config, mlflow_uri, experiment), "harness-mlflow")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist: workers write into the controller's session folder (claimed here, by the controller)."""
    state = node.config.stash[STATE]
    node.workerinput["harness_session_dir"] = str(_session_dir(node.config, state))


def _output_root(config: pytest.Config) -> Path:
    return _path_opt(config, "output-dir") or Path("harness_output").resolve()


def _check_output_root(root: Path) -> None:
    """UsageError unless ``root`` is, or can be created as, a writable folder; creates nothing."""
    fix = "pass --harness-output-dir DIR (a writable folder) or set the harness_output_dir ini key"
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    what = "" if existing == root else f"cannot be created: {str(existing)!r} "
    if not existing.is_dir():
        raise pytest.UsageError(f"output dir {str(root)!r} {what}is not a directory; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise pytest.UsageError(f"output dir {str(root)!r} {what}is not writable; {fix}")


def _session_dir(config: pytest.Config, state: HarnessState) -> Path:
    """A new folder per session, never an earlier one's (so nothing is overwritten).

    Claimed once on the controller with an atomic mkdir, so two sessions started in the same second
    get different folders; xdist workers receive its path.
    """
    if state.session_dir is not None:
        return state.session_dir
    root = _output_root(config)
    _check_output_root(root)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        root.mkdir(parents=True, exist_ok=True)
        n = 0
        while True:
            candidate = root / (stamp if n == 0 else f"{stamp}-{n}")
            try:
                candidate.mkdir()
                break
            except FileExistsError:
                n += 1
    except OSError as exc:
        raise pytest.UsageError(
            f"cannot create a session folder in output dir {str(root)!r}: {exc.strerror}; "
            "pass --harness-output-dir DIR (a writable folder)"
        ) from None
    state.session_dir = candidate
    return candidate


# -- collection ----------------------------------------------------------------------------------
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "harness_case_scenario" not in metafunc.fixturenames:
        return
    state = metafunc.config.stash[STATE]
    if state.cases is None:
        raise pytest.UsageError(
            f"no benchmark cases: models folder {_path_opt(metafunc.config, 'models-dir')} not found; "
            "set --harness-models-dir or the harness_models_dir ini key"
        )
    global_mode = _opt(metafunc.config, "mode") or "performance"
    params = []
    for case in state.cases:
        # Offline first: its measured throughput sizes the model's Server load (harness_fixtures.sizing).
        runs = [(scenario, global_mode) for scenario in sorted(case.scenarios, key=SCENARIOS.index)]
        if case.accuracy is not None and (case.accuracy.scenario, "accuracy") not in runs:
            # --harness-mode accuracy already runs that scenario in AccuracyOnly, under the same id
            runs.append((case.accuracy.scenario, "accuracy"))
        for scenario, mode in runs:
            params.append(
                pytest.param(
                    (case, scenario, mode),
                    id=_test_id(case, scenario, mode, metafunc.config),
                    # keeps a model's tests on one xdist worker with --dist loadgroup (one engine)
                    marks=[pytest.mark.xdist_group(case.name), pytest.mark.harness_benchmark],
                )
            )
    metafunc.parametrize("harness_case_scenario", params)


# -- engines -------------------------------------------------------------------------------------
class _LiveProgress:
    """RunProgress with pytest's output capture suspended while the run is live."""

    def __init__(self, config: pytest.Config, progress: RunProgress) -> None:
        self.config = config
        self.p = progress

    def tick(self, elapsed_s: float) -> None:
        self.p.stream = sys.stdout  # capture swaps sys.stdout; write to whatever is live now
        self.p.tick(elapsed_s)

    @contextlib.contextmanager
    def live(self) -> Iterator[None]:
        capman = self.config.pluginmanager.get_plugin("capturemanager")
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            tr = self.config.pluginmanager.get_plugin("terminalreporter")
            if tr is not None:
                tr.write_line("")
            try:
                yield
            finally:
                self.p.stream = sys.stdout
                self.p.close()


def _progress(config: pytest.Config, message: str) -> None:
    """A line on the terminal now, even while pytest captures output (engine starts take minutes)."""
    tr = config.pluginmanager.get_plugin("terminalreporter")
    capman = config.pluginmanager.get_plugin("capturemanager")
    if tr is None or hasattr(config, "workerinput"):
        log.info(message)
        return
    if capman is not None:
        with capman.global_and_fixture_disabled():
            tr.write_line(message)
    else:
        tr.write_line(message)


MAX_ENGINE_STARTS = 2  # per model and session: one restart after a death, then give up


class EngineManager:
    """At most one engine at a time: started on first use, reused by all of that model's tests,
    stopped before the next model's engine starts and at session end (also on Ctrl-C/SIGTERM)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.current: tuple[str, Endpoint, Any] | None = None
        self.failed: dict[str, str] = {}
        self.starts: dict[str, int] = {}

    def get(self, case: BenchmarkCase, run_dir: Path) -> Endpoint:
        if self.current and self.current[0] == case.name:
            endpoint = self.current[1]
            if endpoint.alive():
                return endpoint
            # It died during an earlier test (which failed saying so). Start it once more so the
            # model's remaining tests can run; a second death ends this model's tests for the session.
            if self.starts.get(case.name, 0) >= MAX_ENGINE_STARTS:
                self.failed[case.name] = (
                    f"engine for {case.name!r} is not running (exit code {endpoint.exit_code()}): it died "
                    f"{self.starts[case.name]} times this session and is not restarted again; last log "
                    f"lines ({endpoint.log_path}):\n{endpoint.log_tail()}"
                )
            else:
                log.warning(
                    "engine for %s died (exit code %s); starting a new one", case.name, endpoint.exit_code()
                )
        self.stop()
        if case.name in self.failed:
            pytest.fail(self.failed[case.name], pytrace=False)
        server_url = _opt(self.config, "server-url")
        kind = "external" if server_url else case.engine.kind
        launcher = self.config.hook.pytest_harness_make_launcher(config=self.config, kind=kind)
        if launcher is None:
            if kind not in LAUNCHERS:
                self.failed[case.name] = (
                    f"{case.source}: engine.kind {kind!r} is unknown; known: {sorted(LAUNCHERS)}"
                )
                pytest.fail(self.failed[case.name], pytrace=False)
            launcher = LAUNCHERS[kind]()
        key_env = _opt(self.config, "api-key-env")
        ctx = LaunchContext(
            case=case,
            run_dir=run_dir,
            api_key=os.environ.get(key_env) if key_env else None,
            server_url=server_url,
        )
        self.starts[case.name] = self.starts.get(case.name, 0) + 1
        _progress(
            self.config,
            f"[harness] starting {kind} engine for {case.name} (log: {run_dir / 'engine.log'}) ...",
        )
        try:
            endpoint = launcher.start(ctx)
            _progress(
                self.config,
                f"[harness] {case.name}: engine ready at {endpoint.base_url} "
                f"after {endpoint.info.get('start_s', 0):.0f} s (version {endpoint.version})",
            )
        except EngineError as exc:
            self.failed[case.name] = f"engine for {case.name!r} failed to start: {exc}"
            pytest.fail(self.failed[case.name], pytrace=False)
        endpoint.info["stop_timeout_s"] = case.engine.stop_timeout_s
        endpoint.info["start_number"] = self.starts[case.name]  # 1 = first start of this model
        self.current = (case.name, endpoint, launcher)
        return endpoint  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.current is None:
            return
        name, endpoint, launcher = self.current
        self.current = None
        log.info("stopping engine for %s", name)
        launcher.stop(endpoint)


@pytest.fixture(scope="session")
def harness_engines(pytestconfig: pytest.Config) -> Iterator[EngineManager]:
    manager = EngineManager(pytestconfig)
    previous = _install_sigterm()
    try:
        yield manager
    finally:
        manager.stop()
        signal.signal(signal.SIGTERM, previous)


def _install_sigterm() -> Any:
    """SIGTERM becomes KeyboardInterrupt, so teardown (engine stop, partial results) runs as on Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return signal.SIG_DFL


def _test_id(case: BenchmarkCase, scenario: str, mode: str, config: pytest.Config) -> str:
    """Accuracy tests of a case are ``<model>_accuracy``; ``--harness-mode accuracy`` keeps the ids."""
    global_mode = _opt(config, "mode") or "performance"
    return case.test_id(
        scenario, "accuracy" if mode == "accuracy" and global_mode == "performance" else "performance"
    )


@pytest.fixture
def harness_case(harness_case_scenario: tuple[BenchmarkCase, str, str]) -> BenchmarkCase:
    return harness_case_scenario[0]


@pytest.fixture
def harness_scenario(harness_case_scenario: tuple[BenchmarkCase, str, str]) -> str:
    return harness_case_scenario[1]


@pytest.fixture
def harness_test_dir(
    pytestconfig: pytest.Config, harness_case_scenario: tuple[BenchmarkCase, str, str]
) -> Path:
    case, scenario, mode = harness_case_scenario
    state = pytestconfig.stash[STATE]
    d = _session_dir(pytestconfig, state) / _test_id(case, scenario, mode, pytestconfig)
    d.mkdir(parents=True, exist_ok=False)  # a fresh session folder: an existing test dir is a bug
    return d


@pytest.fixture
def harness_engine(
    pytestconfig: pytest.Config, harness_engines: EngineManager, harness_case: BenchmarkCase
) -> Endpoint:
    state = pytestconfig.stash[STATE]
    engine_dir = _session_dir(pytestconfig, state) / f"engine-{harness_case.name}"
    return harness_engines.get(harness_case, engine_dir)


class HarnessBenchmark:
    """What a benchmark test calls: ``run()`` then ``check(result)``."""

    def __init__(
        self, request: pytest.FixtureRequest, case: BenchmarkCase, scenario: str, mode: str, test_dir: Path
    ) -> None:
        self.request = request
        self.config = request.config
        self.case = case
        self.scenario = scenario
        self.mode = mode
        self.test_id = _test_id(case, scenario, mode, request.config)
        self.test_dir = test_dir
        self.result: BenchmarkResult | None = None
        self.opts: RunOptions | None = None  # validated once per test, in _run

    def options(self) -> RunOptions:
        c = self.config
        user_conf = _path_opt(c, "user-conf")
        if self.case.user_conf:
            user_conf = self.case.resolve(self.case.user_conf)
        if user_conf is None or not user_conf.is_file():
            pytest.fail(
                f"user.conf {str(user_conf)!r} not found; pass --harness-user-conf PATH", pytrace=False
            )
        try:
            parse_user_conf(user_conf)
        except UserConfError as exc:
            pytest.fail(str(exc), pytrace=False)
        return RunOptions(
            user_conf=user_conf,
            mode=self.mode,
            target_qps=_float_opt(c, "target-qps"),
            min_duration_ms=int(v) if (v := _opt(c, "min-duration-ms")) is not None else None,
            min_query_count=int(v) if (v := _opt(c, "min-query-count")) is not None else None,
            sample_count=int(v) if (v := _opt(c, "sample-count")) is not None else None,
            request_timeout_s=_float_opt(c, "request-timeout-s") or 600.0,
            test_timeout_s=_float_opt(c, "test-timeout-s") or 7200.0,
            api_key_env=_opt(c, "api-key-env"),
            client_workers=_client_workers(c),
        )

    def run(self) -> BenchmarkResult:
        handler = logging.FileHandler(self.test_dir / "harness.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        started = time.time()
        try:
            return self._run(started)
        finally:
            log.removeHandler(handler)
            handler.close()

    def _run(self, started: float) -> BenchmarkResult:
        case = self.case
        opts = self.opts = self.options()
        dataset_path = case.resolve(case.dataset.path)
        try:
            dataset = load_dataset(case.dataset, dataset_path)  # fail here, clearly, before LoadGen starts
            dataset_error = None
        except DatasetError as exc:
            dataset_error = str(exc)
        if dataset_error is not None:
            # Outside the except block: pytest would print the message twice, as a chained exception.
            if self.config.getoption("harness_skip_missing") or self.config.getini("harness_skip_missing"):
                pytest.skip(dataset_error)
            self._emit(self._error_result(dataset_error), None, started)
            pytest.fail(dataset_error, pytrace=False)
        try:
            endpoint: Endpoint = self.request.getfixturevalue("harness_engine")
        except pytest.fail.Exception as exc:
            # The engine did not start (or died earlier): still a result, like any other failed test.
            self._emit(self._error_result(str(exc.msg)), None, started)
            raise
        log.info("running %s against %s (%s)", self.test_id, endpoint.base_url, endpoint.kind)
        choice = self._size_load(opts, endpoint, dataset_path, started)
        if choice is not None and choice.value is not None and choice.source == "measured":
            opts = self.opts = replace(opts, target_qps=choice.value)
        if choice is not None and choice.setting == "single_stream_expected_latency_ms":
            opts = self.opts = replace(opts, single_stream_latency_from_warmup=choice.source == "measured")
        result = self._attempt(opts, endpoint, dataset, dataset_path, started, choice)
        earlier: list[dict[str, Any]] = []
        while (
            choice is not None
            and choice.attempts < MAX_OFFLINE_ATTEMPTS
            and needs_offline_rerun(
                self.scenario, self.mode, result.status, result.invalid_constraints, result.queries.failed
            )
        ):
            assert result.samples_per_s is not None
            name = f"attempt-{choice.attempts}"
            self._keep_attempt(name)
            earlier.append(
                {
                    "dir": str(self.test_dir / name),
                    "offline_expected_qps": result.settings.get("target_qps"),
                    "samples_per_s": result.samples_per_s,
                    "status": result.status,
                    "reason": result.reason,
                }
            )
            choice = offline_rerun(choice, result.samples_per_s, result.settings.get("target_qps"))
            log.info("%s: %s", self.test_id, choice.reason)
            opts = self.opts = replace(opts, target_qps=choice.value)
            result = self._attempt(opts, endpoint, dataset, dataset_path, started, choice)
        if earlier:
            result.rate["earlier_attempts"] = earlier
        self._remember_offline(result)
        if self.mode == "accuracy" and result.status in ("VALID", "INVALID"):
            try:
                result.accuracy = score_run(case, self.test_dir, dataset)
            except (AccuracyRunError, ValueError, OSError) as exc:
                result.accuracy = {"error": str(exc)}
        md = self._metadata(result, endpoint, started)
        self._gate(result, md)
        self._emit(result, endpoint, started, metadata=md)
        self.result = result
        return result

    def _attempt(
        self,
        opts: RunOptions,
        endpoint: Endpoint,
        dataset: Any,
        dataset_path: Path,
        started: float,
        choice: LoadChoice | None,
        test_dir: Path | None = None,
    ) -> BenchmarkResult:
        """One LoadGen run with its telemetry; Ctrl-C still leaves a result on disk."""
        test_dir = test_dir or self.test_dir
        telemetry = TestTelemetry(endpoint.base_url, endpoint.headers)
        t0_ns = time.monotonic_ns()
        progress = self._progress(opts, dataset) if test_dir == self.test_dir else None
        try:
            with progress.live() if progress else contextlib.nullcontext():
                result = run_benchmark(
                    self.case,
                    self.scenario,
                    endpoint,
                    opts,
                    test_dir,
                    dataset_path,
                    t0_ns=t0_ns,
                    on_start=lambda pid: telemetry.start(t0_ns, pid),
                    on_tick=progress.tick if progress else None,
                )
        except KeyboardInterrupt:
            telemetry.stop()
            result = build_result(
                self.case,
                self.scenario,
                opts.mode,
                test_dir,
                "INTERRUPTED",
                "interrupted (Ctrl-C or SIGTERM); partial results kept",
                None,
                time.time() - started,
                endpoint.alive(),
            )
            result.test_id = self.test_id
            result.rate = _load_record(choice, test_dir)
            self._attach_telemetry(result, telemetry, test_dir)
            self._emit(result, endpoint, started, write_now=True)
            raise
        telemetry.stop()
        result.test_id = self.test_id  # build_result knows the scenario only: "<model>_accuracy" is ours
        result.rate = _load_record(choice, test_dir)
        self._attach_telemetry(result, telemetry, test_dir)
        return result

    def _size_load(
        self, opts: RunOptions, endpoint: Endpoint, dataset_path: Path, started: float
    ) -> LoadChoice | None:
        """The rate of this run: the user's, or one derived from a measurement on this machine."""
        if self.mode == "accuracy":
            return None  # AccuracyOnly issues every sample once, whatever the rate
        lg_scenario = LOADGEN_SCENARIO[self.scenario]
        lg_model = self.case.loadgen_model[self.scenario]  # type: ignore[index]
        entries = parse_user_conf(opts.user_conf)
        choice = explicit_rate(entries, lg_model, lg_scenario, opts.target_qps)
        if choice is not None:
            return choice
        if lg_scenario == "SingleStream":
            return single_stream_from_warmup()
        if lg_scenario == "Offline":
            return LoadChoice(
                setting="offline_expected_qps",
                value=None,
                source="loadgen default",
                reason=f"no {lg_model}.Offline.target_qps in user.conf: LoadGen's default; an Offline run "
                "that ends before min_duration is repeated once at the measured rate",
            )
        state = self.config.stash[STATE]
        measured = state.offline_measured.get(self.case.name)
        if measured is None:
            measured = self._offline_probe(opts, endpoint, dataset_path, started)
            state.offline_measured[self.case.name] = measured
        return server_from_offline(measured[0], self.case.load.server_fraction, measured[1])

    def _offline_probe(
        self, opts: RunOptions, endpoint: Endpoint, dataset_path: Path, started: float
    ) -> tuple[float, str]:
        """A short Offline run (``load.probe_queries`` samples) to measure this model's throughput."""
        probe_dir = self.test_dir / "probe-offline"
        n = self.case.load.probe_queries
        _progress(
            self.config,
            f"[harness] {self.test_id}: no Offline result for {self.case.name} in this session; "
            f"measuring its throughput with a {n}-sample Offline probe ({probe_dir}) ...",
        )
        lg_names = self.case.loadgen_model
        case = self.case
        if "Offline" not in lg_names:
            case = case.model_copy(update={"loadgen_model": {**lg_names, "Offline": lg_names[self.scenario]}})  # type: ignore[index]
        probe_opts = replace(opts, target_qps=None, min_duration_ms=0, min_query_count=n)
        r = run_benchmark(case, "Offline", endpoint, probe_opts, probe_dir, dataset_path)
        if r.samples_per_s is None or r.queries.failed or r.status not in ("VALID", "INVALID"):
            fail = (
                f"cannot size the {self.scenario} load of {self.case.name}: the Offline probe ended "
                f"{r.status} ({r.reason or r.queries.first_error or 'no throughput measured'}; {probe_dir}); "
                f"set a target with --harness-target-qps or {lg_names[self.scenario]}.Server.target_qps "  # type: ignore[index]
                "in user.conf"
            )
            self._emit(self._error_result(fail), endpoint, started)
            pytest.fail(fail, pytrace=False)
        return float(r.samples_per_s), "probe-offline"

    def _keep_attempt(self, name: str) -> None:
        """Move a finished attempt's files (not harness.log, still being written) into a sub-folder."""
        dest = self.test_dir / name
        dest.mkdir()
        for path in list(self.test_dir.iterdir()):
            if path.name != "harness.log" and not path.name.startswith(("attempt-", "probe-")):
                shutil.move(str(path), dest / path.name)

    def _remember_offline(self, result: BenchmarkResult) -> None:
        """An Offline performance run's samples/s sizes this model's later Server tests."""
        if (
            self.scenario == "Offline"
            and self.mode == "performance"
            and result.samples_per_s
            and result.queries.failed == 0
            and (result.status == "VALID" or failed_checks(result.invalid_constraints) == [MIN_DURATION_ONLY])
        ):
            state = self.config.stash[STATE]
            state.offline_measured[self.case.name] = (float(result.samples_per_s), self.test_id)

    def _gate(self, result: BenchmarkResult, md: dict[str, Any]) -> None:
        """Every check of this test → result.gate (one entry per violation)."""
        state = self.config.stash[STATE]
        t = apply_overrides(self.case.thresholds, state.threshold_overrides, self.case.name, self.test_id)
        data = result.model_dump(mode="json")
        violations = check_thresholds(data, t)
        if self.mode == "performance" and result.status == "INVALID" and not t.require_valid:
            violations = [v for v in violations if v.source != "validity"]
        violations += check_consistency(result.consistency)
        if self.mode == "performance":
            bound = check_client_bound(data)
            result.client["client_bound"] = [v.message for v in bound]
            if not _opt(self.config, "allow-client-bound"):
                violations += bound
        if self.mode == "accuracy":
            acc = result.accuracy
            if "error" in acc:
                violations.append(
                    Violation.make("accuracy", "not scored", "scored", "must_equal", "accuracy", acc["error"])
                )
            elif self.case.accuracy is not None and "target" in acc:
                violations += check_accuracy(
                    acc["scores"],
                    acc["target"],
                    self.case.accuracy.min_ratio,
                    self.case.accuracy.gen_len_band,
                )
            # accuracy runs have no latency constraints to be VALID against
            violations = [v for v in violations if v.metric != "validity"]
        if state.baseline is not None:
            cli_pct = self.config.getoption("harness_max_regression")
            pct = float(cli_pct) if cli_pct is not None else t.max_regression_pct
            bv, warnings, rows = compare_baseline(
                self.test_id, data, md, state.baseline, pct, t.max_regression_pct_per_metric
            )
            violations += bv
            result.baseline = {"path": str(state.baseline_path), "warnings": warnings, "rows": rows}
        result.gate = [v.model_dump() for v in violations]

    def _progress(self, opts: RunOptions, dataset: Any) -> _LiveProgress | None:
        """Live progress only on a terminal, never in CI logs or from xdist workers."""
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if (
            tr is None
            or not getattr(tr, "isatty", False)
            or os.environ.get("CI")
            or hasattr(self.config, "workerinput")
        ):
            return None
        try:
            entries = parse_user_conf(opts.user_conf)
        except UserConfError:
            entries = []
        n = min(len(dataset), opts.sample_count) if opts.sample_count else len(dataset)
        lg_scenario = LOADGEN_SCENARIO[self.scenario]
        lg_model = self.case.loadgen_model[self.scenario]  # type: ignore[index]
        expected = (
            n
            if self.mode == "accuracy"
            else expected_queries(
                entries,
                lg_model,
                lg_scenario,
                n,
                opts.target_qps if lg_scenario != "SingleStream" else None,
                opts.min_duration_ms,
                opts.min_query_count,
            )
        )
        return _LiveProgress(
            self.config, RunProgress(self.test_id, self.test_dir / "requests.jsonl", expected, sys.stdout)
        )

    def _attach_telemetry(self, result: BenchmarkResult, telemetry: TestTelemetry, test_dir: Path) -> None:
        requests = read_requests(test_dir / "requests.jsonl")
        try:
            values, _ = parse_mllog(test_dir / "mlperf" / "mlperf_log_detail.txt")
        except (MllogError, OSError):
            values = {}  # LoadGen did not run or crashed: the CDFs are drawn without limits
        limits_ms, target_pct = latency_limits(values)
        result.telemetry = telemetry.finish(
            test_dir, requests, result.queries.output_tokens, limits_ms, target_pct
        )
        for key in ("timeline",):
            if key in result.telemetry:
                result.paths[key] = result.telemetry[key]
        if result.telemetry.get("plots"):
            result.paths["plots"] = str(test_dir / "plots")

    def _error_result(self, reason: str) -> BenchmarkResult:
        return BenchmarkResult(
            test_id=self.test_id,
            model=self.case.name,
            scenario=self.scenario,
            mode=self.mode,
            loadgen_model=self.case.loadgen_model[self.scenario],  # type: ignore[index]
            status="ERROR",
            reason=reason,
            paths={"test_dir": str(self.test_dir)},
        )

    def _metadata(self, result: BenchmarkResult, endpoint: Endpoint | None, started: float) -> dict[str, Any]:
        key_env = _opt(self.config, "api-key-env")
        secrets = [os.environ.get(key_env, "")] if key_env else []
        md: dict[str, Any] = {
            "schema_version": 1,
            "test_id": result.test_id,
            "nodeid": self.request.node.nodeid,
            "case": self.case.model_dump(mode="json"),
            "scenario": self.scenario,
            "mode": result.mode,
            "engine": None
            if endpoint is None
            else {
                "kind": endpoint.kind,
                "base_url": endpoint.base_url,
                "served_model": endpoint.served_model,
                "version": endpoint.version,
                "argv": redact_argv(endpoint.argv, secrets),
                "log": str(endpoint.log_path) if endpoint.log_path else None,
                "pid": endpoint.pid,
                "start_s": endpoint.info.get("start_s"),
                "start_number": endpoint.info.get("start_number"),
            },
            "run_options": {
                k: str(v) if isinstance(v, Path) else v
                for k, v in (self.opts or self.options()).__dict__.items()
            },
            "command_line": redact_argv(list(self.config.invocation_params.args), secrets),
            "cwd": str(self.config.invocation_params.dir),
            "started_utc": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(),
            "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(),
            "environment": capture_environment(self.config.rootpath),
            "outputs": {
                "test_dir": str(self.test_dir),
                "result": str(self.test_dir / "result.yaml"),
                "metadata": str(self.test_dir / "metadata.yaml"),
                **result.paths,
            },
            "mlflow": _mlflow_settings(self.config),
        }
        self.config.hook.pytest_harness_update_metadata(config=self.config, case=self.case, metadata=md)
        return md

    def _emit(
        self,
        result: BenchmarkResult,
        endpoint: Endpoint | None,
        started: float,
        write_now: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        md = metadata or self._metadata(result, endpoint, started)
        payload = json.dumps({"result": result.model_dump(mode="json"), "metadata": md})
        self.request.node.user_properties.append((RESULT_PROP, payload))
        if write_now and not hasattr(self.config, "workerinput"):
            # Interrupted: the report may never reach the controller hook, so write the files here.
            write_yaml(self.test_dir / "result.yaml", result.model_dump(mode="json"))
            write_yaml(self.test_dir / "metadata.yaml", md)

    def check(self, result: BenchmarkResult) -> None:
        """Fail the test with one line per violation; an engine's log tail follows when it died."""
        if not result.gate:
            return
        # One line per violation, the first one first: CI's one-line summaries show something useful.
        lines = [v["message"] for v in result.gate]
        if result.status == "INVALID" and result.rate.get("setting"):
            load = result.rate
            value = "as configured" if load.get("value") is None else f"{load['value']:g}"
            lines.append(f"load: {load['setting']} {value} ({load['source']}: {load['reason']})")
        if result.status in ("ERROR", "TIMEOUT") and result.reason and "\n" in result.reason:
            lines.append(result.reason)
        pytest.fail("\n".join(lines), pytrace=False)


@pytest.fixture
def harness_benchmark(
    request: pytest.FixtureRequest,
    harness_case_scenario: tuple[BenchmarkCase, str, str],
    harness_test_dir: Path,
) -> HarnessBenchmark:
    case, scenario, mode = harness_case_scenario
    return HarnessBenchmark(request, case, scenario, mode, harness_test_dir)


# -- reports (controller) ------------------------------------------------------------------------
class HarnessReporter:
    """Registered on the controller only: turns test reports into hook calls, files and a summary."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.state = config.stash[STATE]

    @pytest.hookimpl(trylast=True)  # after -k/-m deselection
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        """Claim the session folder once harness tests are selected: an unusable output dir is then
        a usage error before any engine starts, not an error in every test."""
        if not config.option.collectonly and any(i.get_closest_marker("harness_benchmark") for i in items):
            _session_dir(config, self.state)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Turn the test's result property into the hook call and compact JUnit properties."""
        props = report.user_properties
        payloads = [v for k, v in props if k == RESULT_PROP]
        if not payloads:
            return
        props[:] = [(k, v) for k, v in props if k != RESULT_PROP]
        data = json.loads(str(payloads[-1]))
        r = data["result"]
        # Every phase's report carries its own copy of the item's properties, and junitxml reads the
        # teardown report's: put the compact properties on each report that carried the payload.
        for key in ("status", "tokens_per_s", "samples_per_s"):
            props.append((f"harness_{key}", r.get(key)))
        props.append(("harness_ttft_p99_ms", r["ttft_ms"].get("p99")))
        props.append(("harness_tpot_p99_ms", r["tpot_ms"].get("p99")))
        props.append(("harness_failed_requests", r["queries"]["failed"]))
        props.append(("harness_result_path", data["metadata"]["outputs"]["result"]))
        if report.when != "call":
            return  # the hook (and the files) once per test
        self.config.hook.pytest_harness_result(
            config=self.config, item_id=report.nodeid, result=r, metadata=data["metadata"]
        )

    @pytest.hookimpl(trylast=True)
    def pytest_harness_result(
        self, config: pytest.Config, item_id: str, result: dict[str, Any], metadata: dict[str, Any]
    ) -> None:
        """The plugin's own writer: result.yaml + metadata.yaml."""
        out = metadata["outputs"]
        for key, data in (("result", result), ("metadata", metadata)):
            try:
                write_yaml(Path(out[key]), data)
            except OSError as exc:
                # A full or failing disk must not end the session in an INTERNALERROR traceback.
                self._write_error(Path(out[key]), exc)
        self.state.results.append({"nodeid": item_id, **result})
        self.state.baseline_entries[result["test_id"]] = baseline_entry(result, metadata)
        self.state.hardware = hardware_of(metadata)

    def _write_error(self, path: Path, exc: OSError) -> None:
        message = (
            f"cannot write {path}: {exc.strerror or exc}; free space on that disk or pass "
            "--harness-output-dir DIR"
        )
        log.error("%s", message)
        self.state.write_errors.append(message)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        state = self.state
        save = _path_opt(self.config, "save-baseline")
        if save is not None and state.baseline_entries:
            save_baseline(save, state.baseline_entries, state.hardware)
        if state.session_dir is not None and not state.results:
            with contextlib.suppress(OSError):
                state.session_dir.rmdir()  # claimed but unused (e.g. all tests skipped); only if empty
        if state.results and state.session_dir is not None:
            path = state.session_dir / "session.yaml"
            key_env = _opt(self.config, "api-key-env")
            secrets = [os.environ.get(key_env, "")] if key_env else []
            try:
                write_yaml(
                    path,
                    {
                        "schema_version": 1,
                        "started_utc": dt.datetime.fromtimestamp(state.started, dt.timezone.utc).isoformat(),
                        "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(),
                        # as in metadata.yaml: no API key value, no credentials in URLs
                        "command_line": redact_argv(list(self.config.invocation_params.args), secrets),
                        "results": state.results,
                    },
                )
            except OSError as exc:
                self._write_error(path, exc)
            from .metrics.plots import write_session_summary  # lazily: the plugin loads in every run

            write_session_summary(state.session_dir / "summary.png", state.results)
        if state.write_errors and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED  # results were lost: not a green run

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        state = self.state
        for message in state.write_errors:
            terminalreporter.write_line(f"harness: {message}", red=True)
        if not state.results:
            return
        tr = terminalreporter
        tr.section("harness benchmark results")
        rows = [("test", "status", "tok/s", "samples/s", "TTFT p99 ms", "TPOT p99 ms", "failed")]
        for r in state.results:
            rows.append(
                (
                    r["test_id"],
                    r["status"],
                    _fmt(r.get("tokens_per_s")),
                    _fmt(r.get("samples_per_s"), ".2f"),
                    _fmt(r["ttft_ms"].get("p99")),
                    _fmt(r["tpot_ms"].get("p99"), ".2f"),
                    str(r["queries"]["failed"]),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for n, row in enumerate(rows):
            line = "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            tr.write_line(line, bold=n == 0)
        for r in state.results:
            if r.get("gate"):
                tr.write_line(f"{r['test_id']} FAILED:", red=True)
                for v in r["gate"]:
                    tr.write_line(f"  - {v['message']}", red=True)
        rows_b = [row for r in state.results for row in (r.get("baseline") or {}).get("rows", [])]
        if rows_b:
            tr.write_line("")
            tr.write_line(f"baseline comparison ({state.baseline_path}):", bold=True)
            for row in rows_b:
                flag = "REGRESSED" if row["regressed"] else "ok"
                tr.write_line(
                    f"  {row['test_id']:<28} {row['metric']:<16} {row['baseline']:>12.4g} -> "
                    f"{row['current']:<12.4g} {row['change_pct']:+7.2f}%  "
                    f"(allowed {row['allowed_regression_pct']}%)  {flag}",
                    red=row["regressed"],
                )
            for r in state.results:
                for w in (r.get("baseline") or {}).get("warnings", []):
                    tr.write_line(f"  warning: {w}", yellow=True)
        if state.session_dir is not None:
            tr.write_line(f"session results: {state.session_dir / 'session.yaml'}")
            if (state.session_dir / "summary.png").is_file():
                tr.write_line(f"session summary figure: {state.session_dir / 'summary.png'}")


def _load_record(choice: LoadChoice | None, test_dir: Path) -> dict[str, Any]:
    """``rate:`` of result.yaml; a SingleStream latency measured by the runner is read back here."""
    if choice is None:
        return {}
    if choice.setting == "single_stream_expected_latency_ms" and choice.source == "measured":
        client_path = test_dir / "client.json"
        warmup = json.loads(client_path.read_text()).get("warmup", {}) if client_path.is_file() else {}
        measured = warmup.get("single_stream_expected_latency_ms")
        if measured is None:
            choice = choice.model_copy(
                update={"reason": "the warm-up request failed, so LoadGen's configured value was used"}
            )
        else:
            choice = choice.model_copy(update={"value": measured})
    return choice.model_dump()


def _mlflow_settings(config: pytest.Config) -> dict[str, Any] | None:
    """Where live logging went (or None); credentials in a URI are never kept."""
    uri = _opt(config, "mlflow-uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    return {
        "tracking_uri": scrub_url_credentials(uri),
        "experiment_name": _opt(config, "mlflow-experiment") or "harness-fixtures",
    }


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)
