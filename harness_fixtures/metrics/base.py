"""The collector protocol, a sampling-thread base class, and `CollectorSet`.

A collector samples one source (engine /metrics, host, GPUs) on its own daemon thread. Nothing a
collector does may fail or stall the benchmark: errors are caught and counted, `stop()` joins with a
deadline, and `CollectorSet` never raises from `start()`/`stop()`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..stats import describe
from .timeline import Sample, write_timeline

__all__ = ["BaseCollector", "Collector", "CollectorSet", "Sample"]

logger = logging.getLogger(__name__)


@runtime_checkable
class Collector(Protocol):
    """What the harness needs from a metrics source."""

    name: str

    def start(self, t0_ns: int) -> None:
        """Begin sampling; `t0_ns` is `time.monotonic_ns()` at the test start."""

    def stop(self) -> None:
        """Stop sampling; returns within a bounded time even if the source hangs."""

    @property
    def status(self) -> str:
        """One of: ok, unavailable (<why>), failed (<why>)."""

    def samples(self) -> list[Sample]:
        """Everything sampled so far, oldest first."""

    def summary(self) -> dict[str, dict[str, float]]:
        """Per series: n, mean, std, min, max, p50, p99 (harness_fixtures.stats.describe)."""


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class BaseCollector(ABC):
    """A collector that calls `_sample()` every `interval_s` on a daemon thread.

    Deadlines are absolute (t_start + k * interval) so sampling does not drift; ticks missed because a
    sample overran are skipped, not bunched. Subclasses implement `_sample()` and may override
    `_setup()` (return a reason string to mark the source unavailable: no thread is started) and
    `_teardown()`.

    :param name: source name written into every sample.
    :param interval_s: seconds between sample starts.
    :param stop_timeout_s: longest `stop()` waits for the thread (a hung source is abandoned).
    :param final_sample: take one more sample after stop is requested, so counters cover the whole run.
    """

    def __init__(
        self,
        name: str,
        *,
        interval_s: float = 1.0,
        stop_timeout_s: float = 3.0,
        final_sample: bool = True,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.name = name
        self.interval_s = float(interval_s)
        self.stop_timeout_s = float(stop_timeout_s)
        self.final_sample = final_sample
        self._t0_ns = 0
        self._lock = threading.Lock()
        self._samples: list[Sample] = []
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._unavailable: str | None = None
        self._first_error: str | None = None
        self._n_errors = 0
        self._n_ticks = 0
        self._n_missed = 0
        self._started = False
        self._abandoned = False

    # -- hooks -------------------------------------------------------------------------------
    def _setup(self) -> str | None:
        """Prepare the source; return None when usable, else why it is unavailable."""
        return None

    @abstractmethod
    def _sample(self) -> Iterable[tuple[str, float]]:
        """Read the source once; return (series, value) pairs. May raise: the base records it."""

    def _teardown(self) -> None:  # noqa: B027 - optional hook, deliberately a no-op
        """Release the source; called once after the thread ended (not if it was abandoned)."""

    # -- public ------------------------------------------------------------------------------
    def start(self, t0_ns: int | None = None) -> None:
        """Start the sampling thread; never raises (a failing `_setup` marks the collector failed)."""
        if self._started:
            return
        self._started = True
        self._t0_ns = time.monotonic_ns() if t0_ns is None else int(t0_ns)
        try:
            reason = self._setup()
        except Exception as exc:  # a collector must never break the run
            self._record_error(exc)
            return
        if reason is not None:
            self._unavailable = reason
            logger.info("metrics collector %r unavailable: %s", self.name, reason)
            return
        self._thread = threading.Thread(target=self._run, name=f"collector-{self.name}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the thread to finish without waiting (lets `CollectorSet` stop all in parallel)."""
        self._stop_event.set()

    def stop(self) -> None:
        """Stop and join the thread for at most `stop_timeout_s`; never raises."""
        self._stop_event.set()
        thread = self._thread
        if thread is None:
            return
        thread.join(self.stop_timeout_s)
        if thread.is_alive():
            if not self._abandoned:
                self._abandoned = True
                logger.warning(
                    "metrics collector %r did not stop within %.1f s; abandoning its thread",
                    self.name,
                    self.stop_timeout_s,
                )
            return
        self._thread = None
        try:
            self._teardown()
        except Exception as exc:
            logger.debug("collector %r teardown failed: %s", self.name, _describe(exc))

    @property
    def is_running(self) -> bool:
        """Whether the sampling thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def status(self) -> str:
        if self._unavailable is not None:
            return f"unavailable ({self._unavailable})"
        if self._first_error is not None:
            n, ticks = self._n_errors, max(self._n_ticks, 1)
            return f"failed ({n}/{ticks} samples errored; first: {self._first_error})"
        if self._abandoned:
            return f"failed (did not stop within {self.stop_timeout_s:g} s)"
        return "ok"

    @property
    def n_errors(self) -> int:
        return self._n_errors

    @property
    def n_missed_ticks(self) -> int:
        """Ticks skipped because a sample took longer than the interval."""
        return self._n_missed

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    def series(self, name: str) -> list[tuple[float, float]]:
        """(t_s, value) pairs of one series."""
        return [(s.t_s, s.value) for s in self.samples() if s.series == name]

    def summary(self) -> dict[str, dict[str, float]]:
        by_series: dict[str, list[float]] = {}
        for s in self.samples():
            by_series.setdefault(s.series, []).append(s.value)
        out = {}
        for name, values in by_series.items():
            st = describe(values)
            if st:
                out[name] = st
        return out

    # -- internals ---------------------------------------------------------------------------
    def _record_error(self, exc: BaseException) -> None:
        self._n_errors += 1
        if self._first_error is None:
            self._first_error = _describe(exc)
            logger.warning("metrics collector %r: %s", self.name, self._first_error)
        else:
            logger.debug("metrics collector %r: %s", self.name, _describe(exc))

    def _now_s(self) -> float:
        return (time.monotonic_ns() - self._t0_ns) / 1e9

    def _tick(self) -> None:
        self._n_ticks += 1
        t_before = self._now_s()
        try:
            pairs = list(self._sample())
        except Exception as exc:
            self._record_error(exc)
            return
        # Stamp with the midpoint: the source's snapshot lies somewhere inside the call.
        t = (t_before + self._now_s()) / 2.0
        new = [Sample(t, self.name, series, float(value)) for series, value in pairs]
        with self._lock:
            self._samples.extend(new)

    def _run(self) -> None:
        next_deadline = time.monotonic()
        while not self._stop_event.is_set():
            self._tick()
            next_deadline += self.interval_s
            now = time.monotonic()
            if now > next_deadline:
                missed = math.ceil((now - next_deadline) / self.interval_s)
                self._n_missed += missed
                next_deadline += missed * self.interval_s
            self._stop_event.wait(next_deadline - now)
        if self.final_sample:
            self._tick()


class CollectorSet:
    """Runs several collectors as one: merged timeline, statuses, summaries.

    :param collectors: collectors with unique names.
    :raises ValueError: on duplicate names.
    """

    def __init__(self, collectors: Iterable[Collector]) -> None:
        self._collectors = list(collectors)
        names = [c.name for c in self._collectors]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"collector names must be unique, duplicated: {dupes!r}")
        self.t0_ns: int | None = None
        self.t0_unix_s: float | None = None

    def __iter__(self) -> Iterator[Collector]:
        return iter(self._collectors)

    def __len__(self) -> int:
        return len(self._collectors)

    def __getitem__(self, name: str) -> Collector:
        for c in self._collectors:
            if c.name == name:
                return c
        raise KeyError(f"no collector named {name!r}; have {[c.name for c in self._collectors]!r}")

    def __enter__(self) -> CollectorSet:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, t0_ns: int | None = None) -> None:
        """Start every collector against one t0; never raises."""
        now_ns = time.monotonic_ns()
        now_unix = time.time()
        self.t0_ns = now_ns if t0_ns is None else int(t0_ns)
        # Wall-clock time of t0, derived once so the timeline file can be aligned with other logs.
        self.t0_unix_s = now_unix - (now_ns - self.t0_ns) / 1e9
        for c in self._collectors:
            try:
                c.start(self.t0_ns)
            except Exception as exc:  # a foreign Collector must not break the run
                logger.warning("metrics collector %r failed to start: %s", c.name, _describe(exc))

    def stop(self) -> None:
        """Signal every collector first, then join each: total wait ~ the slowest, not the sum."""
        for c in self._collectors:
            request = getattr(c, "request_stop", None)
            if callable(request):
                with contextlib.suppress(Exception):
                    request()
        for c in self._collectors:
            try:
                c.stop()
            except Exception as exc:
                logger.warning("metrics collector %r failed to stop: %s", c.name, _describe(exc))

    def samples(self) -> list[Sample]:
        """All collectors' samples merged, sorted by time."""
        merged: list[Sample] = []
        for c in self._collectors:
            try:
                merged.extend(c.samples())
            except Exception as exc:
                logger.warning("metrics collector %r samples() failed: %s", c.name, _describe(exc))
        merged.sort(key=lambda s: (s.t_s, s.source, s.series))
        return merged

    def statuses(self) -> dict[str, str]:
        out = {}
        for c in self._collectors:
            try:
                out[c.name] = c.status
            except Exception as exc:
                out[c.name] = f"failed ({_describe(exc)})"
        return out

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """{collector name: its summary()}."""
        out = {}
        for c in self._collectors:
            try:
                out[c.name] = c.summary()
            except Exception as exc:
                logger.warning("metrics collector %r summary() failed: %s", c.name, _describe(exc))
                out[c.name] = {}
        return out

    def write_timeline(self, path: Path | str) -> Path:
        """Write the merged samples as a timeline CSV (see `timeline.write_timeline`)."""
        return write_timeline(path, self.samples(), t0_unix_s=self.t0_unix_s)
