"""The parent side of one LoadGen run: start the runner child, watch its deadline and the engine, stop it.

The child (``python -m harness_fixtures.loadgen.runner RUN_SPEC.json``) is its own process group, so
Ctrl-C reaches pytest only and the parent stops the child's whole group itself.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..client.httpconfig import HttpSettings
from ..results import Status, write_text_atomic
from ..servers.base import Endpoint
from ..servers.process import start_process, stop_process_group
from .spec import RunSpec

log = logging.getLogger("harness_fixtures.loadgen")
ENGINE_DEATH_GRACE_S = 10.0  # after the engine dies, let LoadGen drain failed queries this long
CHILD_STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class ChildOutcome:
    """How the child ended; None status = it ran to the end (LoadGen's log has the verdict)."""

    status: Status | None
    reason: str | None
    returncode: int | None
    duration_s: float
    engine_alive: bool


def run_child(
    spec: RunSpec,
    endpoint: Endpoint,
    on_start: Callable[[int], None] | None = None,
    on_tick: Callable[[float], None] | None = None,
    env: dict[str, str] | None = None,
) -> ChildOutcome:
    """Run LoadGen for ``spec`` in a child process and wait for it.

    ``on_start(pid)`` is called once the child (the client) runs; ``on_tick(elapsed_s)`` about once a
    second (progress display). Ctrl-C / SIGTERM stop the child's group and propagate.

    :param env: variables added to the child's environment (credentials the spec file must not hold).
    """
    out = Path(spec.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    spec = absolute_paths(spec)  # the child runs in the test's folder (see below)
    spec_path = out / "run_spec.json"
    # The child's input: written as is (no secrets by construction: the API key travels by the
    # NAME of its variable, the URL without userinfo), so no redaction can change a path in it.
    write_text_atomic(spec_path, spec.model_dump_json(indent=1))
    status: Status | None = None
    reason: str | None = None
    t0 = time.monotonic()
    # Its own process group (Ctrl-C reaches pytest only; we stop the child ourselves), dying with us.
    proc = start_process(
        [sys.executable, "-m", "harness_fixtures.loadgen.runner", str(spec_path)],
        {**os.environ, **env} if env else None,
        out / "harness.log",
        role="loadgen runner",
        # LoadGen applies an audit.config from its working directory (MLPerf compliance runs):
        # the test's own folder, so one left in the invocation folder cannot change a run.
        cwd=out,
    )
    engine_dead_since: float | None = None
    next_tick = t0
    try:
        if on_start is not None:
            on_start(proc.pid)
        while proc.poll() is None:
            now = time.monotonic()
            if on_tick is not None and now >= next_tick:
                on_tick(now - t0)
                next_tick = now + 1.0
            if not endpoint.alive():
                engine_dead_since = engine_dead_since or now
                if now - engine_dead_since > ENGINE_DEATH_GRACE_S:
                    stop_process_group(proc, CHILD_STOP_GRACE_S)
                    break
            if now - t0 > spec.test_timeout_s:
                status, reason = (
                    "TIMEOUT",
                    f"test deadline of {spec.test_timeout_s:g} s passed; LoadGen stopped",
                )
                stop_process_group(proc, CHILD_STOP_GRACE_S)
                break
            time.sleep(0.1)
    except BaseException:
        # Ctrl-C / SIGTERM: stop LoadGen, keep what it measured, and let the caller report it.
        stop_process_group(proc, CHILD_STOP_GRACE_S)
        raise
    # It ended by itself (or was stopped above): sweep what is left of its group (client workers)
    # and take it off the session's pidfile.
    stop_process_group(proc, CHILD_STOP_GRACE_S)
    alive = endpoint.alive()
    if not alive:
        status = "ERROR"
        reason = (
            f"engine died during the test (exit code {endpoint.exit_code()}); last log lines "
            f"({endpoint.log_path}):\n{endpoint.log_tail()}"
        )
    return ChildOutcome(status, reason, proc.returncode, time.monotonic() - t0, alive)


def _absolute_files(http: HttpSettings | None) -> HttpSettings | None:
    """The HTTP settings with their PEM files as absolute paths (the child runs elsewhere)."""
    if http is None:
        return None
    files = {k: getattr(http, k) for k in ("ca_bundle", "client_cert", "client_key")}
    return http.model_copy(update={k: str(Path(v).resolve()) for k, v in files.items() if v})


def absolute_paths(spec: RunSpec) -> RunSpec:
    """The spec with every file it names as an absolute path: the child's working directory is its
    test folder, so a path relative to the invocation folder would name another file there."""
    return spec.model_copy(
        update={
            "out_dir": str(Path(spec.out_dir).resolve()),
            "user_conf": str(Path(spec.user_conf).resolve()),
            "client": spec.client.model_copy(
                update={
                    "dataset_path": str(Path(spec.client.dataset_path).resolve()),
                    "http": _absolute_files(spec.client.http),
                }
            ),
        }
    )
