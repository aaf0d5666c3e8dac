"""A minimal HTTP/1.1 client for streamed POST responses, built on ``asyncio.Protocol``.

Why not aiohttp: its body reader wakes the request's coroutine once per received chunk, and an LLM
stream is one chunk per token. Here the response is parsed inside ``data_received`` and the body is
handed to a callback there, so a 32-token answer costs two coroutine steps instead of ~35; measured
against the simulator this halves the client's CPU per request (docs/performance.md).

What it does, as a standard client would (docs/http.md): one origin (``http://`` or ``https://``, a
path prefix and a query string kept), keep-alive connections up to a limit, chunked / Content-Length /
close-delimited bodies, TLS with the configuration's CA bundle and client certificate, http:// forward
proxies (absolute-form requests; CONNECT tunnels for https), and the configuration's headers and
credentials (:mod:`harness_fixtures.client.httpconfig`). Deadlines: a request's deadline starts when it
is written (not while it waits for a connection), and an answer that started but then stalls fails
after the idle timeout. A POST is never re-sent once written. Not supported, refused clearly: TLS to
the proxy itself, SOCKS, compressed bodies. No redirects or cookies (an OpenAI API has neither).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from .errors import CA_FIX, CertificateError, HttpError, RequestTimeout
from .httpconfig import HttpConfig, HttpConfigError, Proxy, ServerUrl

__all__ = ["ConnectionPool", "HttpError", "RequestTimeout", "Response"]

ERROR_BODY_MAX = 4096  # bytes of a non-200 body kept for the error message
HEAD_MAX = 65536
# An idle kept-alive connection older than this is closed, not reused: servers close theirs after a
# keep-alive timeout (uvicorn, and so vLLM, SGLang and trtllm-serve: 5 s), and a request written just
# as the server closes may have reached it, so it cannot be re-sent. A Keep-Alive: timeout=N response
# header replaces it with N - 1.
KEEPALIVE_REUSE_S = 4.0
# After a stream's final event ([DONE]) the rest of its body (the last chunk marker) must follow
# within this long, or the connection is closed instead of being reused.
DRAIN_S = 10.0

BodyCallback = Callable[[bytes], "bool | None"]  # True: the message is complete (e.g. SSE [DONE])
HeadCallback = Callable[["Response"], None]


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)  # names lowercased; repeated ones joined by ", "
    body: bytes = b""  # only for status != 200, at most ERROR_BODY_MAX bytes
    complete: bool = True  # False: the body callback ended the message before the body's framing did


class _Exchange:
    """One request/response on a connection: parses the status line, headers and body framing."""

    __slots__ = (
        "_buf",
        "_chunk_left",
        "_length_left",
        "_phase",
        "_trailer",
        "body",
        "body_started",
        "early",
        "framing",
        "future",
        "got_bytes",
        "keep_alive",
        "keep_alive_s",
        "last_rx",
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
        self.body_started = False
        self.early = False  # the body callback said the message is complete
        self.keep_alive = True
        self.keep_alive_s: float | None = None  # the server's Keep-Alive: timeout=N
        self.last_rx = 0.0

    # Returns True once the response has ended (the connection may then be reused).
    def feed(self, data: bytes) -> bool:
        self.got_bytes = True
        while self._phase == "head":  # a loop: interim (1xx) responses precede the real one
            buf = self._buf + data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > HEAD_MAX:
                    raise HttpError("response headers larger than 64 KiB")
                self._buf = buf
                return False
            self._buf = b""
            data = buf[end + 4 :]
            self._head(buf[:end])
        if self._phase == "done":
            return True
        if data:
            self.body_started = True
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
        if (
            len(parts) < 2
            or not parts[0].startswith("HTTP/")
            or not (parts[1].isdigit() and len(parts[1]) == 3)
        ):
            raise HttpError(f"not an HTTP response: {lines[0][:100]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                key = name.strip().lower()
                value = value.strip()
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
        status = int(parts[1])
        if 100 <= status < 200:
            # An interim response (100 Continue, 103 Early Hints): the real one follows.
            return
        self.response = Response(status, headers)
        conn = headers.get("connection", "").lower()
        self.keep_alive = "close" not in conn if parts[0] == "HTTP/1.1" else "keep-alive" in conn
        self.keep_alive_s = _keep_alive_timeout(headers.get("keep-alive"))
        te = headers.get("transfer-encoding")
        if te is not None:
            codings = [c.strip().lower() for c in te.split(",") if c.strip()]
            if codings != ["chunked"]:
                raise HttpError(
                    f"unsupported Transfer-Encoding {te!r} (status {status}): the client reads chunked or "
                    "plain bodies only"
                )
            self.framing = "chunked"
        elif "content-length" in headers:
            self.framing = "length"
            self._length_left = _content_length(headers["content-length"])
        else:
            self.framing = "close"
            self.keep_alive = False
        coding = headers.get("content-encoding", "identity").strip().lower()
        if status == 200 and coding not in ("identity", ""):
            raise HttpError(
                f"the answer is compressed (Content-Encoding: {coding}) although the client asked for no "
                "compression; turn compression off for this path at the server or gateway"
            )
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
                if n - pos > 4096:
                    raise HttpError("bad chunked encoding: chunk-size line longer than 4 KiB")
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
                size_text = line.split(b";", 1)[0].strip(b" \t")
                if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):
                    raise HttpError(f"bad chunk size line {line[:40]!r}")
                size = int(size_text, 16)
                if size == 0:
                    self._trailer = True
                else:
                    self._chunk_left = size
        self._buf = buf[pos:]
        return False

    def _emit(self, data: bytes) -> None:
        assert self.response is not None
        if self.response.status == 200:
            if self.on_body(data) and not self.early:
                self.early = True
                if not self.future.done():
                    self.response.complete = False
                    self.future.set_result(self.response)
        elif len(self.body) < ERROR_BODY_MAX:
            self.body += data[: ERROR_BODY_MAX - len(self.body)]

    def eof(self) -> bool:
        """The connection closed: True when that ends a close-delimited body normally."""
        return self._phase == "body" and self.framing == "close"


def _content_length(value: str) -> int:
    """One non-negative integer; repeated equal values (``5, 5``) are one (RFC 9110 8.6)."""
    values = {v.strip() for v in value.split(",")}
    if len(values) != 1 or not next(iter(values)).isdigit() or not next(iter(values)).isascii():
        raise HttpError(
            f"invalid Content-Length {value!r} in the response (must be one non-negative integer)"
        )
    return int(next(iter(values)))


def _keep_alive_timeout(value: str | None) -> float | None:
    if not value:
        return None
    for part in value.split(","):
        key, _, v = part.strip().partition("=")
        if key.strip().lower() == "timeout":
            with contextlib.suppress(ValueError):
                return max(0.0, float(v.strip()) - 1.0)
    return None


class _Connection(asyncio.Protocol):
    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.exchange: _Exchange | None = None
        self.closed = False  # closing asked (by us or the server)
        self.lost = False  # the transport is gone (connection_lost ran)
        self.reused = False
        self.idle_since = 0.0
        self.reuse_s = pool.idle_reuse_s

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's transport (asyncio's or uvloop's): typed as the base class by asyncio.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            self.close()  # bytes nobody asked for: the connection is out of step
            return
        ex.last_rx = self.pool.loop_time()
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
                if ex.keep_alive_s is not None:
                    self.reuse_s = ex.keep_alive_s  # the server said how long it keeps idle connections
                self.pool._release(self)
            else:
                self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = True
        self.pool._forget(self)
        ex, self.exchange = self.exchange, None
        if ex is None or ex.future.done():
            return
        if ex.eof() and ex.response is not None:
            ex.response.body = bytes(ex.body)
            ex.future.set_result(ex.response)
        elif self.reused and not ex.got_bytes:
            # The server closed a kept-alive connection as (or after) the request went out. It may have
            # read the request, so re-sending could run it twice: the request fails and is counted.
            ex.future.set_exception(
                HttpError(
                    "the server closed the kept-alive connection before answering; the request may have "
                    "reached it, so it was not re-sent"
                )
            )
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
    """Keep-alive connections to one server, at most ``limit`` open at once (others wait their turn).

    Use from one event loop only. ``post`` returns the response; a 200 body goes to ``on_body`` as it
    arrives (inside the protocol callback, so timestamps taken there are the receive times).

    :param url: the server (``ServerUrl`` or a URL string).
    :param http: headers, proxy and TLS; default: no extra headers, the environment's proxies, the
        system's CAs.
    """

    def __init__(
        self,
        url: ServerUrl | str,
        http: HttpConfig | None = None,
        limit: int = 1024,
        connect_timeout_s: float = 30.0,
        idle_reuse_s: float = KEEPALIVE_REUSE_S,
    ) -> None:
        self.url = url if isinstance(url, ServerUrl) else ServerUrl.parse(url)
        self.http = http or HttpConfig.build()
        self.proxy: Proxy | None = self.http.proxy_for(self.url)
        self.ssl: ssl.SSLContext | None = self.http.ssl_context() if self.url.tls else None
        self.limit = limit
        self.connect_timeout_s = connect_timeout_s
        self.idle_reuse_s = idle_reuse_s
        self._idle: deque[_Connection] = deque()
        self._open: set[_Connection] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._connecting = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def loop_time(self) -> float:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop.time()

    @property
    def where(self) -> str:
        """host:port of the server (and the proxy on the way) for messages."""
        via = f" via proxy {self.proxy.display}" if self.proxy else ""
        return f"{self.url.host_header}{via}"

    def request_head(self, path: str, headers: dict[str, str]) -> bytes:
        """The fixed part of a POST head for ``path``; ``post`` appends Content-Length and the body.

        ``headers`` are the caller's (Content-Type, Accept); the configuration's headers and
        credentials are added, and win over a caller's header of the same name.

        :raises HttpConfigError: a header that cannot be sent (checked by HttpConfig before).
        """
        target = self.url.target(path)
        if self.proxy is not None and not self.url.tls:
            target = self.url.origin + target  # a forward proxy gets the absolute form (RFC 9112 3.2.2)
        extra = self.http.headers_for(self.url)
        names = {n.lower() for n in extra}
        merged = {k: v for k, v in headers.items() if k.lower() not in names}
        merged.update(extra)
        lines = [f"POST {target} HTTP/1.1", f"Host: {self.url.host_header}"]
        lines += [f"{k}: {v}" for k, v in merged.items()]
        if self.proxy is not None and not self.url.tls and self.proxy.authorization:
            lines.append(f"Proxy-Authorization: {self.proxy.authorization}")
        if any("\r" in line or "\n" in line for line in lines):
            raise HttpConfigError("a request header contains a line break (CR or LF); it was not sent")
        text = "\r\n".join(lines) + "\r\n"
        try:
            return text.encode("latin-1")
        except UnicodeEncodeError as exc:
            raise HttpConfigError(
                f"a request header has a character that is not Latin-1 (position {exc.start}); not sent"
            ) from None

    async def post(
        self,
        head: bytes,
        body: bytes,
        on_body: BodyCallback,
        timeout_s: float,
        on_head: HeadCallback | None = None,
        on_sent: Callable[[], None] | None = None,
        idle_timeout_s: float | None = None,
    ) -> Response:
        """Send ``head`` (from ``request_head``) + body once; raises HttpError / RequestTimeout.

        The request waits for a free connection first; ``timeout_s`` counts from the moment it is
        written (``on_sent()`` is called then), so it measures the server, not the client's queue.
        ``idle_timeout_s``: once the answer's body has started, no byte for this long fails it.
        ``on_head(response)`` runs once the status and headers are in, before any body callback. A body
        callback returning True completes the request at once (the rest of the body is drained).
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        data = b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)
        conn = await self._acquire()
        fut: asyncio.Future[Response] = loop.create_future()
        ex = _Exchange(fut, on_body, on_head)
        conn.exchange = ex
        assert conn.transport is not None
        conn.transport.write(data)
        deadline = time.monotonic() + timeout_s
        if on_sent is not None:
            on_sent()
        timer = loop.call_later(
            timeout_s, self._deadline, conn, ex, deadline, f"timeout after {timeout_s:g} s"
        )
        idle = None
        if idle_timeout_s is not None:
            idle = _IdleWatch(self, conn, ex, idle_timeout_s)
        try:
            resp = await fut
        except asyncio.CancelledError:
            conn.close()  # the answer is abandoned mid-stream: the connection cannot be reused
            raise
        finally:
            timer.cancel()
            if idle is not None:
                idle.cancel()
        if conn.exchange is ex:
            # Completed by the body callback before the body ended: let the rest drain, within limits.
            loop.call_later(DRAIN_S, self._abandon, conn, ex)
        return resp

    def _deadline(self, conn: _Connection, ex: _Exchange, deadline: float, message: str) -> None:
        # Loop timers may fire a little early (uvloop counts whole ms from its cached clock): a
        # request never fails before its full deadline.
        left = deadline - time.monotonic()
        if left > 0:
            asyncio.get_running_loop().call_later(left, self._deadline, conn, ex, deadline, message)
        else:
            self._expire(conn, ex, message)

    def _expire(self, conn: _Connection, ex: _Exchange, message: str) -> None:
        if not ex.future.done():
            ex.future.set_exception(RequestTimeout(message))
            if conn.exchange is ex:
                conn.exchange = None
            conn.close()

    def _abandon(self, conn: _Connection, ex: _Exchange) -> None:
        if conn.exchange is ex:
            conn.exchange = None
            conn.close()

    async def _acquire(self) -> _Connection:
        """A connection for one request: the freshest idle one, else a new one, else wait for one."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            while self._idle:
                conn = self._idle.pop()  # the most recently used one: least likely to be closed
                transport = conn.transport
                if conn.closed or transport is None or transport.is_closing():
                    continue
                if now - conn.idle_since > conn.reuse_s:
                    conn.close()  # the server may be closing it right now: see KEEPALIVE_REUSE_S
                    continue
                return conn
            if len(self._open) + self._connecting < self.limit:
                return await self._connect()
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        self._connecting += 1
        try:
            _, conn = await asyncio.wait_for(self._open_connection(loop), self.connect_timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"timeout connecting to {self.where} after {self.connect_timeout_s:g} s"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            reason = exc.verify_message or exc
            raise CertificateError(
                f"TLS certificate of {self.url.host_header} not trusted: {reason}; {CA_FIX}"
            ) from None
        except ssl.SSLError as exc:
            raise HttpError(f"TLS handshake with {self.where} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise HttpError(f"cannot connect to {self.where}: {exc.strerror or exc}") from None
        finally:
            self._connecting -= 1
        self._open.add(conn)
        return conn

    async def _open_connection(
        self, loop: asyncio.AbstractEventLoop
    ) -> tuple[asyncio.BaseTransport, _Connection]:
        host = self.url.host
        if self.proxy is None:
            return await loop.create_connection(
                lambda: _Connection(self),
                host,
                self.url.port,
                ssl=self.ssl,
                server_hostname=host if self.ssl else None,
            )
        if self.ssl is None:  # plain http through a forward proxy: absolute-form requests to it
            return await loop.create_connection(lambda: _Connection(self), self.proxy.host, self.proxy.port)
        sock = await self._tunnel(loop, self.proxy)
        try:
            return await loop.create_connection(
                lambda: _Connection(self), sock=sock, ssl=self.ssl, server_hostname=host
            )
        except BaseException:
            sock.close()
            raise

    async def _tunnel(self, loop: asyncio.AbstractEventLoop, proxy: Proxy) -> socket.socket:
        """A socket through ``proxy`` to the server (HTTP CONNECT), ready for the TLS handshake."""
        authority = (
            f"[{self.url.host}]:{self.url.port}"
            if ":" in self.url.host
            else f"{self.url.host}:{self.url.port}"
        )
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if proxy.authorization:
            lines.append(f"Proxy-Authorization: {proxy.authorization}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
        last: OSError | None = None
        for family, kind, proto, _, addr in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, addr)
                await loop.sock_sendall(sock, request)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = await loop.sock_recv(sock, 4096)
                    if not chunk:
                        raise HttpError(
                            f"proxy {proxy.display} closed the connection during CONNECT {authority}"
                        )
                    head += chunk
                    if len(head) > HEAD_MAX:
                        raise HttpError(f"proxy {proxy.display}: CONNECT answer larger than 64 KiB")
                status_line = head.partition(b"\r\n")[0]
                parts = status_line.split(b" ", 2)
                if len(parts) < 2 or parts[1] != b"200":
                    raise HttpError(
                        f"proxy {proxy.display} refused CONNECT {authority}: "
                        f"{status_line.decode('latin-1', 'replace')[:120]!r}; check HTTPS_PROXY / NO_PROXY "
                        "and the proxy's credentials (user:password@ in the proxy URL)"
                    )
                if head.index(b"\r\n\r\n") + 4 != len(head):
                    raise HttpError(f"proxy {proxy.display} sent bytes after its CONNECT answer")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
            except BaseException:
                sock.close()
                raise
        raise OSError(f"proxy {proxy.display}: {last.strerror if last else 'no address'}") from None

    async def prewarm(self, n: int, timeout_s: float = 30.0) -> int:
        """Open connections until ``n`` (at most ``limit``) are idle, concurrently; returns how many are.

        A run that starts with a burst of connects measures the TCP handshakes (and the server's
        accept backlog) in its first requests' TTFT.
        """
        want = min(n, self.limit) - len(self._idle) - self._connecting
        want = min(want, self.limit - len(self._open) - self._connecting)
        if want > 0:
            opened = await asyncio.gather(
                *(asyncio.wait_for(self._connect(), timeout_s) for _ in range(want)), return_exceptions=True
            )
            for conn in opened:
                if isinstance(conn, _Connection):
                    self._release(conn)
        return sum(1 for c in self._idle if not c.closed)

    def _release(self, conn: _Connection) -> None:
        conn.reused = True
        conn.idle_since = self.loop_time()
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

    async def aclose(self, grace_s: float = 1.0) -> None:
        """Close every connection and wait, up to ``grace_s``, until their transports are gone.

        A TLS transport closes only after its close_notify exchange; an event loop stopped before
        that leaves the socket open (and a ResourceWarning when it is collected). Whatever is still
        open after the grace period is aborted.
        """
        conns = list(self._open)
        self.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while any(not c.lost for c in conns) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for c in conns:
            if not c.lost and c.transport is not None:
                c.transport.abort()
        await asyncio.sleep(0)  # let the aborted transports' connection_lost run


class _IdleWatch:
    """Fails an exchange whose body started and then received nothing for ``idle_s`` seconds.

    One timer per request, re-armed from the last receive time only when it fires: a stream that
    keeps sending costs one timer wake-up per ``idle_s``, not one per token.
    """

    __slots__ = ("conn", "ex", "handle", "idle_s", "pool")

    def __init__(self, pool: ConnectionPool, conn: _Connection, ex: _Exchange, idle_s: float) -> None:
        self.pool, self.conn, self.ex, self.idle_s = pool, conn, ex, idle_s
        self.handle: asyncio.TimerHandle | None = None
        self._arm(idle_s)

    def _arm(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self.handle = loop.call_later(max(0.001, delay), self._check)

    def _check(self) -> None:
        ex = self.ex
        if ex.future.done():
            return
        if not ex.body_started:
            self._arm(self.idle_s)  # before the answer starts the server may queue it: the deadline rules
            return
        quiet = self.pool.loop_time() - ex.last_rx
        if quiet >= self.idle_s:
            self.pool._expire(self.conn, ex, f"stream stalled: no data for {self.idle_s:g} s (idle timeout)")
        else:
            self._arm(self.idle_s - quiet)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
