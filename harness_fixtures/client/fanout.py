"""Client fan-out: LoadGen in the runner process, HTTP streams in N worker processes.

One client process is one GIL: past a few hundred streamed requests per second its event loop, not the
server, sets the pace (docs/performance.md). :class:`FanoutClient` has the in-process
:class:`~harness_fixtures.client.StreamingClient`'s interface; behind it each worker
(``python -m harness_fixtures.fanout``) runs its own StreamingClient, event loop and connection pool.

Channel: two pipes per worker, newline-framed text. Runner → worker: the run spec (first line), then
``<issued_ns> <qid>,<idx> <qid>,<idx> ...`` per LoadGen issue call, ``W <idx>`` for a warm-up request.
Worker → runner: ``H`` (ready), ``F <qid> <ns> <token id or ->`` (first token), ``C <json>`` (completed),
``R <json>`` (warm-up done), ``S <json>`` (CPU stats, at exit). One receiver thread in the runner reads
every worker and calls LoadGen's FirstTokenComplete / QuerySamplesComplete itself, so LoadGen hears of a
token one pipe hop after the worker saw it. When a worker dies, each query it held completes as a failure
(zero tokens, an error naming the worker) and LoadGen still finishes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import selectors
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .cpu import CpuSampler
from .spec import ClientSpec
from .streaming import RequestRecord, StreamingClient

START_TIMEOUT_S = 60.0
_PIPE_SIZE = 1 << 20  # big pipes: an Offline issue of thousands of queries should not block LoadGen


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    wfd: int  # runner → worker
    rfd: int  # worker → runner
    alive: bool = True
    ready: bool = False
    # query id → [sample index, issued_ns, first_token_ns]
    inflight: dict[int, list[int]] = field(default_factory=dict)
    prewarmed: int | None = None
    buf: bytes = b""
    stats: dict[str, Any] = field(default_factory=dict)
    warmup: RequestRecord | None = None
    exit_note: str = ""


class FanoutClient:
    """StreamingClient's interface over ``workers`` processes; callbacks run on one receiver thread.

    :param spec: the run's client spec; each worker builds its prompts and client from it exactly as
        the in-process path does.
    :param workers: number of worker processes (>= 2 makes sense; 1 works too).
    """

    def __init__(
        self,
        spec: ClientSpec,
        workers: int,
        on_first_token: Callable[[RequestRecord], None],
        on_complete: Callable[[RequestRecord], None],
    ) -> None:
        self._spec_json = spec.model_dump_json()
        self.n_workers = workers
        self._on_first_token = on_first_token
        self._on_complete = on_complete
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._rr = 0
        self._stopping = False
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._orphans: deque[tuple[int, int, int, str]] = deque()  # (qid, idx, issued_ns, error)
        self._receiver: threading.Thread | None = None
        self._ready = threading.Condition(self._lock)
        self.records: list[RequestRecord] = []
        self.failed = 0
        self.first_error: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        for i in range(self.n_workers):
            self._workers.append(self._spawn(i))
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        for w in self._workers:
            self._sel.register(w.rfd, selectors.EVENT_READ, w)
        self._receiver = threading.Thread(target=self._receive, name="harness-fanout", daemon=True)
        self._receiver.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        with self._ready:
            while not all(w.ready or not w.alive for w in self._workers):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._ready.wait(left)
            missing = [w for w in self._workers if not w.ready]
        if missing:
            self.stop()
            notes = "; ".join(
                f"worker {w.index} (pid {w.proc.pid}) {w.exit_note or 'did not report ready'}"
                for w in missing
            )
            raise RuntimeError(f"client workers failed to start: {notes}; see harness.log")

    def _spawn(self, index: int) -> _Worker:
        to_w_r, to_w_w = os.pipe()
        from_w_r, from_w_w = os.pipe()
        for fd in (to_w_w, from_w_w):
            with contextlib.suppress(AttributeError, OSError):
                import fcntl

                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness_fixtures.client.fanout", str(index), str(to_w_r), str(from_w_w)],
            pass_fds=(to_w_r, from_w_w),
            stdin=subprocess.DEVNULL,  # stdout/stderr: inherited, so into the runner's harness.log
        )
        os.close(to_w_r)
        os.close(from_w_w)
        os.write(to_w_w, self._spec_json.replace("\n", " ").encode() + b"\n")
        return _Worker(index, proc, to_w_w, from_w_r)

    def warmup(self, sample_index: int = 0, timeout_s: float = 600.0) -> RequestRecord:
        """One warm-up request per worker (each has its own connections); returns the first one's."""
        for w in self._workers:
            self._send(w, b"W %d\n" % sample_index)
        deadline = time.monotonic() + timeout_s
        with self._ready:
            while not all(w.warmup is not None or not w.alive for w in self._workers):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._ready.wait(left)
        done = [w.warmup for w in self._workers if w.warmup is not None]
        if done:
            bad = next((r for r in done if r.status != "ok"), None)
            return bad or done[0]
        now = time.monotonic_ns()
        return RequestRecord(-1, sample_index, now, now, 0, now, status="error", error="no worker answered")

    def prewarm(self, connections: int, timeout_s: float = 30.0) -> int:
        """Each worker opens its share of ``connections``; returns how many are open in all."""
        share = math.ceil(connections / max(1, len(self._workers)))
        for w in self._workers:
            w.prewarmed = None
            self._send(w, b"P %d %d\n" % (share, max(1, round(timeout_s))))
        deadline = time.monotonic() + timeout_s + 5
        with self._ready:
            while not all(w.prewarmed is not None or not w.alive for w in self._workers):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._ready.wait(left)
        return sum(w.prewarmed or 0 for w in self._workers)

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
        for w in self._workers:
            with contextlib.suppress(OSError):
                os.close(w.wfd)  # EOF: the worker stops its client, reports its CPU and exits
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._receiver is not None:
            self._receiver.join(timeout_s)
        for w in self._workers:
            try:
                w.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(5)
        with contextlib.suppress(OSError):
            os.close(self._wake_w)

    def worker_stats(self) -> list[dict[str, Any]]:
        return [
            {"index": w.index, "pid": w.proc.pid, "exit_code": w.proc.poll(), **w.stats}
            for w in self._workers
        ]

    # -- issue (LoadGen's thread) ----------------------------------------------------------------
    def submit(self, items: list[tuple[int, int]], issued_ns: int | None = None) -> None:
        """Split (query_id, sample_index) pairs over the live workers; returns once written."""
        issued = time.monotonic_ns() if issued_ns is None else issued_ns
        with self._lock:
            live = [w for w in self._workers if w.alive]
            if not live:
                for qid, idx in items:
                    self._orphans.append((qid, idx, issued, "no client worker is alive"))
                os.write(self._wake_w, b"x")
                return
            # Round-robin by query: consecutive Server queries go to different workers.
            parts: list[list[tuple[int, int]]] = [[] for _ in live]
            start = self._rr
            for k, item in enumerate(items):
                parts[(start + k) % len(live)].append(item)
            self._rr = (start + len(items)) % len(live)
            for w, part in zip(live, parts, strict=True):
                for qid, idx in part:
                    w.inflight[qid] = [idx, issued, 0]
        for w, part in zip(live, parts, strict=True):
            if part:
                line = b"%d %s\n" % (issued, b" ".join(b"%d,%d" % p for p in part))
                self._send(w, line)

    def _send(self, w: _Worker, data: bytes) -> None:
        with contextlib.suppress(OSError):  # the worker is gone: the receiver fails what it held
            _write_all(w.wfd, data)

    # -- receive (one thread) --------------------------------------------------------------------
    def _receive(self) -> None:
        # Runs until stop: with every worker dead, queries LoadGen still issues fail here.
        open_workers = len(self._workers)
        while open_workers or not self._stopping:
            for key, _ in self._sel.select(0.5):
                w: _Worker | None = key.data
                if w is None:
                    os.read(self._wake_r, 4096)
                    self._fail_orphans()
                    continue
                try:
                    data = os.read(w.rfd, 1 << 18)
                except OSError:
                    data = b""
                if not data:
                    self._sel.unregister(w.rfd)
                    os.close(w.rfd)
                    self._worker_gone(w)
                    open_workers -= 1
                    continue
                buf = w.buf + data if w.buf else data
                lines = buf.split(b"\n")
                w.buf = lines.pop()
                for line in lines:
                    self._handle(w, line)
        self._fail_orphans()

    def _handle(self, w: _Worker, line: bytes) -> None:
        kind = line[:1]
        if kind == b"F":
            _, q, ns, tok = line.split(b" ")
            qid = int(q)
            slot = w.inflight.get(qid)
            if slot is None:
                return
            slot[2] = int(ns)
            first_id = None if tok == b"-" else int(tok)
            rec = RequestRecord(qid, slot[0], slot[1], first_token_ns=slot[2], first_token_id=first_id)
            self._on_first_token(rec)
        elif kind == b"C":
            rec = _record_from(json.loads(line[2:]))
            with self._lock:
                held = w.inflight.pop(rec.query_id, None)
            if held is None:
                return  # already completed as a failure when the worker was declared dead
            self._complete(rec)
        elif kind == b"H":
            with self._ready:
                w.ready = True
                self._ready.notify_all()
        elif kind == b"R":
            with self._ready:
                w.warmup = _record_from(json.loads(line[2:]))
                self._ready.notify_all()
        elif kind == b"Q":
            with self._ready:
                w.prewarmed = int(line[2:])
                self._ready.notify_all()
        elif kind == b"S":
            w.stats = json.loads(line[2:])

    def _complete(self, rec: RequestRecord) -> None:
        self.records.append(rec)
        if rec.status != "ok":
            self.failed += 1
            if self.first_error is None:
                self.first_error = f"query {rec.query_id} (sample {rec.sample_index}): {rec.error}"
        self._on_complete(rec)

    def _worker_gone(self, w: _Worker) -> None:
        code = w.proc.poll()
        if code is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = w.proc.wait(2)
        with self._ready:
            w.alive = False
            held, w.inflight = w.inflight, {}
            stopping = self._stopping
            w.exit_note = f"exited with code {code}" if stopping else f"died (exit code {code})"
            self._ready.notify_all()
        if not held and stopping:
            return
        error = f"client worker {w.index} (pid {w.proc.pid}) {w.exit_note} with this query in flight"
        if not stopping:
            print(f"harness fan-out: {error.replace('this query', f'{len(held)} queries')}", flush=True)
        now = time.monotonic_ns()
        for qid, (idx, issued, first_ns) in held.items():
            rec = RequestRecord(
                qid, idx, issued, done_ns=now, first_token_ns=first_ns, status="error", error=error
            )
            self._complete(rec)

    def _fail_orphans(self) -> None:
        while self._orphans:
            qid, idx, issued, error = self._orphans.popleft()
            now = time.monotonic_ns()
            self._complete(RequestRecord(qid, idx, issued, done_ns=now, status="error", error=error))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


_FIELDS = (
    "query_id",
    "sample_index",
    "issued_ns",
    "sent_ns",
    "first_token_ns",
    "done_ns",
    "token_ids",
    "first_token_id",
    "usage_tokens",
    "finish_reason",
    "status",
    "error",
    "server_request_id",
    "prompt_tokens",
    "chunk_ns",
)


def _record_to(rec: RequestRecord) -> list[Any]:
    return [getattr(rec, f) for f in _FIELDS]


def _record_from(values: Sequence[Any]) -> RequestRecord:
    rec = RequestRecord(**dict(zip(_FIELDS, values, strict=True)))
    rec.n_tokens = len(rec.token_ids) if rec.status == "ok" else 0
    return rec


# -- worker process ------------------------------------------------------------------------------
def worker_main(index: int, in_fd: int, out_fd: int) -> int:
    rfile = os.fdopen(in_fd, "rb", buffering=0)
    write_lock = threading.Lock()

    def send(data: bytes) -> None:
        with write_lock:
            _write_all(out_fd, data)

    first = b""
    while not first.endswith(b"\n"):
        chunk = rfile.read(1 << 16)
        if not chunk:
            return 0  # the runner went away before sending the spec
        first += chunk
    spec_line, _, rest = first.partition(b"\n")
    spec = ClientSpec.model_validate_json(spec_line)

    def on_first(rec: RequestRecord) -> None:
        # "-": no id (tokens counted from usage); never a made-up 0
        tok = b"-" if rec.first_token_id is None else b"%d" % rec.first_token_id
        send(b"F %d %d %s\n" % (rec.query_id, rec.first_token_ns, tok))

    def on_complete(rec: RequestRecord) -> None:
        send(b"C " + json.dumps(_record_to(rec), separators=(",", ":")).encode() + b"\n")
        rec.token_ids = []  # sent; the record stays in client.records for the whole run
        rec.chunk_ns = []

    client = StreamingClient(spec, spec.load_prompts(), on_first, on_complete)
    client.start()
    if client.connections_note:
        print(f"client worker {index}: {client.connections_note}", flush=True)
    cpu: CpuSampler | None = None  # from the first query on: the run, not the start-up
    send(b"H\n")
    buf = rest
    while True:
        lines = buf.split(b"\n")
        buf = lines.pop()
        for line in lines:
            if line.startswith(b"W "):
                w = client.warmup(int(line[2:]), timeout_s=spec.request_timeout_s)
                send(b"R " + json.dumps(_record_to(w), separators=(",", ":")).encode() + b"\n")
            elif line.startswith(b"P "):
                n, timeout = (int(x) for x in line[2:].split())
                send(b"Q %d\n" % client.prewarm(n, timeout))
            elif line:
                if cpu is None:
                    cpu = CpuSampler().start()
                issued, *pairs = line.split(b" ")
                items = [(int(q), int(i)) for q, _, i in (p.partition(b",") for p in pairs)]
                client.submit(items, issued_ns=int(issued))
        data = rfile.read(1 << 18)
        if not data:
            break
        buf += data
    client.stop()
    stats: dict[str, Any] = cpu.stop() if cpu is not None else {}
    stats["requests"] = len(client.records)
    send(b"S " + json.dumps(stats).encode() + b"\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print(
            "usage: python -m harness_fixtures.client.fanout INDEX IN_FD OUT_FD (started by the runner)",
            file=sys.stderr,
        )
        return 2
    return worker_main(int(args[0]), int(args[1]), int(args[2]))


if __name__ == "__main__":
    sys.exit(main())
