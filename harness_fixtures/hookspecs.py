"""Hooks of the harness plugin (added in ``pytest_addhooks``); implement them in a conftest.py."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.hookspec
def pytest_harness_result(
    config: pytest.Config, item_id: str, result: dict[str, Any], metadata: dict[str, Any]
) -> None:
    """A benchmark test's result is final (called once per test, on the controller only).

    The plugin's own implementation writes ``result.yaml`` and ``metadata.yaml``; MLflow logging,
    dashboards or chat notifications are further implementations. Example conftest.py::

        def pytest_harness_result(config, item_id, result, metadata):
            if result["status"] != "VALID":
                print(f"{item_id}: {result['status']} ({result['reason']})")
    """


@pytest.hookspec
def pytest_harness_update_metadata(config: pytest.Config, case: Any, metadata: dict[str, Any]) -> None:
    """Add fields to a test's metadata in place before it is emitted. Example conftest.py::

    import os

    def pytest_harness_update_metadata(config, case, metadata):
        metadata["ci_job"] = os.environ.get("CI_JOB_ID")
    """


@pytest.hookspec(firstresult=True)
def pytest_harness_make_launcher(config: pytest.Config, kind: str) -> Any:
    """Supply a launcher object for an engine kind the suite does not know (first non-None wins).

    The object needs ``start(ctx) -> Endpoint`` and ``stop(endpoint)``; see
    ``harness_fixtures.servers.base.Launcher``. Example conftest.py::

        from harness_fixtures.servers.launchers import ProcessLauncher

        class MyEngine(ProcessLauncher):
            kind = "myengine"
            def build_argv(self, ctx, host, port):
                return ["my-engine", "--port", str(port), ctx.case.engine.model]

        def pytest_harness_make_launcher(config, kind):
            return MyEngine() if kind == "myengine" else None
    """
