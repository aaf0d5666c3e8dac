"""Controller-side reporting: test reports → ``pytest_harness_result`` → result files, session.yaml,
the session figure, a saved baseline, and the terminal table.

Registered on the controller only (xdist workers send their results in reports), so every file is
written once, by one process.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from . import redaction
from .config import BenchmarkCase, PlannedRun, shard_of
from .gating import baseline_entry, hardware_of, merge_repeats, save_baseline
from .options import OptionError, check_output_root
from .pipeline import Events, ProgressTick, Suite
from .progress import RunProgress
from .results import SCHEMA_VERSION, SessionFile, write_text, write_yaml
from .servers.gpus import GpuAllocator
from .servers.process import OWNED, stop_leftovers
from .table import BY_NAME, flat_row, repeat_summary, to_csv

log = logging.getLogger("harness_fixtures")
RESULT_PROP = "harness_result_json"  # the plugin's user property carrying a test's result


@dataclass
class HarnessState:
    """Session-wide state in ``config.stash``: the suite, its cases, the session folder."""

    suite: Suite
    cases: list[BenchmarkCase] | None = None
    session_dir: Path | None = None
    leftovers: list[str] = field(default_factory=list)  # processes of killed sessions, stopped
    # --harness-shard: index and count, and once collected here: tests kept, of how many, models
    shard: dict[str, Any] | None = None
    gpus: GpuAllocator | None = None  # --harness-gpus: the pool every engine of this process draws from


STATE = pytest.StashKey[HarnessState]()
# The terminal table: (header, result key path, format). The same values result.yaml holds.
TABLE: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("tok/s", ("tokens_per_s",), ".1f"),
    ("samples/s", ("samples_per_s",), ".2f"),
    ("TTFT p99 ms", ("ttft_ms", "p99"), ".1f"),
    ("TPOT p99 ms", ("tpot_ms", "p99"), ".2f"),
)


def register_reporters(config: pytest.Config, state: HarnessState) -> None:
    config.pluginmanager.register(HarnessReporter(config, state), "harness-reporter")
    options = state.suite.options
    if options.mlflow_uri:
        from .exporters.mlflow.live import MlflowLivePlugin

        plugin = MlflowLivePlugin(
            config, options.mlflow_uri, options.mlflow_experiment, lambda: state.session_dir
        )
        config.pluginmanager.register(plugin, "harness-mlflow")


def session_dir(state: HarnessState) -> Path:
    """A new folder per session, never an earlier one's (so nothing is overwritten).

    Claimed once on the controller with an atomic mkdir, so two sessions started in the same second
    get different folders; xdist workers receive its path.
    """
    if state.session_dir is not None:
        return state.session_dir
    root = state.suite.options.output_dir
    try:
        check_output_root(root)
    except OptionError as exc:
        raise pytest.UsageError(str(exc)) from None
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    # Before any engine of this session starts: what a killed earlier session left running.
    state.leftovers = stop_leftovers(root) if root.is_dir() else []
    for message in state.leftovers:
        log.warning("%s", message)
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
    OWNED.track_in(candidate)
    return candidate


def write_test_files(result: dict[str, Any], metadata: dict[str, Any], session: Path) -> list[str]:
    """result.yaml and metadata.yaml where the metadata says (relative to ``session``, the session
    folder); returns the write errors (none: [])."""
    from .exporters.vllm_json import vllm_result

    errors = []
    out = metadata["outputs"]
    for key, data in (("result", result), ("metadata", metadata), ("result.json", None)):
        path = session / (out[key] if data is not None else Path(out["test_dir"]) / key)
        try:
            if data is None:  # the same result in `vllm bench serve`'s field names
                write_text(path, json.dumps(vllm_result(result, metadata), indent=1) + "\n")
            else:
                write_yaml(path, data)
        except OSError as exc:
            # A full or failing disk must not end the session in an INTERNALERROR traceback.
            message = (
                f"cannot write {path}: {exc.strerror or exc}; free space on that disk or pass "
                "--harness-output-dir DIR"
            )
            log.error("%s", message)
            errors.append(message)
    return errors


def table_rows(results: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """The terminal summary table, header first: each number is the result.yaml value."""
    rows = [("test", "status", *(h for h, _, _ in TABLE), "failed")]
    for r in results:
        cells = []
        for _, keys, spec in TABLE:
            v: Any = r
            for k in keys:
                v = (v or {}).get(k)
            cells.append("-" if v is None else format(v, spec))
        run = r["test_id"] + (f"-r{r['repeat']}" if r.get("repeat") else "")  # --harness-repeat
        rows.append((run, r["status"], *cells, str(r["queries"]["failed"])))
    return rows


def export_session(session: Path, options: Any) -> list[str]:
    """--harness-submission-dir: the session as an MLPerf submission tree, then its structural check;
    returns the lines for the terminal. Never raises: the benchmarks' results are already on disk."""
    from .exporters.submission import SubmissionError, export_submission
    from .exporters.submission_check import check_submission

    out = options.submission_dir
    try:
        folder = export_submission(
            session, out, options.submitter, options.submission_division, options.system_name
        )
    except (SubmissionError, OSError, ValueError) as exc:
        return [f"MLPerf submission tree not written: {exc}"]
    report = check_submission(out)
    return [f"MLPerf submission tree: {folder}", *report.text().splitlines()]


class HarnessReporter:
    """Turns test reports into hook calls, files and a summary (controller only)."""

    def __init__(self, config: pytest.Config, state: HarnessState) -> None:
        self.config = config
        self.state = state
        self.results: list[dict[str, Any]] = []
        self.metadata: list[dict[str, Any]] = []
        self.baseline_entries: dict[str, list[dict[str, Any]]] = {}
        self.hardware: dict[str, Any] = {}
        self.write_errors: list[str] = []
        self.started = time.time()
        self.submission: list[str] = []  # lines for the terminal: where the tree is, what the check said
        self.leftovers_shown = False

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Claim the session folder once harness tests are selected (after -k/-m deselection and
        --harness-shard): an unusable output dir is then a usage error before any engine starts, not
        an error in every test."""
        config, items = session.config, session.items
        if not config.option.collectonly and any(i.get_closest_marker("harness_benchmark") for i in items):
            session_dir(self.state)
            tr = config.pluginmanager.get_plugin("terminalreporter")
            if tr is not None:
                for message in self.state.leftovers:
                    tr.write_line(f"harness: {message}", yellow=True)
                self.leftovers_shown = True

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
        where = self.state.session_dir or Path()
        props.append(("harness_result_path", str(where / data["metadata"]["outputs"]["result"])))
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
        self.write_errors += write_test_files(result, metadata, session_dir(self.state))
        self.results.append({"nodeid": item_id, **result})
        self.metadata.append(metadata)
        self.baseline_entries.setdefault(result["test_id"], []).append(baseline_entry(result, metadata))
        self.hardware = hardware_of(metadata)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        state = self.state
        save = state.suite.options.save_baseline
        if save is not None and self.baseline_entries:
            try:
                entries = {t: merge_repeats(e) for t, e in self.baseline_entries.items()}
                save_baseline(save, entries, self.hardware)
            except Exception as exc:  # never the end of the session: session.yaml and the table follow
                why = (
                    exc.strerror
                    if isinstance(exc, OSError) and exc.strerror
                    else f"{type(exc).__name__}: {exc}"
                )
                self.write_errors.append(
                    f"cannot write the baseline {save}: {why}; the results are in the session folder"
                )
        if state.session_dir is not None and not self.results:
            with contextlib.suppress(OSError):
                state.session_dir.rmdir()  # claimed but unused (e.g. all tests skipped); only if empty
        if self.results and state.session_dir is not None:
            path = state.session_dir / "session.yaml"
            secrets = state.suite.secrets()
            doc = SessionFile(
                schema_version=SCHEMA_VERSION,
                started_utc=dt.datetime.fromtimestamp(self.started, dt.timezone.utc).isoformat(),
                finished_utc=dt.datetime.now(dt.timezone.utc).isoformat(),
                # as in metadata.yaml: no API key value, no credentials in URLs
                command_line=redaction.argv(list(self.config.invocation_params.args), secrets),
                results=self.results,
                repeats=repeat_summary(self.results),
                shard=state.shard,
            )
            try:
                write_yaml(path, doc.model_dump(mode="json"))
            except OSError as exc:
                self.write_errors.append(f"cannot write {path}: {exc.strerror or exc}")
            rows = [
                flat_row(r, state.session_dir.name, m)
                for r, m in zip(self.results, self.metadata, strict=True)
            ]
            try:  # every result as one flat table: spreadsheets and pandas read it as it is
                write_text(state.session_dir / "session.csv", to_csv(rows))
            except OSError as exc:
                self.write_errors.append(
                    f"cannot write {state.session_dir / 'session.csv'}: {exc.strerror or exc}"
                )
            from .metrics.plots import write_session_summary  # lazily: the plugin loads in every run

            write_session_summary(state.session_dir / "summary.png", self.results)
            if state.suite.options.submission_dir is not None:
                self.submission = export_session(state.session_dir, state.suite.options)
        if self.write_errors and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED  # results were lost: not a green run

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        tr = terminalreporter
        if not self.leftovers_shown:  # xdist: the controller claims the folder before collection
            for message in self.state.leftovers:
                tr.write_line(f"harness: {message}", yellow=True)
        for message in self.write_errors:
            tr.write_line(f"harness: {message}", red=True)
        if not self.results:
            return
        tr.section("harness benchmark results")
        rows = table_rows(self.results)
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for n, row in enumerate(rows):
            line = "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            tr.write_line(line, bold=n == 0)
        for r in self.results:
            if r.get("gate"):
                tr.write_line(f"{r['test_id']} FAILED:", red=True)
                for v in r["gate"]:
                    tr.write_line(f"  - {v['message']}", red=True)
                if r.get("diagnosis"):
                    tr.write_line(f"  why: {r['diagnosis']['verdict']}", red=True)
                    tr.write_line(f"  next: {r['diagnosis']['next_step']}", red=True)
        repeats = repeat_summary(self.results)
        if repeats:
            tr.write_line("")
            tr.write_line("repeated runs: median [min - max] (spread = (max - min) / median)", bold=True)
            for test, metrics in repeats.items():
                for name in ("tokens_per_s", "samples_per_s", "ttft_p99_ms", "tpot_p99_ms"):
                    if name in metrics:
                        m = metrics[name]
                        spread = f"{m['spread_pct']:.1f}%" if "spread_pct" in m else "-"
                        tr.write_line(
                            f"  {test:<28} {BY_NAME[name].label:<14} {m['median']:>10.4g} "
                            f"[{m['min']:.4g} - {m['max']:.4g}]  spread {spread}  (n={m['n']:.0f})"
                        )
        rows_b = [row for r in self.results for row in (r.get("baseline") or {}).get("rows", [])]
        if rows_b:
            tr.write_line("")
            tr.write_line(f"baseline comparison ({self.state.suite.options.baseline}):", bold=True)
            for row in rows_b:
                flag = "REGRESSED" if row["regressed"] else "ok"
                tr.write_line(
                    f"  {row['test_id']:<28} {row['metric']:<16} {row['baseline']:>12.4g} -> "
                    f"{row['current']:<12.4g} {row['change_pct']:+7.2f}%  "
                    f"(allowed {row['allowed_regression_pct']}%)  {flag}",
                    red=row["regressed"],
                )
            for r in self.results:
                for w in (r.get("baseline") or {}).get("warnings", []):
                    tr.write_line(f"  warning: {w}", yellow=True)
        for n, line in enumerate(self.submission):
            tr.write_line(line, bold=n == 0)
        session = self.state.session_dir
        if session is not None:
            tr.write_line(f"session results: {session / 'session.yaml'}")
            if (session / "summary.png").is_file():
                tr.write_line(f"session summary figure: {session / 'summary.png'}")


# -- selection: --harness-shard -----------------------------------------------------------------
def shard_group(item: pytest.Item) -> str:
    """What stays together in one shard: a benchmark's model (one engine start), else its file."""
    run = planned_run(item)
    return run.case.name if run is not None else item.nodeid.split("::")[0]


def planned_run(item: pytest.Item) -> PlannedRun | None:
    """The benchmark run a collected item is, or None for any other test."""
    callspec = getattr(item, "callspec", None)
    run = callspec.params.get("harness_run") if callspec is not None else None
    return run if isinstance(run, PlannedRun) else None


def keep_shard(config: pytest.Config, state: HarnessState, items: list[pytest.Item]) -> None:
    """--harness-shard I/N: keep shard I's share of the selected items (whole models), say so."""
    assert state.suite.options.shard is not None
    index, count = state.suite.options.shard
    groups: dict[str, int] = {}
    for item in items:
        key = shard_group(item)
        groups[key] = groups.get(key, 0) + 1
    shard = shard_of(groups, count)
    keep = [i for i in items if shard[shard_group(i)] == index]
    drop = [i for i in items if shard[shard_group(i)] != index]
    names = {c.name for c in state.cases or []}
    models = sorted(g for g in groups if shard[g] == index and g in names)
    selected = len(items)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
    state.shard = {"index": index, "count": count, "tests": len(keep), "of": selected, "models": models}
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None and not hasattr(config, "workerinput"):
        tr.write_line(
            f"shard {index}/{count}: {len(keep)} of {selected} tests (models {', '.join(models) or 'none'})"
        )


# -- the pipeline's events on the terminal -------------------------------------------------------
class TerminalEvents(Events):
    """Progress on the terminal while pytest captures output; the metadata hook."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def _suspended(self) -> contextlib.AbstractContextManager[Any]:
        capman = self.config.pluginmanager.get_plugin("capturemanager")
        return capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()

    def message(self, text: str) -> None:
        text = redaction.text(text)
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is None or hasattr(self.config, "workerinput"):
            super().message(text)
            return
        with self._suspended():
            tr.write_line(text)

    @contextlib.contextmanager
    def live(self, test_id: str, requests_path: Path, expected: int | None) -> Iterator[ProgressTick | None]:
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        # Only on a terminal: never in CI logs, never from xdist workers.
        if tr is None or not getattr(tr, "isatty", False) or hasattr(self.config, "workerinput"):
            yield None
            return
        import os

        if os.environ.get("CI"):
            yield None
            return
        progress = RunProgress(test_id, requests_path, expected, sys.stdout)

        def tick(elapsed_s: float) -> None:
            progress.stream = sys.stdout  # capture swaps sys.stdout; write to whatever is live now
            progress.tick(elapsed_s)

        with self._suspended():
            tr.write_line("")
            try:
                yield tick
            finally:
                progress.stream = sys.stdout
                progress.close()

    def update_metadata(self, case: BenchmarkCase, metadata: dict[str, Any]) -> None:
        self.config.hook.pytest_harness_update_metadata(config=self.config, case=case, metadata=metadata)
