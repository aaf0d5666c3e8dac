"""Live MLflow logging while the benchmarks run: a pytest plugin registered on the controller by
harness_fixtures.reporting. It never fails or slows a benchmark for long."""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .records import (
    COMPLETE_TAG,
    LIVE_HTTP,
    RunRecord,
    UploadError,
    build_record,
    build_session_record,
    public_uri,
)
from .upload import MlflowTarget, describe, http_limits

log = logging.getLogger("harness_fixtures.mlflow")
hookimpl = pytest.hookimpl


class MlflowLivePlugin:
    """Logs each benchmark result as it is final; registered on the controller by plugin.py.

    Never fails or slows a benchmark for long: every MLflow call runs under short HTTP limits, the
    first failure stops logging for the rest of the session, and the terminal summary then says,
    once, how to upload the results on disk later.
    """

    def __init__(
        self,
        config: pytest.Config,
        tracking_uri: str,
        experiment: str,
        session_dir: Callable[[], Path | None],
    ) -> None:
        self.config = config
        self._session_dir = session_dir  # the session folder, once claimed (result paths are relative)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.target = MlflowTarget(tracking_uri, experiment)
        self.parent_run_id: str | None = None
        self.session_dir: Path | None = None
        self.logged: list[str] = []
        self.failure: str | None = None

    def _fail(self, what: str, exc: BaseException) -> None:
        self.failure = f"{what}: {describe(exc) if not isinstance(exc, UploadError) else exc}"
        log.warning("MLflow live logging stopped: %s", self.failure)

    @hookimpl(trylast=True)
    def pytest_harness_result(
        self, config: pytest.Config, item_id: str, result: dict[str, Any], metadata: dict[str, Any]
    ) -> None:
        # trylast and registered after the reporter: result.yaml / metadata.yaml are written by now.
        self.session_dir = self._session_dir()
        test_dir = Path(str((metadata.get("outputs") or {}).get("test_dir", ".")))
        if self.session_dir is not None:
            test_dir = self.session_dir / test_dir  # an absolute test_dir (older files) stays as it is
        else:
            self.session_dir = test_dir.parent
        if self.failure is not None:
            return
        try:
            with http_limits(*LIVE_HTTP, override=True):
                if self.parent_run_id is None:
                    parent = build_session_record(metadata, None, source="live")
                    self.parent_run_id, _ = self.target.start(parent, None)
                    self._log_parent_fields(parent)
                rec = build_record(result, metadata, test_dir, source="live")
                run_id, _ = self.target.log(rec, self.parent_run_id)
            self.logged.append(run_id)
        except Exception as exc:
            self._fail(str(result.get("test_id")), exc)

    def _log_parent_fields(self, parent: RunRecord) -> None:
        from mlflow.entities import Param, RunTag

        assert self.parent_run_id is not None
        self.target.client.log_batch(
            self.parent_run_id,
            params=[Param(k, v) for k, v in parent.params.items()],
            tags=[RunTag(k, v) for k, v in parent.tags.items()],
        )

    @hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        # trylast: the reporter's session.yaml is written by now.
        if self.parent_run_id is None or self.failure is not None:
            return
        status = "FINISHED" if int(exitstatus) in (0, 1) else "KILLED" if int(exitstatus) == 2 else "FAILED"
        try:
            with http_limits(*LIVE_HTTP, override=True):
                c = self.target.client
                if self.session_dir is not None and (self.session_dir / "session.yaml").is_file():
                    c.log_artifact(self.parent_run_id, str(self.session_dir / "session.yaml"))
                c.set_tag(self.parent_run_id, COMPLETE_TAG, "true")
                c.set_terminated(self.parent_run_id, status)
        except Exception as exc:
            self._fail("session run", exc)

    def upload_command(self) -> str:
        """The command that uploads this session later (the tool of this source tree)."""
        tool = Path(__file__).resolve().parents[3] / "tools" / "upload_to_mlflow.py"
        tool_arg = str(tool) if tool.is_file() else "tools/upload_to_mlflow.py"
        here = self.config.invocation_params.dir
        if tool.is_file() and tool.is_relative_to(here):
            tool_arg = str(tool.relative_to(here))
        argv = [
            sys.executable,
            tool_arg,
            "--results-dir",
            str(self.session_dir),
            "--mlflow-tracking-uri",
            public_uri(self.tracking_uri),
            "--mlflow-experiment-name",
            self.experiment,
        ]
        return shlex.join(argv)

    @hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        tr = terminalreporter
        if self.failure is not None and self.session_dir is not None:
            tr.write_line(
                f"WARNING: MLflow live logging to {public_uri(self.tracking_uri)} failed ({self.failure}); "
                f"{len(self.logged)} run(s) logged, all results are on disk. Upload them later with: "
                f"{self.upload_command()}",
                yellow=True,
            )
        elif self.logged:
            url = self.target.run_url(self.parent_run_id or "")
            tr.write_line(
                f"MLflow: {len(self.logged)} run(s) in experiment {self.experiment!r} "
                f"at {public_uri(self.tracking_uri)}" + (f": {url}" if url else "")
            )
