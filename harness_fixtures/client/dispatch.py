"""One LoadGen, many endpoints: each query goes to one endpoint, picked in the runner process.

:class:`Dispatcher` is the policy (pure, unit-tested): ``least-outstanding`` picks the endpoint with
the fewest requests in flight (ties: lowest index), ``round-robin`` the next one in turn. Both skip an
endpoint taken out of service: after :data:`DOWN_AFTER_FAILURES` failed requests in a row with no
success between (a dead server fails fast, so least-outstanding would otherwise pour every query into
it). With every endpoint down, queries still go somewhere and fail honestly, so LoadGen finishes.

:class:`MultiEndpointClient` has the StreamingClient interface over one client per endpoint: an
in-process StreamingClient each, or with fan-out a FanoutClient each with its share of the worker
processes. The dispatch stays here, in the one process that sees every issue and every completion,
so least-outstanding counts exactly what is in flight on each endpoint (per-worker counting would
see only a slice of it). Each record gets its endpoint index before LoadGen hears of it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .spec import DISPATCH_POLICIES as POLICIES
from .spec import ClientSpec, DispatchPolicy
from .streaming import RequestRecord

DOWN_AFTER_FAILURES = 3


class Dispatcher:
    """Which endpoint gets the next query; thread-safe (LoadGen issues, clients complete)."""

    def __init__(self, n: int, policy: DispatchPolicy = "least-outstanding") -> None:
        if n < 1:
            raise ValueError(f"a dispatcher needs at least one endpoint, got {n}")
        if policy not in POLICIES:
            raise ValueError(f"dispatch policy {policy!r} is not one of {list(POLICIES)}")
        self.policy = policy
        self.inflight = [0] * n
        self.sent = [0] * n
        self.failed_in_row = [0] * n
        self.down: list[str | None] = [None] * n  # why an endpoint was taken out of service
        self._next = 0
        self._lock = threading.Lock()

    def pick(self) -> int:
        """The endpoint for one query; counts it in flight there."""
        with self._lock:
            n = len(self.inflight)
            usable = [i for i in range(n) if self.down[i] is None] or list(range(n))
            if self.policy == "round-robin":
                i = next((j % n for j in range(self._next, self._next + n) if j % n in usable), usable[0])
                self._next = i + 1
            else:
                i = min(usable, key=lambda j: (self.inflight[j], j))
            self.inflight[i] += 1
            self.sent[i] += 1
            return i

    def done(self, i: int, ok: bool, error: str | None = None) -> None:
        """A query on endpoint ``i`` finished; ``DOWN_AFTER_FAILURES`` failures in a row take it out."""
        with self._lock:
            self.inflight[i] -= 1
            if ok:
                self.failed_in_row[i] = 0
                return
            self.failed_in_row[i] += 1
            if self.down[i] is None and self.failed_in_row[i] >= DOWN_AFTER_FAILURES:
                self.down[i] = f"{self.failed_in_row[i]} requests in a row failed; last: {error}"


class _Client(Protocol):
    records: list[RequestRecord]
    failed: int
    first_error: str | None

    def start(self) -> None: ...
    def stop(self, timeout_s: float = ...) -> None: ...
    def submit(self, items: list[tuple[int, int]], issued_ns: int | None = ...) -> None: ...
    def warmup(self, sample_index: int = ..., timeout_s: float = ...) -> RequestRecord: ...
    def prewarm(self, connections: int, timeout_s: float = ...) -> int: ...


def endpoint_spec(spec: ClientSpec, url: str) -> ClientSpec:
    """The client spec of one endpoint (the run's settings, that endpoint's URL)."""
    return spec.model_copy(update={"base_url": url, "endpoints": []})


class MultiEndpointClient:
    """StreamingClient's interface over one client per endpoint of ``spec.endpoints``.

    :param workers: client processes in all; 1: an in-process client per endpoint, else each endpoint
        gets ``ceil(workers / endpoints)`` fan-out workers of its own.
    """

    def __init__(
        self,
        spec: ClientSpec,
        prompts: Sequence[list[int] | str],
        workers: int,
        on_first_token: Callable[[RequestRecord], None],
        on_complete: Callable[[RequestRecord], None],
    ) -> None:
        from .fanout import FanoutClient
        from .streaming import StreamingClient

        self.urls = list(spec.endpoints)
        self.dispatcher = Dispatcher(len(self.urls), spec.dispatch)
        self._on_first_token = on_first_token
        self._on_complete = on_complete
        self._lock = threading.Lock()
        self.records: list[RequestRecord] = []
        self.failed = 0
        self.first_error: str | None = None
        per = math.ceil(workers / len(self.urls)) if workers > 1 else 1
        self.workers_per_endpoint = per
        self.clients: list[_Client] = []
        for i, url in enumerate(self.urls):
            sub = endpoint_spec(spec, url)
            first, complete = self._callbacks(i)
            if per == 1:
                self.clients.append(StreamingClient(sub, prompts, first, complete))
            else:
                self.clients.append(FanoutClient(sub, per, first, complete))
        self.max_connections = sum(getattr(c, "max_connections", spec.max_connections) for c in self.clients)
        self.connections_note: str | None = None

    def _callbacks(self, i: int) -> tuple[Callable[[RequestRecord], None], Callable[[RequestRecord], None]]:
        def first(rec: RequestRecord) -> None:
            rec.endpoint = i
            self._on_first_token(rec)

        def complete(rec: RequestRecord) -> None:
            rec.endpoint = i
            self.dispatcher.done(i, rec.status == "ok", rec.error)
            with self._lock:
                self.records.append(rec)
                if rec.status != "ok":
                    self.failed += 1
                    if self.first_error is None:
                        self.first_error = (
                            f"query {rec.query_id} (sample {rec.sample_index}) on endpoint {i}: {rec.error}"
                        )
            self._on_complete(rec)

        return first, complete

    def start(self) -> None:
        started: list[_Client] = []
        try:
            for c in self.clients:
                c.start()
                started.append(c)
        except BaseException:
            for c in started:
                c.stop()
            raise
        notes = [f"endpoint {i}: {n}" for i, c in enumerate(self.clients) if (n := _note(c))]
        self.connections_note = "; ".join(notes) or None

    def stop(self, timeout_s: float = 10.0) -> None:
        for c in self.clients:
            c.stop(timeout_s)

    def submit(self, items: list[tuple[int, int]], issued_ns: int | None = None) -> None:
        parts: list[list[tuple[int, int]]] = [[] for _ in self.clients]
        for item in items:
            parts[self.dispatcher.pick()].append(item)
        for c, part in zip(self.clients, parts, strict=True):
            if part:
                c.submit(part, issued_ns)

    def warmup(self, sample_index: int = 0, timeout_s: float = 600.0) -> RequestRecord:
        """One warm-up request per endpoint; returns the first failed one, else endpoint 0's."""
        done = []
        for i, c in enumerate(self.clients):
            rec = c.warmup(sample_index, timeout_s)
            rec.endpoint = i
            done.append(rec)
        return next((r for r in done if r.status != "ok"), done[0])

    def prewarm(self, connections: int, timeout_s: float = 30.0) -> int:
        share = math.ceil(connections / len(self.clients))
        return sum(c.prewarm(share, timeout_s) for c in self.clients)

    def endpoint_summary(self) -> list[dict[str, Any]]:
        """Per endpoint: what the dispatcher sent there and whether it was taken out of service."""
        d = self.dispatcher
        return [{"index": i, "dispatched": d.sent[i], "taken_out": d.down[i]} for i in range(len(self.urls))]


def _note(client: Any) -> str | None:
    note = getattr(client, "connections_note", None)
    return note if isinstance(note, str) else None
