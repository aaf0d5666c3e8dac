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
    server_urls: tuple[str, ...] = ()  # every --harness-server-url (server_url: the first)
    api_key: str | None = field(default=None, repr=False)
    http: Any = field(default=None, repr=False)  # HttpConfig: headers, proxies, TLS of every request
    make_launcher: LauncherFactory = lambda kind: None
    on_message: Callable[[str], None] = log.info
    gpus: GpuAllocator | None = None
    current: tuple[str, list[Endpoint], Any] | None = None
    leases: list[GpuLease] = field(default_factory=list)  # the current engines' GPUs, one set each
    failed: dict[str, str] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)

    def get(self, case: Any, run_dir: Path) -> Endpoint:
        """The model's first engine (see :meth:`get_all`)."""
        return self.get_all(case, run_dir)[0]

    def get_all(self, case: Any, run_dir: Path) -> list[Endpoint]:
        """The model's running engines — one, ``engine.replicas`` of them, or one per URL — started
        (or restarted once after a death) as needed.

        :raises EngineError: an engine could not start, or died too often; the message says why.
        """
        if self.current and self.current[0] == case.name:
            endpoints = self.current[1]
            dead = [ep for ep in endpoints if not ep.alive()]
            if not dead:
                return endpoints
            # It died during an earlier test (which failed saying so). Start it once more so the
            # model's remaining tests can run; a second death ends this model's tests for the session.
            # With replicas, all of them restart: the next test measures the SUT the case describes.
            endpoint = dead[0]
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
        urls = list(self.server_urls) or ([self.server_url] if self.server_url else [])
        kind = "external" if urls else case.engine.kind
        if kind == "external" and not urls:
            urls = case.engine.endpoint_urls()
        launcher = self.make_launcher(kind)
        if launcher is None:
            if kind not in LAUNCHERS:
                self.failed[case.name] = (
                    f"{case.source}: engine.kind {kind!r} is unknown; known: {sorted(LAUNCHERS)}"
                )
                raise EngineError(self.failed[case.name])
            launcher = LAUNCHERS[kind]()
        count = len(urls) if kind == "external" and urls else max(1, int(case.engine.replicas))
        self.starts[case.name] = self.starts.get(case.name, 0) + 1
        started: list[Endpoint] = []
        try:
            for i in range(count):
                # One engine: its folder as before; several: a folder (and engine.log) each.
                where = run_dir if count == 1 else run_dir / f"replica-{i}"
                what = "" if count == 1 else f" {i + 1}/{count}"
                lease = self._lease(case, kind, what)
                ctx = LaunchContext(
                    case=case,
                    run_dir=where,
                    api_key=self.api_key,
                    server_url=urls[i] if kind == "external" and urls else None,
                    http=self.http,
                    gpu_env=lease.env() if lease is not None else {},
                    replica=i,
                )
                log_file = where / "engine.log"
                self.on_message(
                    f"[harness] starting {kind} engine{what} for {case.name} (log: {log_file}) ..."
                )
                endpoint = self._start(launcher, kind, ctx)
                self.on_message(
                    f"[harness] {case.name}: engine{what} ready at {redaction.scrub_url(endpoint.base_url)} "
                    f"after {endpoint.info.get('start_s', 0):.0f} s (version {endpoint.version})"
                )
                endpoint.info["stop_timeout_s"] = case.engine.stop_timeout_s
                endpoint.info["start_number"] = self.starts[case.name]  # 1 = first start of this model
                endpoint.info["replica"] = i
                endpoint.gpus = lease.records() if lease is not None else []
                endpoint.gpu_env = dict(ctx.gpu_env)
                started.append(endpoint)
        except BaseException:
            try:
                for ep in reversed(started):  # none outlives a failed start of its siblings
                    launcher.stop(ep)
            finally:
                self._release()  # the launcher stopped what it started: its GPUs are free again
            raise
        self.current = (case.name, started, launcher)
        return started

    def _lease(self, case: Any, kind: str, what: str) -> GpuLease | None:
        """--harness-gpus: lock ``engine.gpus`` GPUs for one engine (each replica its own set)."""
        if self.gpus is None or kind == "external":  # a server someone else runs has its own
            return None
        try:
            lease = self.gpus.acquire(
                f"engine{what} for {case.name}", case.engine.gpu_count(), self.on_message
            )
        except GpuError as exc:
            self.failed[case.name] = str(exc)
            raise EngineError(self.failed[case.name]) from None
        self.leases.append(lease)
        env = lease.env()
        names = [str(g.index) if g.index is not None else str(g.uuid) for g in lease.gpus]
        self.on_message(
            f"[harness] {case.name}{what}: GPUs {', '.join(names)} "
            f"(CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']})"
        )
        return lease

    def _start(self, launcher: Launcher, kind: str, ctx: LaunchContext) -> Endpoint:
        name = ctx.case.name
        try:
            return launcher.start(ctx)
        except EngineError as exc:
            self.failed[name] = f"engine for {name!r} failed to start: {exc}"
            raise EngineError(self.failed[name]) from None
        except Exception as exc:
            # A plugin's launcher, or a bug: the model's other tests must not try again either.
            log.exception("launcher %s failed", kind)
            self.failed[name] = (
                f"engine for {name!r} failed to start: {type(exc).__name__}: {exc} "
                f"(launcher {type(launcher).__name__}; traceback in harness.log)"
            )
            raise EngineError(self.failed[name]) from None

    def _release(self) -> None:
        leases, self.leases = self.leases, []
        for lease in leases:
            lease.release()

    def stop(self) -> None:
        """Stop the current engine, then free its GPUs (only once it is gone: it may still use them)."""
        if self.current is None:
            self._release()
            return
        name, endpoints, launcher = self.current
        self.current = None
        log.info("stopping engine(s) for %s", name)
        try:
            for endpoint in endpoints:
                launcher.stop(endpoint)
        finally:
            self._release()
