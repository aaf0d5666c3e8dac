"""Run one benchmark test, with no pytest inside.

:func:`run_test` does, in order: user.conf and dataset checks → the engine → the rate (the user's, or
sized from a measurement) → the LoadGen child run (repeated for an Offline run that outran
``min_duration``) → telemetry and plots → accuracy scoring → metadata → gating, and returns an
:class:`Outcome` whose result is built once. The pytest plugin, ``tools/bench_client.py`` and
``tools/soak.py`` call it; progress lines, the live progress display and the metadata hook reach the
caller through :class:`Events`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import redaction
from .accuracy.run import AccuracyRunError, score_run
from .client.httpconfig import HttpConfig, ServerUrl
from .client.payload import PROFILES, PayloadError, RequestProfile, token_source
from .client.requestlog import client_stats, endpoint_stats, read_requests, request_metrics
from .config import BenchmarkCase, ConfigError, PlannedRun, url_problem
from .dataset import Dataset, DatasetError, DatasetMissing, load_dataset, vocab_size
from .diagnosis import diagnose
from .environment import capture as capture_environment
from .gating import (
    Baseline,
    apply_overrides,
    check_accuracy,
    check_client_bound,
    check_compliance,
    check_consistency,
    check_thresholds,
    compare_baseline,
    stable_args,
)
from .loadgen.capacity import (
    MAX_CONFIRMATIONS,
    CapacitySearch,
    Limits,
    constraint_checks,
    early_stopping_percentile,
    limits_of,
    load_store,
    probe_margins,
    save_capacity,
    step_down,
    store_key,
)
from .loadgen.child import ChildOutcome, run_child
from .loadgen.compliance import (
    answer_first_tokens,
    greedy,
    logged_answers,
    verify_test06,
    write_audit_config,
)
from .loadgen.effective import EffectiveSettings, EffectiveSettingsError, effective_settings
from .loadgen.mllog import LoadGenRun, MllogError
from .loadgen.sizing import (
    MAX_OFFLINE_ATTEMPTS,
    expected_queries,
    explicit_rate,
    needs_offline_rerun,
    offline_rate,
    offline_rerun,
    server_from_offline,
    single_stream_from_warmup,
    usable_offline_measurement,
)
from .loadgen.spec import RunSpec
from .loadgen.userconf import ConfEntry, UserConfError, parse_user_conf, unknown_models
from .metrics.plots import LatencyMarks, RunWindow, write_capacity_plot
from .metrics.telemetry import RunTelemetry
from .metrics.window import gauges_over
from .options import HarnessOptions, OptionError
from .results import (
    FINISHED,
    AccuracyResult,
    BaselineComparison,
    BenchmarkResult,
    CapacityConfirmation,
    CapacityProbe,
    CapacityResult,
    ComplianceResult,
    Consistency,
    ConstraintCheck,
    EndpointStats,
    EngineInfo,
    EngineWindow,
    LatencyLimits,
    Metadata,
    Percentiles,
    QueryCounts,
    RateChoice,
    Status,
    TelemetryResult,
    Test06Result,
    Violation,
)
from .servers.base import Endpoint, EngineError
from .servers.launchers import engine_gpu_env, metrics_paths
from .servers.process import LOG_TAIL_LINES

log = logging.getLogger("harness_fixtures")
CAPACITY_STORE = "capacity.yaml"  # in the output dir: the capacity last found per model, engine, hardware

ProgressTick = Callable[[float], None]


class Events:
    """How a run talks to its caller; the defaults log and do nothing else."""

    def message(self, text: str) -> None:
        """A line for the terminal now (engine starts and probes take minutes)."""
        log.info("%s", text)

    @contextlib.contextmanager
    def live(self, test_id: str, requests_path: Path, expected: int | None) -> Iterator[ProgressTick | None]:
        """While LoadGen runs: a callable ticked about once a second, or None for no display."""
        yield None

    def update_metadata(self, case: BenchmarkCase, metadata: dict[str, Any]) -> None:
        """Add fields to metadata.yaml (the plugin calls pytest_harness_update_metadata)."""

    def child_started(self, pid: int) -> None:
        """The LoadGen runner process of a run is up (tools watch its memory, tests its workers)."""


def check_endpoints(cases: list[BenchmarkCase], options: HarnessOptions) -> None:
    """Replicas and server URLs that cannot work together, said before any engine starts.

    :raises OptionError: names the case or option, the value and the fix.
    """
    urls = options.endpoint_urls()
    for url in urls:
        problem = url_problem(url)
        if problem:
            raise OptionError(f"--harness-server-url {url!r} {problem}")
    for group in [list(urls)] + [[] if urls else c.engine.endpoint_urls() for c in cases]:
        # user:password of a URL reaches the LoadGen child by one environment variable: one for all.
        if len({ServerUrl.parse(u, "server URL").basic_auth() for u in group}) > 1:
            raise OptionError(
                "the server URLs carry different user:password credentials; one run sends one set to "
                "every endpoint: give them the same, or use --harness-api-key-env / --harness-header"
            )
    for case in cases:
        if urls and case.engine.replicas > 1:
            raise OptionError(
                f"{case.source or case.name}: engine.replicas is {case.engine.replicas}, but "
                f"--harness-server-url names servers the suite does not start ({len(urls)}); drop "
                "--harness-server-url to start the replicas, or pass each running server's URL"
            )
        for url in [] if urls else case.engine.endpoint_urls():
            ServerUrl.parse(url, f"engine.urls of {case.source or case.name}")


@dataclass
class Suite:
    """What a session's tests share: the options and the files they named, loaded once."""

    options: HarnessOptions
    threshold_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    baseline: Baseline | None = None
    root: Path = field(default_factory=Path.cwd)
    command_line: list[str] = field(default_factory=list)
    cwd: Path = field(default_factory=Path.cwd)
    # Offline samples/s per model measured this session (Offline test or probe) → (value, where): it
    # sizes the model's Server/Interactive load. A model's tests share one xdist worker.
    offline_measured: dict[str, tuple[float, str]] = field(default_factory=dict)
    _user_confs: dict[Path, list[ConfEntry]] = field(default_factory=dict)
    http: HttpConfig | None = None  # the session's one HTTP configuration (built from options if unset)

    def http_config(self) -> HttpConfig:
        """Headers, proxies and TLS for every request of the session (stream, health, /metrics)."""
        if self.http is None:
            self.http = HttpConfig.from_options(self.options)
            redaction.add_secrets(self.http.secret_values())  # env: header values, never written
        return self.http

    def __post_init__(self) -> None:
        o = self.options
        redaction.add_secrets(
            [
                o.api_key(),
                *(redaction.url_password(u) for u in o.endpoint_urls()),
                redaction.url_password(o.mlflow_uri),
            ]
        )

    def secrets(self) -> list[str]:
        key = self.options.api_key()
        return ([key] if key else []) + self.http_config().secret_values()

    def check_user_confs(self, cases: list[BenchmarkCase]) -> None:
        """Parse every user.conf the cases use and check its model names against theirs.

        :raises UserConfError: a bad line, or a line for a LoadGen model name no case using the file
            has (LoadGen would ignore it: a typo there silently runs with other settings).
        """
        users: dict[Path, set[str]] = {}
        for case in cases:
            path = case.resolve(case.user_conf) if case.user_conf else self.options.user_conf
            if path is not None and path.is_file():
                users.setdefault(path, set()).update(case.loadgen_model.values())
        errors = []
        for path, names in users.items():
            if path not in self._user_confs:
                self._user_confs[path] = parse_user_conf(path)
            errors += unknown_models(path, self._user_confs[path], names)
        if errors:
            raise UserConfError("\n".join(errors))

    def user_conf(self, case: BenchmarkCase) -> tuple[Path, list[ConfEntry]]:
        """The case's user.conf (its own, else the suite's), parsed once per session.

        :raises UserConfError: missing or invalid; the message names the file, line and fix.
        """
        path = case.resolve(case.user_conf) if case.user_conf else self.options.user_conf
        if path is None or not path.is_file():
            raise UserConfError(f"user.conf {str(path)!r} not found; pass --harness-user-conf PATH")
        if path not in self._user_confs:
            self._user_confs[path] = parse_user_conf(path)
        return path, self._user_confs[path]


@dataclass
class Outcome:
    """A finished test: its result and metadata (files are the caller's to write)."""

    result: BenchmarkResult
    metadata: Metadata
    skippable: bool = False  # the dataset is missing: --harness-skip-missing may skip the test


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run; ``outcome`` holds what was measured (status INTERRUPTED)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__("interrupted")
        self.outcome = outcome


def run_test(
    planned: PlannedRun,
    get_endpoint: Callable[[], Endpoint | list[Endpoint]],
    suite: Suite,
    test_dir: Path,
    events: Events | None = None,
    nodeid: str | None = None,
) -> Outcome:
    """Run one benchmark test into ``test_dir``; the engine is asked for only once the inputs are good.

    :param get_endpoint: the engine for the case, or every endpoint of it (replicas, several URLs: one
        LoadGen sends to all, each query to one), started on demand; raises EngineError.
    :raises RunInterrupted: on Ctrl-C / SIGTERM, after LoadGen was stopped; carries the outcome.
    """
    test_dir.mkdir(parents=True, exist_ok=True)
    redaction.add_secrets(redaction.case_secrets(planned.case.engine.model_dump()))
    redaction.protect_loggers()  # every harness log line, in harness.log and pytest's captured logs
    handler = logging.FileHandler(test_dir / "harness.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(redaction.RedactingFilter())  # records of other loggers handled here too
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        return _TestRun(planned, suite, test_dir, events or Events(), nodeid).execute(get_endpoint)
    finally:
        log.removeHandler(handler)
        handler.close()


class _TestRun:
    def __init__(
        self, planned: PlannedRun, suite: Suite, test_dir: Path, events: Events, nodeid: str | None
    ) -> None:
        self.p = planned
        self.case = planned.case
        self.suite = suite
        self.opts = suite.options
        self.test_dir = test_dir
        # Files are recorded relative to the session folder (the test folder's parent), so a session
        # copied or moved elsewhere still reads and uploads.
        self.session_dir = test_dir.resolve().parent
        self.events = events
        self.nodeid = nodeid
        self.started = time.time()
        self.endpoint: Endpoint | None = None  # the first endpoint (telemetry, engine window, metadata)
        self.endpoints: list[Endpoint] = []  # every endpoint of the run
        self.spec: RunSpec | None = None
        self._capacity: CapacityResult | None = None
        self._checks: list[ConstraintCheck] = []  # the last run's latency limits and observations
        self._requests: list[dict[str, Any]] = []  # the last run's request log
        self._warmup: dict[str, Any] = {}  # the last run's warm-up request (unloaded latency)
        self.child_env: dict[str, str] = {}  # credentials for the LoadGen child (never in run_spec.json)

    # -- the steps -------------------------------------------------------------------------------
    def execute(self, get_endpoint: Callable[[], Endpoint | list[Endpoint]]) -> Outcome:
        """The steps, with a result whatever happens: an unexpected error is an ERROR result."""
        try:
            return self._steps(get_endpoint)
        except RunInterrupted:
            raise
        except KeyboardInterrupt:
            # Outside a LoadGen run (engine start, a probe's set-up): nothing measured to keep.
            raise RunInterrupted(
                self._error("interrupted (Ctrl-C or SIGTERM) before LoadGen ran", status="INTERRUPTED")
            ) from None
        except Exception as exc:
            log.exception("%s: unexpected error", self.p.test_id)
            return self._error(
                f"harness error: {type(exc).__name__}: {exc} (traceback in {self.test_dir / 'harness.log'})"
            )

    def _steps(self, get_endpoint: Callable[[], Endpoint | list[Endpoint]]) -> Outcome:
        try:
            user_conf, entries = self.suite.user_conf(self.case)
        except UserConfError as exc:
            return self._error(str(exc))
        try:
            dataset_path = self.case.resolve(self.case.dataset.path, "dataset.path")
            # Before any engine starts; token ids are checked against the model's vocabulary when
            # its files are here.
            dataset = load_dataset(self.case.dataset, dataset_path, vocab=_vocab(self.case))
        except ConfigError as exc:
            return self._error(str(exc), skippable=True)
        except DatasetError as exc:
            return self._error(str(exc), skippable=isinstance(exc, DatasetMissing))
        problem = self._token_count_problem(
            PROFILES.get(self.case.engine.request_profile or self.case.engine.kind)
        )
        if problem:
            return self._error(problem)  # knowable from the case: before any engine starts
        try:
            self.case.engine_model()  # an unset ${VAR} in engine.model: said now, not by the engine
        except ConfigError as exc:
            return self._error(str(exc))
        # The copy LoadGen reads: the test folder says exactly which settings the run had.
        user_conf = Path(shutil.copyfile(user_conf, self.test_dir / "user.conf"))
        try:
            got = get_endpoint()
            self.endpoints = list(got) if isinstance(got, list) else [got]
            if not self.endpoints:
                raise EngineError("no endpoint to benchmark")
            self.endpoint = self.endpoints[0]
        except EngineError as exc:
            return self._error(str(exc))
        except KeyboardInterrupt:
            # The launcher has stopped the engine it was starting; say so in result.yaml.
            raise RunInterrupted(
                self._error(
                    "interrupted (Ctrl-C or SIGTERM) while the engine was starting; the engine was stopped",
                    status="INTERRUPTED",
                )
            ) from None
        problem = self._token_count_problem(self.endpoint.request_profile) or self._endpoints_problem()
        if problem:
            return self._error(problem)
        log.info("running %s against %s (%s)", self.p.test_id, self.endpoint.base_url, self.endpoint.kind)
        try:
            rate = self._size_rate(entries, user_conf, dataset_path)
        except _SizingFailed as exc:
            return self._error(str(exc))
        spec = self._spec(user_conf, dataset_path, rate)
        result = self._attempt(spec, dataset, rate, entries)
        earlier: list[dict[str, Any]] = []
        while (
            rate is not None
            and rate.attempts < MAX_OFFLINE_ATTEMPTS
            and needs_offline_rerun(
                self.p.scenario, self.p.mode, result.status, result.invalid_constraints, result.queries.failed
            )
        ):
            assert result.samples_per_s is not None
            name = f"attempt-{rate.attempts}"
            self._keep_attempt(name)
            earlier.append(
                {
                    "dir": self._rel(self.test_dir / name),
                    "offline_expected_qps": result.settings.get("target_qps"),
                    "samples_per_s": result.samples_per_s,
                    "status": result.status,
                    "reason": result.reason,
                }
            )
            rate = offline_rerun(rate, result.samples_per_s, result.settings.get("target_qps"))
            log.info("%s: %s", self.p.test_id, rate.reason)
            spec = spec.model_copy(update={"target_qps": rate.value})
            result = self._attempt(spec, dataset, rate, entries)
        if rate is not None and rate.source == "capacity search" and self._capacity is not None:
            result, rate = self._confirm_capacity(spec, dataset, rate, entries, result, earlier, user_conf)
        if earlier and result.rate is not None:
            result.rate.earlier_attempts = earlier
        if self.p.mode == "performance" and self.p.scenario == "Offline":
            measured = usable_offline_measurement(result)
            if measured is not None:
                self.suite.offline_measured[self.case.name] = (measured, self.p.test_id)
        if self.p.mode == "accuracy":
            result = result.model_copy(
                update={"accuracy": self._score(dataset, result.status, self.test_dir)}
            )
        elif self.opts.submission_dir is not None and result.status in FINISHED:
            result = self._submission_runs(dataset, result)
        return self._finish(result)

    def _confirm_capacity(
        self,
        spec: RunSpec,
        dataset: Dataset,
        rate: RateChoice,
        entries: list[ConfEntry],
        result: BenchmarkResult,
        earlier: list[dict[str, Any]],
        user_conf: Path,
    ) -> tuple[BenchmarkResult, RateChoice]:
        """The full-length runs after a capacity search: the test's run at the load found and, while
        it is INVALID with every request answered, up to ``MAX_CONFIRMATIONS`` − 1 more, each at a
        load the INVALID ones point to (loadgen.capacity.step_down). The last is the test's result;
        every one is in ``capacity.confirmations`` and the earlier ones' files in confirmation-<n>/."""
        assert self._capacity is not None and rate.value is not None
        precision = self.opts.capacity_precision_pct / 100
        limits, _ = self._limits(user_conf)
        runs: list[CapacityConfirmation] = []
        chosen = "the load the probes found"
        while True:
            runs.append(self._confirmation(rate.value, result, chosen, limits))
            if result.status != "INVALID" or result.queries.failed or len(runs) >= MAX_CONFIRMATIONS:
                break
            n = len(runs)
            self._keep_attempt(f"confirmation-{n}")
            runs[-1] = runs[-1].model_copy(update={"dir": self._rel(self.test_dir / f"confirmation-{n}")})
            earlier.append(
                {
                    "dir": runs[-1].dir,
                    "server_target_qps": rate.value,
                    "status": result.status,
                    "reason": result.reason,
                }
            )
            full = [(r.qps, r.margin) for r in runs if r.margin is not None]
            qps, chosen = step_down(full or [(rate.value, math.inf)], self._capacity.probes, precision)
            self.events.message(
                f"[harness] {self.p.test_id}: the full run at {rate.value:.4g} QPS was INVALID; "
                f"next at {qps:.4g} QPS ({chosen})"
            )
            rate = rate.model_copy(
                update={
                    "value": qps,
                    "attempts": rate.attempts + 1,
                    "reason": f"{rate.reason}; full run {n} at {rate.value:.4g} QPS was INVALID, so "
                    f"{qps:.4g} QPS: {chosen}",
                }
            )
            result = self._attempt(spec.model_copy(update={"target_qps": qps}), dataset, rate, entries)
        confirmed = rate.value if result.status == "VALID" else None
        self._capacity = self._capacity.model_copy(update={"confirmations": runs, "confirmed_qps": confirmed})
        # the figure again, with the full runs drawn in
        self._capacity.plot = write_capacity_plot(
            self.test_dir / "capacity" / "capacity.png", self._capacity, limits
        )
        if confirmed is not None:
            self._store_capacity(limits, self._capacity)
        return result, rate

    def _confirmation(
        self, qps: float, result: BenchmarkResult, chosen: str, limits: Limits
    ) -> CapacityConfirmation:
        """One full-length run of the confirmation: its verdict, and its margins at the percentile
        LoadGen's early stopping demanded of it (where its verdict was decided, as for the probes)."""
        at = early_stopping_percentile(len(self._requests), limits.percentile) or limits.percentile
        margins = probe_margins(self._requests, limits, at)
        return CapacityConfirmation(
            qps=qps,
            status=result.status,
            percentile=round(at, 4),
            ttft_margin=margins.get("ttft"),
            tpot_margin=margins.get("tpot"),
            chosen=chosen,
            dir=".",
        )

    def _submission_runs(self, dataset: Dataset, result: BenchmarkResult) -> BenchmarkResult:
        """What an MLPerf submission needs besides the performance run, each in its own folder:
        compliance TEST06 (``TEST06/``) and the scenario's accuracy run (``accuracy/``)."""
        assert self.spec is not None and self.endpoint is not None
        base, ep, gen = self.spec, self.endpoint, self.case.generation
        watched = self._watched()
        t06 = self.test_dir / "TEST06"
        write_audit_config(t06)  # LoadGen finds it in its working directory, the run's folder
        self.events.message(f"[harness] {self.p.test_id}: compliance TEST06 run ({t06}) ...")
        spec06 = base.model_copy(
            update={"out_dir": str(t06.resolve()), "t0_monotonic_ns": time.monotonic_ns()}
        )
        run06 = self._measure(spec06, run_child(spec06, watched, env=self.child_env))
        answers = logged_answers(t06)
        answer_first = None
        if self.p.loadgen_scenario != "Offline" and greedy(gen) and answers:
            prompts = spec06.client.load_prompts()
            idx = sorted({int(e["qsl_idx"]) for e in answers})
            firsts = answer_first_tokens(
                ep.base_url, ep.served_model, gen, [prompts[i] for i in idx], ep.headers,
                self.opts.request_timeout_s,
            )  # fmt: skip
            answer_first = dict(zip(idx, firsts, strict=True))
        verdict = verify_test06(t06, self.p.loadgen_scenario, gen.eos_token_ids, answer_first)
        (t06 / "verify_accuracy.txt").write_text(verdict.text())
        examples = dict(verdict.examples)
        if verdict.error:
            examples["error"] = verdict.error
        test06 = Test06Result(
            dir=self._rel(t06),
            status=run06.status,
            reason=run06.reason,
            samples=verdict.samples,
            first_token=verdict.first_token,
            eos=verdict.eos,
            sample_length=verdict.sample_length,
            passed=verdict.passed and run06.status in FINISHED,
            examples=examples,
        )
        acc_dir = self.test_dir / "accuracy"
        self.events.message(f"[harness] {self.p.test_id}: accuracy run ({acc_dir}) ...")
        spec_acc = base.model_copy(
            update={
                "out_dir": str(acc_dir.resolve()),
                "mode": "accuracy",
                "t0_monotonic_ns": time.monotonic_ns(),
            }
        )
        run_acc = self._measure(spec_acc, run_child(spec_acc, watched, env=self.child_env))
        accuracy = self._score(dataset, run_acc.status, acc_dir)
        if accuracy is None:
            accuracy = AccuracyResult(error=f"the accuracy run ended {run_acc.status}: {run_acc.reason}")
        return result.model_copy(update={"compliance": ComplianceResult(TEST06=test06), "accuracy": accuracy})

    def _token_count_problem(self, profile: RequestProfile | None) -> str | None:
        """Why this case's tokens cannot be counted as asked with this server, or None."""
        if profile is None:
            return None
        try:
            source = token_source(profile, self.case.generation)
        except PayloadError as exc:
            return f"{self.case.source}: {exc}"
        if source == "usage" and self.p.mode == "accuracy":
            return (
                f"{self.case.source}: accuracy needs the output token ids, and {profile.name}'s "
                f"{self.case.generation.api} stream has none (tokens would be counted from usage); use "
                "generation.api: completions for accuracy runs"
            )
        return None

    def _size_rate(self, entries: list[ConfEntry], user_conf: Path, dataset_path: Path) -> RateChoice | None:
        """The rate of this run: the user's, or derived from a measurement on this machine."""
        if self.p.mode == "accuracy":
            return None  # AccuracyOnly issues every sample once, whatever the rate
        lg_scenario = self.p.loadgen_scenario
        o = self.opts
        if lg_scenario == "Server" and (o.find_capacity or o.target_qps_auto):
            stored = None if o.find_capacity else self._stored_capacity(user_conf)
            return stored or self._capacity_rate(user_conf, dataset_path)
        choice = explicit_rate(entries, self.p.loadgen_model, lg_scenario, o.target_qps)
        if choice is not None:
            return choice
        if lg_scenario == "SingleStream":
            return single_stream_from_warmup()
        if lg_scenario == "Offline":
            return offline_rate(self.p.loadgen_model)
        measured = self._offline_measurement(user_conf, dataset_path)
        return server_from_offline(measured[0], self.case.load.server_fraction, measured[1])

    def _offline_measurement(self, user_conf: Path, dataset_path: Path) -> tuple[float, str]:
        """The model's Offline samples/s this session (its Offline test, else a short probe)."""
        measured = self.suite.offline_measured.get(self.case.name)
        if measured is None:
            measured = self._offline_probe(user_conf, dataset_path)
            self.suite.offline_measured[self.case.name] = measured
        return measured

    def _limits(self, user_conf: Path) -> tuple[Limits, EffectiveSettings]:
        try:
            eff = effective_settings(user_conf, self.p.loadgen_model, "Server")
        except EffectiveSettingsError as exc:
            raise _SizingFailed(str(exc)) from None
        return Limits(eff.ttft_latency_ms, eff.tpot_latency_ms, eff.target_latency_percentile), eff

    def _capacity_key(self, limits: Limits) -> str:
        ep = self.endpoint
        assert ep is not None
        env = capture_environment(self.suite.root)
        engine = f"{ep.kind} {ep.version} " + " ".join(stable_args(ep.argv))
        hardware = (
            f"{(env.get('cpu') or {}).get('model')}; GPUs: {[g.get('name') for g in env.get('gpus') or []]}"
        )
        return store_key(self.case.name, self.p.scenario, self.p.loadgen_model, engine, hardware, limits)

    def _stored_capacity(self, user_conf: Path) -> RateChoice | None:
        """``--harness-target-qps auto``: the capacity last found for this model, engine and hardware."""
        limits, _ = self._limits(user_conf)
        entry = load_store(self.opts.output_dir / CAPACITY_STORE).get(self._capacity_key(limits))
        if not entry or not entry.get("found_qps"):
            return None
        return RateChoice(
            setting="server_target_qps",
            value=float(entry["found_qps"]),
            source="stored capacity",
            reason=f"the capacity found by {entry.get('test_id')} in session {entry.get('session')} "
            f"({entry.get('binding_constraint')} bound), for this model, engine and hardware",
            measured_from=str(entry.get("session")),
        )

    def _capacity_rate(self, user_conf: Path, dataset_path: Path) -> RateChoice:
        """Search the highest load that meets the latency limits with short probes (loadgen.capacity)."""
        assert self.endpoint is not None
        o = self.opts
        upper, upper_from = self._offline_measurement(user_conf, dataset_path)
        limits, eff = self._limits(user_conf)
        need = math.ceil(2 / max(1e-6, 1 - limits.percentile))  # queries for the percentile to mean something
        queries = o.capacity_probe_queries or max(math.ceil(eff.min_query_count / 10), need)
        duration_ms = o.capacity_probe_duration_ms or eff.min_duration_ms // 10
        base = self._spec(user_conf, dataset_path, None)
        self.events.message(
            f"[harness] {self.p.test_id}: searching the capacity below {upper:.4g} QPS (the Offline "
            f"throughput), probes of {queries} queries / {duration_ms / 1000:g} s ..."
        )

        def probe(qps: float) -> CapacityProbe:
            n = len(search.probes) + 1
            spec = base.model_copy(
                update={
                    "out_dir": str(self.test_dir / "capacity" / f"probe-{n:02d}"),
                    "target_qps": qps,
                    "min_duration_ms": duration_ms,
                    "min_query_count": queries,
                }
            )
            assert self.endpoint is not None
            child = run_child(spec, self._watched(), env=self.child_env)
            measured = self._measure(spec, child)
            # Judged at the percentile the full-length confirmation's early stopping will demand at this
            # load (stricter than the scenario's at a few hundred queries), so what passes here passes there.
            full_queries = max(eff.min_query_count, math.ceil(qps * eff.min_duration_ms / 1000))
            at = early_stopping_percentile(full_queries, limits.percentile) or limits.percentile
            # ... and projected to its length: a queue still building in the probe keeps building there.
            margins = probe_margins(self._requests, limits, at, full_s=full_queries / qps)
            passed = (
                measured.status in FINISHED
                and measured.queries.failed == 0
                and all(m is not None and m <= 1.0 for m in margins.values())
            )
            why = None
            if not passed:
                why = diagnose(measured, self._checks, self._warmup, upper, []).verdict
            self.events.message(
                f"[harness]   probe {n}: {qps:.4g} QPS → {'pass' if passed else 'fail'} "
                f"(at p{100 * at:.4g}: TTFT {_x(margins.get('ttft'))}, TPOT {_x(margins.get('tpot'))} "
                "of the limits)"
            )
            return CapacityProbe(
                qps=qps,
                percentile=round(at, 4),
                ttft_margin=margins.get("ttft"),
                tpot_margin=margins.get("tpot"),
                verdict="pass" if passed else "fail",
                duration_s=round(child.duration_s, 3),
                dir=spec.out_dir,
                diagnosis=why,
            )

        search = CapacitySearch(probe, upper, o.capacity_precision_pct / 100, o.capacity_max_probes)
        found = search.run().model_copy(update={"upper_bound_from": upper_from})
        found.plot = write_capacity_plot(self.test_dir / "capacity" / "capacity.png", found, limits)
        self._capacity = found
        if found.found_qps is None:
            raise _SizingFailed(
                f"capacity search: {found.stopped_because} ({len(found.probes)} probes up to "
                f"{upper:.4g} QPS; {self.test_dir / 'capacity'})"
            )
        self._store_capacity(limits, found)
        return RateChoice(
            setting="server_target_qps",
            value=found.found_qps,
            source="capacity search",
            reason=(
                f"the highest load that met the latency limits in {len(found.probes)} probes: "
                f"{found.found_qps:.4g} QPS ({found.binding_constraint} bound; the next failing load is "
                f"{100 * (found.precision or 0):.1f} % higher)"
            ),
            measured_from="capacity",
            measured_samples_per_s=upper,
        )

    def _store_capacity(self, limits: Limits, found: CapacityResult) -> None:
        """Keep the capacity for ``--harness-target-qps auto``: the confirmed load once there is one,
        else what the probes found."""
        qps = found.confirmed_qps or found.found_qps
        with contextlib.suppress(OSError):
            save_capacity(
                self.opts.output_dir / CAPACITY_STORE,
                self._capacity_key(limits),
                {
                    "found_qps": qps,
                    "confirmed": found.confirmed_qps is not None,
                    "binding_constraint": found.binding_constraint,
                    "precision": found.precision,
                    "session": self.test_dir.parent.name,
                    "test_id": self.p.test_id,
                    "found_utc": dt.datetime.now(dt.timezone.utc).isoformat(),
                },
            )

    def _offline_probe(self, user_conf: Path, dataset_path: Path) -> tuple[float, str]:
        """A short Offline run (``load.probe_queries`` samples) that measures the model's throughput."""
        assert self.endpoint is not None
        probe_dir = self.test_dir / "probe-offline"
        n = self.case.load.probe_queries
        self.events.message(
            f"[harness] {self.p.test_id}: no Offline result for {self.case.name} in this session; "
            f"measuring its throughput with a {n}-sample Offline probe ({probe_dir}) ..."
        )
        lg_model = self.case.loadgen_model.get("Offline", self.p.loadgen_model)
        spec = self._spec(user_conf, dataset_path, None).model_copy(
            update={
                "out_dir": str(probe_dir),
                "loadgen_model": lg_model,
                "loadgen_scenario": "Offline",
                "target_qps": None,
                "min_duration_ms": 0,
                "min_query_count": n,
                "single_stream_latency_from_warmup": False,
            }
        )
        child = run_child(spec, self._watched(), env=self.child_env)
        probe = self._measure(spec, child)
        if probe.samples_per_s is None or probe.queries.failed or probe.status not in FINISHED:
            raise _SizingFailed(
                f"cannot size the {self.p.scenario} load of {self.case.name}: the Offline probe ended "
                f"{probe.status} ({probe.reason or probe.queries.first_error or 'no throughput measured'}; "
                f"{probe_dir}); set a target with --harness-target-qps or "
                f"{self.p.loadgen_model}.Server.target_qps in user.conf"
            )
        return float(probe.samples_per_s), "probe-offline"

    def _watched(self) -> Endpoint:
        """What the LoadGen child watches while it runs: the engine, or with several endpoints one that
        is alive while any of them is (one replica's death fails only its own queries)."""
        assert self.endpoint is not None
        if len(self.endpoints) == 1:
            return self.endpoint
        return _AnyAlive(
            self.endpoint.kind,
            self.endpoint.base_url,
            self.endpoint.served_model,
            log_path=self.endpoint.log_path,
            members=list(self.endpoints),
        )

    def _endpoints_problem(self) -> str | None:
        """Why these endpoints cannot be one SUT for one LoadGen child, or None."""
        eps = self.endpoints
        if len(eps) < 2:
            return None
        http = self.suite.http_config()
        # user:password of a URL reaches the child by one environment variable: one for all.
        envs = {tuple(sorted(http.for_child(ep.server_url())[1].items())) for ep in eps}
        if len(envs) > 1:
            return (
                "the server URLs carry different user:password credentials; one run sends one set to "
                "every endpoint: give them the same, or use --harness-api-key-env / --harness-header"
            )
        profiles = {ep.request_profile.name for ep in eps}
        if len(profiles) > 1 or len({ep.served_model for ep in eps}) > 1:
            return (
                f"the endpoints differ in request fields {sorted(profiles)} or served model "
                f"{sorted({ep.served_model for ep in eps})}; one SUT needs the same on every endpoint"
            )
        return None

    def _endpoint_notes(self, stats: list[EndpointStats]) -> list[str]:
        """A line per endpoint that failed queries or died, naming it (reason of result.yaml)."""
        notes = []
        for st, ep in zip(stats, self.endpoints, strict=True):
            died = not ep.alive()
            if not st.failures and not died:
                continue
            what = f"endpoint {st.index} ({st.url})"
            if died:
                what += f" died during the run (exit code {ep.exit_code()}; log: {ep.log_path})"
            notes.append(
                f"{what}: {st.failures} of its {st.queries} queries failed"
                + (f" (first: {st.first_error})" if st.first_error else "")
                + (f"; taken out of dispatch: {st.taken_out}" if st.taken_out else "")
            )
        return notes

    def _spec(self, user_conf: Path, dataset_path: Path, rate: RateChoice | None) -> RunSpec:
        """The one description of this run's LoadGen child (run_spec.json)."""
        from .client.spec import ClientSpec

        assert self.endpoint is not None
        o = self.opts
        server = self.endpoint.server_url()
        # The same headers, proxies and TLS as this process; a URL's user:password goes by environment.
        http_settings, self.child_env = self.suite.http_config().for_child(server)
        target = o.target_qps
        sized = ("measured", "capacity search", "stored capacity")
        if rate is not None and rate.source in sized and rate.setting != "single_stream_expected_latency_ms":
            target = rate.value  # SingleStream's measured latency is set by the runner after its warm-up
        return RunSpec(
            test_id=self.p.test_id,
            out_dir=str(self.test_dir.resolve()),
            user_conf=str(Path(user_conf).resolve()),  # the LoadGen child runs in its own folder
            loadgen_model=self.p.loadgen_model,
            loadgen_scenario=self.p.loadgen_scenario,
            mode=self.p.mode,
            client=ClientSpec(
                # run_spec.json is a file: no credentials in it (they travel by environment)
                base_url=server.display,
                served_model=self.endpoint.served_model,
                generation=self.case.generation,
                dataset=self.case.dataset,
                dataset_path=str(Path(dataset_path).resolve()),
                sample_count=o.sample_count,
                request_timeout_s=o.request_timeout_s,
                idle_timeout_s=o.stream_idle_timeout_s,
                max_connections=o.max_connections,
                http=http_settings,
                request_profile=self.endpoint.request_profile,
                endpoints=[ep.server_url().display for ep in self.endpoints]
                if len(self.endpoints) > 1
                else [],
                dispatch=o.dispatch,
            ),
            performance_sample_count=self.case.dataset.performance_sample_count,
            network_sut=(describe_sut(self.endpoints, o.dispatch) or "").startswith("Network SUT"),
            target_qps=target,
            min_duration_ms=o.min_duration_ms,
            min_query_count=o.min_query_count,
            test_timeout_s=o.test_timeout_s,
            client_workers=o.client_workers,
            single_stream_latency_from_warmup=(
                rate is not None
                and rate.setting == "single_stream_expected_latency_ms"
                and rate.source == "measured"
            ),
            metrics_paths=list(metrics_paths(self.endpoint.kind)),
        )

    def _attempt(
        self, spec: RunSpec, dataset: Dataset, rate: RateChoice | None, entries: list[ConfEntry]
    ) -> BenchmarkResult:
        """One LoadGen run with its telemetry; Ctrl-C still leaves a result on disk (RunInterrupted)."""
        assert self.endpoint is not None
        self.spec = spec = spec.model_copy(update={"t0_monotonic_ns": time.monotonic_ns()})
        assert spec.t0_monotonic_ns is not None
        t0_ns = spec.t0_monotonic_ns
        kind = self.endpoint.kind
        http = self.suite.http_config()
        telemetry = RunTelemetry(
            self.endpoint.base_url,
            http.headers_for(self.endpoint.server_url()),
            metrics_paths=metrics_paths(kind),
            gpu_env=engine_gpu_env(kind, {**self.case.engine.env, **self.endpoint.gpu_env}),
            http=http,
            more_engines=[(ep.base_url, http.headers_for(ep.server_url())) for ep in self.endpoints[1:]],
        )
        n = min(len(dataset), spec.client.sample_count or len(dataset))
        expected = (
            n
            if spec.mode == "accuracy"
            else expected_queries(
                entries,
                spec.loadgen_model,
                spec.loadgen_scenario,
                n,
                spec.target_qps if spec.loadgen_scenario != "SingleStream" else None,
                spec.min_duration_ms,
                spec.min_query_count,
            )
        )
        try:
            with self.events.live(self.p.test_id, self.test_dir / "requests.jsonl", expected) as tick:
                child = run_child(
                    spec,
                    self._watched(),
                    lambda pid: self._started(telemetry, t0_ns, pid),
                    tick,
                    env=self.child_env,
                )
        except KeyboardInterrupt:
            telemetry.stop()
            stopped = ChildOutcome(
                "INTERRUPTED",
                "interrupted (Ctrl-C or SIGTERM); partial results kept",
                None,
                time.time() - self.started,
                all(ep.alive() for ep in self.endpoints),
            )
            result = self._measure(spec, stopped, rate, telemetry)
            raise RunInterrupted(self._finish(result)) from None
        telemetry.stop()
        return self._measure(spec, child, rate, telemetry)

    def _started(self, telemetry: RunTelemetry, t0_ns: int, pid: int) -> None:
        telemetry.start(t0_ns, pid)
        self.events.child_started(pid)

    def _measure(
        self,
        spec: RunSpec,
        child: ChildOutcome,
        rate: RateChoice | None = None,
        telemetry: RunTelemetry | None = None,
    ) -> BenchmarkResult:
        """The result of one LoadGen run from what it left on disk, each file read once."""
        out = Path(spec.out_dir)
        requests = read_requests(out / "requests.jsonl")
        client, client_problem = _read_client_json(out / "client.json")
        failed = [r for r in requests if r.get("status") != "ok"]
        counts = QueryCounts(
            issued=client.get("issued", len(requests)),
            completed=client.get("completed", len(requests) - len(failed)),
            failed=client.get("failed", len(failed)),
            output_tokens=client.get("output_tokens", sum(r.get("n_tokens", 0) for r in requests)),
            first_error=client.get("first_error") or next((r.get("error") for r in failed), None),
        )
        status: Status | None = child.status
        reason = child.reason
        try:
            lg: LoadGenRun | None = LoadGenRun.read(out / "mlperf")
        except MllogError as exc:
            lg = None
            if status is None:
                status, reason = "ERROR", str(exc)
        if lg is not None and status is None and lg.validity is not None:
            status = lg.validity
            reason = "; ".join(lg.invalid_constraints) or None
        if (
            status is None
            and spec.mode == "accuracy"
            and child.returncode == 0
            and (out / "mlperf" / "mlperf_log_accuracy.json").is_file()
        ):
            # AccuracyOnly logs no result_validity (no latency constraints to meet): a run that finished
            # and wrote its accuracy log is complete, and the accuracy gate judges it.
            status = "VALID"
        if status is None:
            status = "ERROR"
            reason = (
                f"LoadGen run ended without a result (runner exit code {child.returncode}); see "
                f"{out / 'harness.log'}"
            )
        if status in FINISHED and client_problem is not None:
            # LoadGen judged the run, but the output checks and client numbers live in client.json:
            # without them the run cannot be gated. Its measured numbers are kept.
            status, reason = "ERROR", f"{client_problem}; LoadGen's verdict was {status}"
        endpoints: list[EndpointStats] = []
        engine_alive = child.engine_alive
        if len(self.endpoints) > 1:
            start, end = client.get("loadgen_start_s"), client.get("loadgen_end_s")
            endpoints = endpoint_stats(
                requests,
                [redaction.scrub_url(ep.base_url) for ep in self.endpoints],
                end - start if isinstance(start, (int, float)) and isinstance(end, (int, float)) else None,
                client.get("endpoints"),
            )
            engine_alive = all(ep.alive() for ep in self.endpoints)
            notes = self._endpoint_notes(endpoints)
            if notes:
                reason = "; ".join([*([reason] if reason else []), *notes])
        window = RunWindow.of(client)
        tel = TelemetryResult()
        if telemetry is not None:
            marks = None
            if lg is not None:
                limits_ms, pct = lg.latency_limits()
                marks = LatencyMarks(limits_ms, pct, lg.ttft_ms, lg.tpot_ms)
            try:
                tel = telemetry.finish(out, requests, counts.output_tokens, marks, window)
            except Exception as exc:
                log.exception("%s: telemetry failed", self.p.test_id)
                tel = TelemetryResult(status=f"failed: {type(exc).__name__}: {exc}")
                if status in FINISHED:
                    why = f"telemetry failed ({type(exc).__name__}: {exc}); see harness.log"
                    status, reason = "ERROR", f"{why}; LoadGen's verdict was {status}"
        tel.timeline = self._rel(tel.timeline) if tel.timeline else None
        tel.plots = [self._rel(p) for p in tel.plots]
        engine = EngineWindow.model_validate(client["engine_window"]) if client.get("engine_window") else None
        if engine is not None and telemetry is not None and window.loadgen is not None:
            engine = gauges_over(engine, telemetry.samples(), *window.loadgen)
        lg_limits = limits_of(lg) if lg is not None else None
        self._checks = constraint_checks(lg, requests, lg_limits) if lg is not None and lg_limits else []
        self._requests = requests
        self._warmup = client.get("warmup") or {}
        paths = {
            "test_dir": self._rel(out),
            "mlperf": self._rel(out / "mlperf"),
            "requests": self._rel(out / "requests.jsonl"),
            "harness_log": self._rel(out / "harness.log"),
        }
        if (out / "user.conf").is_file():
            paths["user_conf"] = self._rel(out / "user.conf")
        if tel.timeline:
            paths["timeline"] = tel.timeline
        if tel.plots:
            paths["plots"] = self._rel(out / "plots")
        limits = _limits(lg)
        return BenchmarkResult(
            test_id=self.p.test_id,
            model=self.case.name,
            scenario=self.p.scenario,
            mode=spec.mode,
            loadgen_model=spec.loadgen_model,
            status=status,
            reason=reason,
            invalid_constraints=lg.invalid_constraints if lg is not None and status == "INVALID" else [],
            loadgen_errors=(lg.errors if lg is not None else [])[:20],
            queries=counts,
            samples_per_s=lg.samples_per_s if lg is not None else None,
            tokens_per_s=lg.tokens_per_s if lg is not None else None,
            ttft_ms=lg.ttft_ms if lg is not None else Percentiles(),
            tpot_ms=lg.tpot_ms if lg is not None else Percentiles(),
            latency_ms=lg.latency_ms if lg is not None else Percentiles(),
            duration_s=round(child.duration_s, 3),
            engine_alive=engine_alive,
            endpoints=endpoints,
            settings=lg.settings if lg is not None else {},
            rate=_rate_record(rate, client),
            latency_limits=limits,
            requests=request_metrics(
                requests,
                limits,
                lg.tokens_per_s if lg is not None else None,
                lg.samples_per_s if lg is not None else None,
            ),
            engine=engine,
            client=client_stats(
                self.p.scenario,
                requests,
                client,
                _number(lg.values.get("effective_target_qps")) if lg is not None else None,
                lg.scheduled_qps if lg is not None else None,
                lg.samples_per_s if lg is not None else None,
            ),
            telemetry=tel,
            consistency=Consistency(**client.get("consistency", {})),
            paths=paths,
        )

    def _keep_attempt(self, name: str) -> None:
        """Move a finished attempt's files (not harness.log, still being written) into a sub-folder."""
        dest = self.test_dir / name
        dest.mkdir()
        for path in list(self.test_dir.iterdir()):
            # harness.log is still being written; user.conf is the copy every attempt reads
            if path.name not in ("harness.log", "user.conf") and not path.name.startswith(
                ("attempt-", "probe-", "confirmation-", "capacity")
            ):
                shutil.move(str(path), dest / path.name)

    def _score(self, dataset: Dataset, status: Status, run_dir: Path) -> AccuracyResult | None:
        """Score the AccuracyOnly run in ``run_dir``; None when it did not finish."""
        if status not in FINISHED:
            return None
        try:
            acc = score_run(self.case, run_dir, dataset)
        except (AccuracyRunError, ValueError, OSError) as exc:
            return AccuracyResult(error=str(exc))
        if acc.accuracy_txt:
            acc.accuracy_txt = self._rel(acc.accuracy_txt)
        return acc

    # -- metadata and gate -------------------------------------------------------------------------
    def _error(self, reason: str, skippable: bool = False, status: Status = "ERROR") -> Outcome:
        """A test that could not run: still a result, like any other failed test."""
        result = BenchmarkResult(
            test_id=self.p.test_id,
            model=self.case.name,
            scenario=self.p.scenario,
            mode=self.p.mode,
            loadgen_model=self.p.loadgen_model,
            status=status,
            reason=reason,
            paths={"test_dir": self._rel(self.test_dir)},
        )
        outcome = self._finish(result)
        outcome.skippable = skippable
        return outcome

    def _finish(self, result: BenchmarkResult) -> Outcome:
        """Metadata and gate, then one redaction of both; a failure in either is an ERROR result that
        keeps every measured number, never a lost one."""
        result = result.model_copy(update={"capacity": self._capacity})
        try:
            metadata = self._metadata(result)
        except Exception as exc:
            log.exception("%s: metadata failed", self.p.test_id)
            result = _errored(result, f"metadata failed: {type(exc).__name__}: {exc}")
            metadata = self._bare_metadata(result)
        try:
            gate, baseline, client_bound = self._gate(result, metadata)
        except Exception as exc:
            log.exception("%s: gating failed", self.p.test_id)
            why = f"gating failed: {type(exc).__name__}: {exc}"
            result = _errored(result, why)
            gate = [Violation.make("gate", "not evaluated", "evaluated", "must_equal", "gate", why)]
            baseline, client_bound = None, []
        client = result.client.model_copy(update={"client_bound": client_bound})
        diagnosis = None
        if self.p.mode == "performance" and (result.status == "INVALID" or client_bound):
            measured = self.suite.offline_measured.get(self.case.name)
            diagnosis = diagnose(
                result.model_copy(update={"client": client}),
                self._checks,
                self._warmup,
                measured[0] if measured else None,
                client_bound,
            )
        final = result.model_copy(
            update={
                "gate": gate,
                "baseline": baseline,
                "client": client,
                "diagnosis": diagnosis,
                "repeat": self.p.repeat,
            }
        )
        return Outcome(
            BenchmarkResult.model_validate(redaction.data(final.model_dump(mode="json"))),
            Metadata.model_validate(redaction.data(metadata.model_dump(mode="json"))),
        )

    def _bare_metadata(self, result: BenchmarkResult) -> Metadata:
        """Enough metadata to write the result files when the full one could not be built."""
        return Metadata(
            test_id=result.test_id,
            nodeid=self.nodeid,
            case={"name": self.case.name},
            scenario=self.p.scenario,
            mode=self.p.mode,
            started_utc=dt.datetime.fromtimestamp(self.started, dt.timezone.utc).isoformat(),
            finished_utc=dt.datetime.now(dt.timezone.utc).isoformat(),
            outputs={
                "test_dir": self._rel(self.test_dir),
                "result": self._rel(self.test_dir / "result.yaml"),
                "metadata": self._rel(self.test_dir / "metadata.yaml"),
            },
        )

    def _metadata(self, result: BenchmarkResult) -> Metadata:
        secrets = self.suite.secrets()
        ep = self.endpoint
        engine = None
        if ep is not None:
            engine = EngineInfo(
                kind=ep.kind,
                base_url=redaction.scrub_url(ep.base_url),
                served_model=ep.served_model,
                version=ep.version,
                # The session folder's own path is machine-specific: <session> stands for it.
                argv=[
                    a.replace(str(self.session_dir), "<session>") for a in redaction.argv(ep.argv, secrets)
                ],
                log=self._rel(ep.log_path) if ep.log_path else None,
                pid=ep.pid,
                start_s=ep.info.get("start_s"),
                start_number=ep.info.get("start_number"),
                gpus=ep.gpus or None,
                cuda_visible_devices=ep.gpu_env.get("CUDA_VISIBLE_DEVICES"),
            )
        o = self.opts
        run_spec: dict[str, Any] = json.loads(self.spec.model_dump_json()) if self.spec is not None else {}
        for key in ("out_dir", "user_conf"):
            if key in run_spec:
                run_spec[key] = self._rel(run_spec[key])
        data: dict[str, Any] = Metadata(
            test_id=result.test_id,
            session=self.session_dir.name,
            nodeid=self.nodeid,
            case=_redacted_case(self.case),
            scenario=self.p.scenario,
            mode=self.p.mode,
            engine=engine,
            endpoints=[redaction.scrub_url(e.base_url) for e in self.endpoints]
            if len(self.endpoints) > 1
            else None,
            sut=describe_sut(self.endpoints, o.dispatch),
            run_spec=run_spec,
            command_line=redaction.argv(self.suite.command_line, secrets),
            cwd=str(self.suite.cwd),
            started_utc=dt.datetime.fromtimestamp(self.started, dt.timezone.utc).isoformat(),
            finished_utc=dt.datetime.now(dt.timezone.utc).isoformat(),
            environment=capture_environment(self.suite.root),
            outputs={
                "test_dir": self._rel(self.test_dir),
                "result": self._rel(self.test_dir / "result.yaml"),
                "metadata": self._rel(self.test_dir / "metadata.yaml"),
                **result.paths,
            },
            mlflow=(
                {"tracking_uri": redaction.scrub_url(o.mlflow_uri), "experiment_name": o.mlflow_experiment}
                if o.mlflow_uri
                else None
            ),
        ).model_dump(mode="json")
        self.events.update_metadata(self.case, data)
        return Metadata.model_validate(data)

    def _gate(
        self, result: BenchmarkResult, metadata: Metadata
    ) -> tuple[list[Violation], BaselineComparison | None, list[str]]:
        """Every check of this test → (violations, the baseline comparison, client-bound reasons)."""
        t = apply_overrides(
            self.case.thresholds, self.suite.threshold_overrides, self.case.name, self.p.test_id
        )
        data = result.model_dump(mode="json")
        md = metadata.model_dump(mode="json")
        violations = check_thresholds(data, t)
        if self.p.mode == "performance" and result.status == "INVALID" and not t.require_valid:
            violations = [v for v in violations if v.source != "validity"]
        violations += check_consistency(data["consistency"])
        violations += check_compliance(data.get("compliance"))
        client_bound: list[str] = []
        if self.p.mode == "performance":
            bound = check_client_bound(data)
            client_bound = [v.message for v in bound]
            if not self.opts.allow_client_bound:
                violations += bound
        acc = result.accuracy
        # the scenario's accuracy run of a submission (--harness-submission-dir)
        if (
            self.p.mode == "performance"
            and self.case.accuracy is not None
            and acc is not None
            and acc.error is None
            and acc.target
            and acc.scores
        ):
            violations += check_accuracy(
                acc.scores, acc.target, self.case.accuracy.min_ratio, self.case.accuracy.gen_len_band
            )
        if self.p.mode == "accuracy":
            if acc is not None and acc.error is not None:
                violations.append(
                    Violation.make("accuracy", "not scored", "scored", "must_equal", "accuracy", acc.error)
                )
            elif self.case.accuracy is not None and acc is not None and acc.target and acc.scores:
                violations += check_accuracy(
                    acc.scores, acc.target, self.case.accuracy.min_ratio, self.case.accuracy.gen_len_band
                )
            # accuracy runs have no latency constraints to be VALID against
            violations = [v for v in violations if v.metric != "validity"]
        comparison = None
        baseline = self.suite.baseline
        if baseline is not None and self.opts.baseline is not None:
            pct = (
                self.opts.max_regression_pct
                if self.opts.max_regression_pct is not None
                else t.max_regression_pct
            )
            bv, warnings, rows = compare_baseline(
                self.p.test_id, data, md, baseline, pct, t.max_regression_pct_per_metric
            )
            violations += bv
            comparison = BaselineComparison(path=str(self.opts.baseline), warnings=warnings, rows=rows)
        return violations, comparison, client_bound

    def _rel(self, path: Path | str) -> str:
        """``path`` relative to the session folder when it is inside it, else as it is."""
        p = Path(path).resolve()
        return os.path.relpath(p, self.session_dir) if p.is_relative_to(self.session_dir) else str(path)


class _SizingFailed(Exception):
    pass


@dataclass
class _AnyAlive(Endpoint):
    """Several endpoints as the LoadGen child watches them: alive while any is."""

    members: list[Endpoint] = field(default_factory=list)

    def _first_dead(self) -> Endpoint | None:
        return next((m for m in self.members if not m.alive()), None)

    def alive(self) -> bool:
        return any(m.alive() for m in self.members)

    def exit_code(self) -> int | None:
        dead = self._first_dead()
        return dead.exit_code() if dead is not None else None

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        dead = self._first_dead()
        return dead.log_tail(n) if dead is not None else ""


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def describe_sut(endpoints: list[Endpoint], dispatch: str) -> str | None:
    """What the system under test is, for metadata.yaml: several endpoints, or servers elsewhere
    (MLPerf's Network division names such a system a Network SUT)."""
    if not endpoints:
        return None
    hosts = sorted({f"{u.host}:{u.port}" for u in (ep.server_url() for ep in endpoints)})
    remote = [h for h in hosts if h.rsplit(":", 1)[0] not in _LOOPBACK]
    ours = all(ep.kind != "external" for ep in endpoints)
    n = len(endpoints)
    if remote and not ours:
        return f"Network SUT: {n} endpoint(s) on {', '.join(hosts)}" + (
            f" (one LoadGen, dispatch {dispatch})" if n > 1 else ""
        )
    if n == 1:
        return None
    started = f"{n} {endpoints[0].kind} replicas started by the suite" if ours else f"{n} endpoints"
    return f"{started} on this host ({', '.join(hosts)}), one SUT (one LoadGen, dispatch {dispatch})"


def _limits(lg: LoadGenRun | None) -> LatencyLimits | None:
    """The TTFT/TPOT limits LoadGen checked the run against, as requested; None without any."""
    if lg is None:
        return None
    limits, pct = lg.latency_limits()
    if not limits:
        return None
    return LatencyLimits(ttft_ms=limits.get("ttft"), tpot_ms=limits.get("tpot"), percentile=pct)


def _errored(result: BenchmarkResult, why: str) -> BenchmarkResult:
    """The same measurements, with status ERROR and why (appended to any earlier reason)."""
    reason = f"{why}; earlier: {result.status}" + (f" ({result.reason})" if result.reason else "")
    return result.model_copy(update={"status": "ERROR", "reason": reason})


def _redacted_case(case: BenchmarkCase) -> dict[str, Any]:
    """The case for metadata.yaml: the engine's secret-looking env values and args hidden."""
    data = case.model_dump(mode="json")
    engine = data["engine"]
    engine["env"] = redaction.env(engine.get("env") or {})
    engine["args"] = redaction.engine_args(engine.get("args") or {})
    return data


def _read_client_json(path: Path) -> tuple[dict[str, Any], str | None]:
    """client.json's summary, or ({}, why not). Written atomically by the runner, so a torn file
    means something else wrote it; either way the counts then come from requests.jsonl."""
    if not path.is_file():
        return {}, f"the LoadGen runner left no {path.name} (output checks and client numbers)"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {}, f"{path} is unreadable ({exc})"
    if not isinstance(data, dict):
        return {}, f"{path} holds {type(data).__name__}, not the runner's summary"
    return data, None


def _vocab(case: BenchmarkCase) -> tuple[int, str] | None:
    """(vocabulary size, where it was read) of the case's model when its files are here."""
    from .accuracy.run import AccuracyRunError, tokenizer_dir

    try:
        return vocab_size(tokenizer_dir(case))
    except (AccuracyRunError, OSError):
        return None


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _rate_record(rate: RateChoice | None, client: dict[str, Any]) -> RateChoice | None:
    """The rate as it was used; a SingleStream latency measured by the runner is read back here."""
    if rate is None or rate.setting != "single_stream_expected_latency_ms" or rate.source != "measured":
        return rate
    measured = (client.get("warmup") or {}).get("single_stream_expected_latency_ms")
    if measured is None:
        return rate.model_copy(
            update={"reason": "the warm-up request failed, so LoadGen's configured value was used"}
        )
    return rate.model_copy(update={"value": measured})


def _x(margin: float | None) -> str:
    return "-" if margin is None else f"{margin:.2f}×"
