"""One engine at a time for a session: started on a model's first test, reused by all of its tests,
stopped before the next model's engine starts and at the end (also on Ctrl-C and SIGTERM)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import redaction
from .base import Endpoint, EngineError, LaunchContext, Launcher
from .gpus import GpuAllocator, GpuError, GpuLease
from .launchers import LAUNCHERS

log = logging.getLogger("harness_fixtures.servers")
MAX_ENGINE_STARTS = 2  # per model and session: one restart after a death, then give up

LauncherFactory = Callable[[str], Launcher | None]


@dataclass
class EngineManager:
    """Engines by model.

    :param make_launcher: a plugin's launcher for a kind (``pytest_harness_make_launcher``), or None
        for the built-in registry.
    :param on_message: progress lines for the terminal (engine starts take minutes).
    :param gpus: --harness-gpus: each engine started gets ``engine.gpus`` of its GPUs, locked for the
        engine's life; None: engines see the GPUs they see without the suite.
    """

    server_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    http: Any = field(default=None, repr=False)  # HttpConfig: headers, proxies, TLS of every request
    make_launcher: LauncherFactory = lambda kind: None
    on_message: Callable[[str], None] = log.info
    gpus: GpuAllocator | None = None
    current: tuple[str, Endpoint, Any] | None = None
    lease: GpuLease | None = None  # the current engine's GPUs
    failed: dict[str, str] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)

    def get(self, case: Any, run_dir: Path) -> Endpoint:
        """The model's running engine, started (or restarted once after a death) as needed.

        :raises EngineError: the engine could not start, or died too often; the message says why.
        """
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
            raise EngineError(self.failed[case.name])
        kind = "external" if self.server_url else case.engine.kind
        launcher = self.make_launcher(kind)
        if launcher is None:
            if kind not in LAUNCHERS:
                self.failed[case.name] = (
                    f"{case.source}: engine.kind {kind!r} is unknown; known: {sorted(LAUNCHERS)}"
                )
                raise EngineError(self.failed[case.name])
            launcher = LAUNCHERS[kind]()
        gpu_env: dict[str, str] = {}
        if self.gpus is not None and kind != "external":  # a server someone else runs has its own
            count = case.engine.gpu_count()
            try:
                self.lease = self.gpus.acquire(f"engine for {case.name}", count, self.on_message)
            except GpuError as exc:
                self.failed[case.name] = str(exc)
                raise EngineError(self.failed[case.name]) from None
            gpu_env = self.lease.env()
            self.on_message(
                f"[harness] {case.name}: GPUs {', '.join(self._gpu_names())} "
                f"(CUDA_VISIBLE_DEVICES={gpu_env['CUDA_VISIBLE_DEVICES']})"
            )
        ctx = LaunchContext(
            case=case,
            run_dir=run_dir,
            api_key=self.api_key,
            server_url=self.server_url,
            http=self.http,
            gpu_env=gpu_env,
        )
        self.starts[case.name] = self.starts.get(case.name, 0) + 1
        self.on_message(
            f"[harness] starting {kind} engine for {case.name} (log: {run_dir / 'engine.log'}) ..."
        )
        try:
            endpoint = self._start(case, launcher, ctx, kind)
        except BaseException:
            self._release()  # the launcher stopped what it started: its GPUs are free again
            raise
        endpoint.gpus = self.lease.records() if self.lease is not None else []
        endpoint.gpu_env = dict(gpu_env)
        self.current = (case.name, endpoint, launcher)
        return endpoint

    def _start(self, case: Any, launcher: Launcher, ctx: LaunchContext, kind: str) -> Endpoint:
        try:
            endpoint = launcher.start(ctx)
        except EngineError as exc:
            self.failed[case.name] = f"engine for {case.name!r} failed to start: {exc}"
            raise EngineError(self.failed[case.name]) from None
        except Exception as exc:
            # A plugin's launcher, or a bug: the model's other tests must not try again either.
            log.exception("launcher %s failed", kind)
            self.failed[case.name] = (
                f"engine for {case.name!r} failed to start: {type(exc).__name__}: {exc} "
                f"(launcher {type(launcher).__name__}; traceback in harness.log)"
            )
            raise EngineError(self.failed[case.name]) from None
        self.on_message(
            f"[harness] {case.name}: engine ready at {redaction.scrub_url(endpoint.base_url)} "
            f"after {endpoint.info.get('start_s', 0):.0f} s (version {endpoint.version})"
        )
        endpoint.info["stop_timeout_s"] = case.engine.stop_timeout_s
        endpoint.info["start_number"] = self.starts[case.name]  # 1 = first start of this model
        return endpoint

    def _gpu_names(self) -> list[str]:
        gpus = self.lease.gpus if self.lease is not None else ()
        return [str(g.index) if g.index is not None else str(g.uuid) for g in gpus]

    def _release(self) -> None:
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.release()

    def stop(self) -> None:
        """Stop the current engine, then free its GPUs (only once it is gone: it may still use them)."""
        if self.current is None:
            self._release()
            return
        name, endpoint, launcher = self.current
        self.current = None
        log.info("stopping engine for %s", name)
        try:
            launcher.stop(endpoint)
        finally:
            self._release()
