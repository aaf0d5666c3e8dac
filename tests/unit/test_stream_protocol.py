"""The client's HTTP/1.1 framing and SSE parsing without a server process: property-based tests over
arbitrary byte splits (hypothesis), and the StreamingClient against an in-process fake server."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness_fixtures.client.http import HttpError, Response, _Exchange
from harness_fixtures.client.spec import ClientSpec
from harness_fixtures.client.streaming import RequestRecord, StreamingClient
from harness_fixtures.config import DatasetSpec, GenerationSpec

TOKENS = [[11], [12, 13], [14], [2]]


def sse_body(tokens: list[list[int]] = TOKENS, usage: bool = True, done: bool = True) -> bytes:
    """A vLLM-shaped completion stream: one chunk per token batch, a usage chunk, [DONE]."""
    events = []
    for i, ids in enumerate(tokens):
        finish = "length" if i == len(tokens) - 1 else None
        choice = {"index": 0, "text": "x", "finish_reason": finish, "token_ids": ids}
        events.append(json.dumps({"id": "cmpl-1", "choices": [choice]}, separators=(",", ":")))
    if usage:
        n = sum(len(t) for t in tokens)
        events.append(json.dumps({"choices": [], "usage": {"completion_tokens": n}}))
    if done:
        events.append("[DONE]")
    return b"".join(b"data: " + e.encode() + b"\n\n" for e in events)


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out, pos = b"", 0
    for size in [*sizes, len(body)]:
        part = body[pos : pos + max(1, size)]
        if not part:
            break
        out += b"%x\r\n%s\r\n" % (len(part), part)
        pos += len(part)
    return out + b"0\r\n\r\n"


def response(body: bytes, framing: str, sizes: list[int]) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nx-request-id: req-7\r\n"
    if framing == "chunked":
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, sizes)
    if framing == "length":
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    return head + b"Connection: close\r\n\r\n" + body


def feed_split(ex: _Exchange, wire: bytes, cuts: list[int]) -> bool:
    """Feed ``wire`` in pieces cut at ``cuts``; True once the exchange says the response ended."""
    done, pos = False, 0
    for cut in [*sorted({c % (len(wire) + 1) for c in cuts}), len(wire)]:
        if cut > pos:
            done = ex.feed(wire[pos:cut]) or done
            pos = cut
    return done


def new_exchange(got: list[bytes]) -> _Exchange:
    loop = asyncio.new_event_loop()
    try:
        return _Exchange(loop.create_future(), got.append, None)
    finally:
        loop.close()


@settings(max_examples=200, deadline=None)
@given(
    framing=st.sampled_from(["chunked", "length", "close"]),
    sizes=st.lists(st.integers(1, 40), max_size=12),
    cuts=st.lists(st.integers(0, 10_000), max_size=30),
)
def test_any_byte_split_yields_the_same_body(framing: str, sizes: list[int], cuts: list[int]) -> None:
    body = sse_body()
    wire = response(body, framing, sizes)
    got: list[bytes] = []
    ex = new_exchange(got)
    done = feed_split(ex, wire, cuts)
    assert b"".join(got) == body
    assert ex.response is not None and ex.response.headers["x-request-id"] == "req-7"
    # Chunked and Content-Length bodies end by themselves; a close-delimited one at EOF.
    assert done is (framing != "close")
    assert ex.eof() is (framing == "close")


@settings(max_examples=100, deadline=None)
@given(
    size=st.text(alphabet="0123456789abcdef", min_size=1, max_size=6), junk=st.binary(min_size=1, max_size=8)
)
def test_bad_chunk_size_lines_are_framing_errors(size: str, junk: bytes) -> None:
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"zz" + junk + b"\r\n"
    ex = new_exchange([])
    with pytest.raises(HttpError, match="bad chunk size"):
        ex.feed(wire)


def test_interim_response_is_skipped_and_headers_are_lowercased() -> None:
    got: list[bytes] = []
    ex = new_exchange(got)
    wire = b"HTTP/1.1 100 Continue\r\n\r\n" + response(b"data: x\n\n", "length", [])
    assert ex.feed(wire) is True
    assert b"".join(got) == b"data: x\n\n"
    assert isinstance(ex.response, Response) and "content-type" in ex.response.headers


# -- the streaming client against an in-process fake server ----------------------------------------
class FakeServer:
    """An asyncio HTTP server on loopback in this process: canned stream answers, dribbled in small
    writes so the client must reassemble arbitrary splits."""

    def __init__(self, answer: bytes, split: int = 7) -> None:
        self.answer = answer
        self.split = split
        self.requests: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.lower().split(b"\r\n")
                length = next(int(x.split(b":")[1]) for x in lines if x.startswith(b"content-length"))
                self.requests.append(json.loads(await reader.readexactly(length)))
                for i in range(0, len(self.answer), self.split):
                    writer.write(self.answer[i : i + self.split])
                    await writer.drain()
                if b"Connection: close" in self.answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed the connection
        finally:
            writer.close()

    async def _shutdown(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        # Let every transport finish closing before the loop stops: one still "closing" when the
        # loop is closed is reported as an unclosed-transport ResourceWarning in a later test.
        await asyncio.gather(*(w.wait_closed() for w in self.writers), return_exceptions=True)
        await self.server.wait_closed()
        self.loop.stop()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    server = FakeServer(response(sse_body(), "chunked", [5, 9, 3]))
    yield server
    server.stop()


def run_client(port: int, n: int) -> list[RequestRecord]:
    spec = ClientSpec(
        base_url=f"http://127.0.0.1:{port}",
        served_model="m",
        generation=GenerationSpec(max_tokens=4),
        dataset=DatasetSpec(path="unused.json"),
        dataset_path="unused.json",
        request_timeout_s=10,
    )
    done: list[RequestRecord] = []
    firsts: list[int | None] = []
    finished = threading.Event()

    def on_complete(rec: RequestRecord) -> None:
        done.append(rec)
        if len(done) == n:
            finished.set()

    client = StreamingClient(spec, [[1, 2, 3]] * n, lambda r: firsts.append(r.first_token_id), on_complete)
    client.start()
    try:
        client.submit([(i, i) for i in range(n)])
        assert finished.wait(20), f"{len(done)} of {n} completed"
    finally:
        client.stop()
    assert firsts == [11] * n  # the first token reached the first-token callback, once per request
    return sorted(done, key=lambda r: r.query_id)


def test_streaming_client_reads_every_token_from_an_in_process_server(fake_server: FakeServer) -> None:
    records = run_client(fake_server.port, 3)
    for rec in records:
        assert rec.status == "ok", rec.error
        assert rec.n_tokens == 5 and rec.finish_reason == "length"
        assert rec.server_request_id == "cmpl-1"  # the stream's own id wins over X-Request-Id
        assert rec.first_token_ns >= rec.sent_ns > 0 and rec.done_ns >= rec.first_token_ns
    body = fake_server.requests[0]
    assert body["prompt"] == [1, 2, 3] and body["stream"] is True and body["return_token_ids"] is True


def test_usage_disagreeing_with_the_ids_is_a_failed_request_without_tokens() -> None:
    # The stream carries 5 ids but its usage chunk says 6: counting must not guess.
    lying = sse_body(usage=False).replace(
        b"data: [DONE]", b'data: {"choices":[],"usage":{"completion_tokens":6}}\n\ndata: [DONE]'
    )
    server = FakeServer(response(lying, "length", []))
    try:
        (rec,) = run_client(server.port, 1)
    finally:
        server.stop()
    assert rec.status == "error" and rec.n_tokens == 0 and rec.token_ids == []
    assert "usage says 6" in (rec.error or "")
