"""In-process HTTP fakes for the client's tests (``from httpfakes import ...``): a scriptable HTTP(S)
server, a forward proxy (absolute-form requests and CONNECT tunnels), and a throwaway CA with server
and client certificates. Everything listens on loopback, on a thread of the test process."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

# Imported once, with this module: pytester restores sys.modules after each run, and a second import
# of cryptography's Python layer no longer matches its compiled core ("curve must be an EllipticCurve").
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

UPSTREAM = "upstream.test"  # a name only FakeProxy resolves: a request that bypasses the proxy fails


# -- certificates ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: trusting only it must fail


def make_tls(directory: Path) -> TlsFiles:
    """A CA, a server certificate for localhost / 127.0.0.1 / ::1 / upstream.test, a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(k: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return path

    def write_cert(c: x509.Certificate, path: Path) -> Path:
        path.write_bytes(c.public_bytes(serialization.Encoding.PEM))
        return path

    def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        k = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False)
            .sign(k, hashes.SHA256())
        )
        return k, cert

    def issue(
        ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], cn: str, server: bool
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        k = key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca[1].subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[0].public_key()), critical=False
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.DNSName(UPSTREAM),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                    ]
                ),
                critical=False,
            )
        return k, builder.sign(ca[0], hashes.SHA256())

    ca = make_ca("harness test CA")
    other = make_ca("harness other CA")
    srv = issue(ca, "localhost", server=True)
    cli = issue(ca, "harness client", server=False)
    return TlsFiles(
        ca=write_cert(ca[1], directory / "ca.pem"),
        server_cert=write_cert(srv[1], directory / "server.pem"),
        server_key=write_key(srv[0], directory / "server.key"),
        client_cert=write_cert(cli[1], directory / "client.pem"),
        client_key=write_key(cli[0], directory / "client.key"),
        other_ca=write_cert(other[1], directory / "other-ca.pem"),
    )


def server_tls(tls: TlsFiles, require_client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.server_cert, tls.server_key)
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(tls.ca)
    return ctx


# -- a scriptable server ---------------------------------------------------------------------------
@dataclass
class Seen:
    """One request as the server read it."""

    method: str
    target: str
    headers: dict[str, str]  # names lowercased
    raw_head: bytes
    body: bytes
    connection: int  # which connection (0, 1, ...) it came on


@dataclass
class Reply:
    """What the server writes for a request: ``data`` in pieces of ``split`` bytes, then ``after``:
    keep the connection for the next request, close it, or hang (send nothing more, keep it open)."""

    data: bytes
    after: Literal["keep", "close", "hang"] = "keep"
    split: int = 7


Handler = Callable[[Seen], Reply]


class FakeHttpServer:
    """An asyncio HTTP/1.1 server on loopback in a thread; ``handler(request)`` scripts each answer."""

    def __init__(
        self,
        handler: Handler,
        tls: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        close_delay_s: float = 0,
    ) -> None:
        self.handler = handler
        self.close_delay_s = close_delay_s  # a slow peer: this long between the client's close and ours
        self.tls = tls
        self.host = host
        self.requests: list[Seen] = []
        self.connections = 0
        self.ended = 0  # connections whose client closed them (or that ended otherwise) before stop()
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.serving: set[asyncio.Task[None]] = set()  # one per connection, until it ends
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def url(self, host: str | None = None, path: str = "", userinfo: str = "") -> str:
        h = host or self.host
        h = f"[{h}]" if ":" in h else h
        return f"{'https' if self.tls else 'http'}://{userinfo}{h}:{self.port}{path}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, self.host, 0, ssl=self.tls)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.serving.add(task)
        task.add_done_callback(self.serving.discard)
        self.writers.append(writer)
        conn = self.connections
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head[:-4].decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                seen = Seen(method, target, headers, head, body, conn)
                self.requests.append(seen)
                reply = self.handler(seen)
                for i in range(0, len(reply.data), reply.split):
                    writer.write(reply.data[i : i + reply.split])
                    await writer.drain()
                if reply.after == "close":
                    break
                if reply.after == "hang":
                    await reader.read()  # until the client closes
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, asyncio.LimitOverrunError):
            pass  # the client closed the connection, or never finished its handshake
        finally:
            self.ended += 1  # before our side closes: a client that waits for that sees it counted
            if self.close_delay_s:
                await asyncio.sleep(self.close_delay_s)
            writer.close()

    async def _shutdown(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.serving):  # e.g. one waiting out close_delay_s
            task.cancel()
        await asyncio.gather(*self.serving, return_exceptions=True)
        await _close_all(self.writers)
        await self.server.wait_closed()
        self.loop.stop()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
        self.thread.join(5)
        self.loop.close()


async def _close_all(writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        w.close()
    for w in writers:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(w.wait_closed(), 1)


def http_response(
    body: bytes, status: int = 200, content_type: str = "text/event-stream", extra: str = ""
) -> bytes:
    """A Content-Length response."""
    head = (
        f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + body


# -- a forward proxy -------------------------------------------------------------------------------
@dataclass
class FakeProxy:
    """An HTTP forward proxy on loopback: absolute-form requests and CONNECT tunnels.

    :param hosts: names it resolves itself (name → (host, port)), e.g. ``upstream.test``.
    :param require: the Proxy-Authorization value it insists on (407 otherwise).
    """

    hosts: dict[str, tuple[str, int]] = field(default_factory=dict)
    require: str | None = None
    log: list[str] = field(default_factory=list)
    auth_seen: list[str | None] = field(default_factory=list)
    forwarded_heads: list[bytes] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def _resolve(self, host: str, port: int) -> tuple[str, int]:
        return self.hosts.get(host, (host, port))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head[:-4].decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ", 2)
            auth = next(
                (
                    ln.partition(":")[2].strip()
                    for ln in lines[1:]
                    if ln.lower().startswith("proxy-authorization:")
                ),
                None,
            )
            self.log.append(f"{method} {target}")
            self.auth_seen.append(auth)
            if self.require is not None and auth != self.require:
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                up_host, up_port = self._resolve(host.strip("[]"), int(port))
                up_reader, up_writer = await asyncio.open_connection(up_host, up_port)
                self.writers.append(up_writer)
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                await self._pipe_both(reader, writer, up_reader, up_writer, b"")
                return
            u = urlsplit(target)
            up_host, up_port = self._resolve(u.hostname or "", u.port or 80)
            up_reader, up_writer = await asyncio.open_connection(up_host, up_port)
            self.writers.append(up_writer)
            origin_form = (u.path or "/") + (f"?{u.query}" if u.query else "")
            kept = [ln for ln in lines[1:] if not ln.lower().startswith("proxy-authorization:")]
            forwarded = ("\r\n".join([f"{method} {origin_form} {version}", *kept]) + "\r\n\r\n").encode(
                "latin-1"
            )
            self.forwarded_heads.append(forwarded)
            await self._pipe_both(reader, writer, up_reader, up_writer, forwarded)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _pipe_both(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        first: bytes,
    ) -> None:
        if first:
            up_writer.write(first)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def _shutdown(self) -> None:
        assert self.server is not None
        self.server.close()
        await _close_all(self.writers)
        await self.server.wait_closed()
        self.loop.stop()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
        self.thread.join(5)
        self.loop.close()
