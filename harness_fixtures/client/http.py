"""A minimal HTTP/1.1 client for streamed POST responses, built on ``asyncio.Protocol``.

Why not aiohttp: its body reader wakes the request's coroutine once per received chunk, and an LLM
stream is one chunk per token. Here the response is parsed inside ``data_received`` and the body is
handed to a callback there, so a 32-token answer costs two coroutine steps instead of ~35; measured
against the simulator this halves the client's CPU per request (docs/performance.md).

Scope: one origin (``http://`` or ``https://``), keep-alive connections up to a limit, chunked /
Content-Length / close-delimited bodies, a per-request deadline. No redirects, proxies, cookies or
compression (requests never ask for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

ERROR_BODY_MAX = 4096  # bytes of a non-200 body kept for the error message

BodyCallback = Callable[[bytes], None]
HeadCallback = Callable[["Response"], None]


class HttpError(Exception):
    """The exchange failed below HTTP semantics: connection refused or lost, bad framing, deadline."""


class RequestTimeout(HttpError):
    """The request's deadline passed before the response ended."""


class _RetryableReset(HttpError):
    """A reused keep-alive connection closed before any response byte: the server never saw it."""


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)  # names lowercased
    body: bytes = b""  # only for status != 200, at most ERROR_BODY_MAX bytes


class _Exchange:
    """One request/response on a connection: parses the status line, headers and body framing."""

    __slots__ = (
        "_buf",
        "_chunk_left",
        "_length_left",
        "_phase",
        "_trailer",
        "body",
        "framing",
        "future",
        "got_bytes",
        "keep_alive",
        "on_body",
        "on_head",
        "response",
    )

    def __init__(
        self, future: asyncio.Future[Response], on_body: BodyCallback, on_head: HeadCallback | None
    ) -> None:
        self.future = future
        self.on_body = on_body
        self.on_head = on_head
        self.response: Response | None = None
        self._buf = b""
        self._phase = "head"  # head → body → done
        self.framing = "close"  # chunked | length | close
        self._chunk_left = -1  # -1: expecting a chunk-size line; -2: expecting the CRLF after data
        self._length_left = 0
        self._trailer = False
        self.body = bytearray()
        self.got_bytes = False
        self.keep_alive = True

    # Returns True once the response has ended (the connection may then be reused).
    def feed(self, data: bytes) -> bool:
        self.got_bytes = True
        while self._phase == "head":  # a loop: interim (1xx) responses precede the real one
            buf = self._buf + data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    raise HttpError("response headers larger than 64 KiB")
                self._buf = buf
                return False
            self._buf = b""
            data = buf[end + 4 :]
            self._head(buf[:end])
        if self._phase == "done":
            return True
        if self.framing == "chunked":
            return self._chunked(data)
        if self.framing == "length":
            take = data[: self._length_left]
            self._length_left -= len(take)
            if take:
                self._emit(take)
            if self._length_left == 0:
                self._phase = "done"
                return True
            return False
        if data:
            self._emit(data)
        return False

    def _head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise HttpError(f"not an HTTP response: {lines[0][:100]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        status = int(parts[1])
        if 100 <= status < 200:
            # An interim response (100 Continue, 103 Early Hints): the real one follows.
            return
        self.response = Response(status, headers)
        conn = headers.get("connection", "").lower()
        self.keep_alive = conn != "close" if parts[0] == "HTTP/1.1" else conn == "keep-alive"
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.framing = "chunked"
        elif "content-length" in headers:
            self.framing = "length"
            self._length_left = int(headers["content-length"])
        else:
            self.framing = "close"
            self.keep_alive = False
        self._phase = "body"
        if self.on_head is not None:
            self.on_head(self.response)
        if status in (204, 304) or (self.framing == "length" and self._length_left == 0):
            self._phase = "done"

    def _chunked(self, data: bytes) -> bool:
        buf = self._buf + data if self._buf else data
        pos, n = 0, len(buf)
        while pos < n:
            left = self._chunk_left
            if left > 0:
                take = buf[pos : pos + left]
                pos += len(take)
                self._chunk_left = left - len(take)
                self._emit(take)
                if self._chunk_left == 0:
                    self._chunk_left = -2
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            line = buf[pos:eol]
            pos = eol + 2
            if left == -2:  # the CRLF that ends a chunk's data
                if line:
                    raise HttpError("bad chunked encoding: no CRLF after chunk data")
                self._chunk_left = -1
            elif self._trailer:
                if not line:
                    self._phase = "done"
                    self._buf = b""
                    return True
            else:
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    raise HttpError(f"bad chunk size line {line[:40]!r}") from None
                if size == 0:
                    self._trailer = True
                else:
                    self._chunk_left = size
        self._buf = buf[pos:]
        return False

    def _emit(self, data: bytes) -> None:
        assert self.response is not None
        if self.response.status == 200:
            self.on_body(data)
        elif len(self.body) < ERROR_BODY_MAX:
            self.body += data[: ERROR_BODY_MAX - len(self.body)]

    def eof(self) -> bool:
        """The connection closed: True when that ends a close-delimited body normally."""
        return self._phase == "body" and self.framing == "close"


class _Connection(asyncio.Protocol):
    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.exchange: _Exchange | None = None
        self.closed = False
        self.reused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's transport (asyncio's or uvloop's): typed as the base class by asyncio.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            self.close()  # bytes nobody asked for: the connection is out of step
            return
        try:
            done = ex.feed(data)
        except Exception as exc:  # framing errors and errors raised by the body callback
            self.exchange = None
            if not ex.future.done():
                ex.future.set_exception(exc)
            self.close()
            return
        if done:
            self.exchange = None
            if not ex.future.done():
                assert ex.response is not None
                ex.response.body = bytes(ex.body)
                ex.future.set_result(ex.response)
            if ex.keep_alive and not self.closed:
                self.pool._release(self)
            else:
                self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        ex, self.exchange = self.exchange, None
        if ex is None or ex.future.done():
            return
        if ex.eof() and ex.response is not None:
            ex.response.body = bytes(ex.body)
            ex.future.set_result(ex.response)
        elif self.reused and not ex.got_bytes:
            ex.future.set_exception(_RetryableReset("keep-alive connection closed by the server"))
        elif ex.got_bytes:
            ex.future.set_exception(HttpError("Server disconnected before the response ended (truncated)"))
        else:
            reason = f": {exc}" if exc else ""
            ex.future.set_exception(HttpError(f"Server disconnected before any response{reason}"))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool._forget(self)
            if self.transport is not None:
                self.transport.close()


class ConnectionPool:
    """Keep-alive connections to one origin, at most ``limit`` open at once (others wait their turn).

    Use from one event loop only. ``post`` returns the response; a 200 body goes to ``on_body`` as it
    arrives (inside the protocol callback, so timestamps taken there are the receive times).
    """

    def __init__(self, base_url: str, limit: int = 1024, connect_timeout_s: float = 30.0) -> None:
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"base URL {base_url!r} must be http://host[:port] or https://host[:port]")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if u.scheme == "https" else None
        default_port = self.port == (443 if u.scheme == "https" else 80)
        self.host_header = self.host if default_port else f"{self.host}:{self.port}"
        self.base_path = u.path.rstrip("/")
        self.limit = limit
        self.connect_timeout_s = connect_timeout_s
        self._idle: deque[_Connection] = deque()
        self._open: set[_Connection] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._connecting = 0

    def request_head(self, path: str, headers: dict[str, str]) -> bytes:
        """The fixed part of a POST head for ``path``; ``post`` appends Content-Length and the body."""
        lines = [f"POST {self.base_path}{path} HTTP/1.1", f"Host: {self.host_header}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n").encode("latin-1")

    async def post(
        self,
        head: bytes,
        body: bytes,
        on_body: BodyCallback,
        timeout_s: float,
        on_head: HeadCallback | None = None,
    ) -> Response:
        """Send ``head`` (from ``request_head``) + body; raises HttpError / RequestTimeout.

        ``on_head(response)`` runs once the status and headers are in, before any body callback.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        data = b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)
        for attempt in (1, 2):
            # A retry gets a new connection: the other idle ones may have timed out just the same.
            conn = await self._acquire(deadline, fresh=attempt == 2)
            fut: asyncio.Future[Response] = loop.create_future()
            conn.exchange = _Exchange(fut, on_body, on_head)
            assert conn.transport is not None
            conn.transport.write(data)
            timer = loop.call_at(deadline, self._expire, conn, fut, timeout_s)
            try:
                return await fut
            except _RetryableReset:
                if attempt == 2:
                    raise HttpError(
                        "Server disconnected before any response (on a kept-alive, then a new connection)"
                    ) from None
            except asyncio.CancelledError:
                conn.close()  # the answer is abandoned mid-stream: the connection cannot be reused
                raise
            finally:
                timer.cancel()
        raise AssertionError("unreachable")  # pragma: no cover

    def _expire(self, conn: _Connection, fut: asyncio.Future[Response], timeout_s: float) -> None:
        if not fut.done():
            fut.set_exception(RequestTimeout(f"timeout after {timeout_s:g} s"))
            conn.exchange = None
            conn.close()

    async def _acquire(self, deadline: float, fresh: bool = False) -> _Connection:
        while True:
            while self._idle and not fresh:
                conn = self._idle.pop()  # the most recently used one: least likely to have timed out
                if not conn.closed:
                    conn.reused = True
                    return conn
            if fresh and self._idle and len(self._open) + self._connecting >= self.limit:
                self._idle.popleft().close()  # make room for the new connection
            if len(self._open) + self._connecting < self.limit:
                return await self._connect(deadline)
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                raise RequestTimeout("timeout waiting for a free connection (max_connections)") from None
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    async def _connect(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        self._connecting += 1
        try:
            timeout = max(0.001, min(self.connect_timeout_s, deadline - loop.time()))
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                ),
                timeout,
            )
        except asyncio.TimeoutError:
            raise RequestTimeout(f"timeout connecting to {self.host}:{self.port}") from None
        except OSError as exc:
            raise HttpError(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        finally:
            self._connecting -= 1
        self._open.add(conn)
        return conn

    async def prewarm(self, n: int, timeout_s: float = 30.0) -> int:
        """Open connections until ``n`` (at most ``limit``) are idle, concurrently; returns how many are.

        A run that starts with a burst of connects measures the TCP handshakes (and the server's
        accept backlog) in its first requests' TTFT.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        want = min(n, self.limit) - len(self._idle) - self._connecting
        want = min(want, self.limit - len(self._open) - self._connecting)
        if want > 0:
            opened = await asyncio.gather(
                *(self._connect(deadline) for _ in range(want)), return_exceptions=True
            )
            for conn in opened:
                if isinstance(conn, _Connection):
                    self._release(conn)
        return sum(1 for c in self._idle if not c.closed)

    def _release(self, conn: _Connection) -> None:
        conn.reused = True
        self._idle.append(conn)
        self._wake()

    def _forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
