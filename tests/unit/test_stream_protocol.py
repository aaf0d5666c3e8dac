"""The client's HTTP/1.1 framing and SSE parsing without a server process: property-based tests over
arbitrary byte splits (hypothesis), and the StreamingClient against an in-process fake server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness_fixtures.client.http import HttpError, Response, _Exchange
from harness_fixtures.client.spec import ClientSpec
from harness_fixtures.client.streaming import RequestRecord, StreamingClient, _SseStream
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
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()  # every transport closed here, not left to the garbage collector
        await self.server.wait_closed()
        me = asyncio.current_task()
        handlers = [t for t in asyncio.all_tasks() if t is not me]
        for t in handlers:
            t.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
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


# -- SSE framing (the specification's: CR/LF variants, multi-line data, comments, other fields) -----
class _Sink:
    """Stands in for the StreamingClient an _SseStream reports to."""

    def __init__(self) -> None:
        self.firsts: list[int | None] = []
        self.spec = ClientSpec(
            base_url="http://h",
            served_model="m",
            generation=GenerationSpec(),
            dataset=DatasetSpec(path="unused.json"),
            dataset_path="unused.json",
        )

    def _on_first_token(self, rec: RequestRecord) -> None:
        self.firsts.append(rec.first_token_id)


def sse_stream(usage_mode: bool = False) -> tuple[_SseStream, _Sink, RequestRecord]:
    sink = _Sink()
    rec = RequestRecord(query_id=1, sample_index=0, issued_ns=1)
    return _SseStream(sink, rec, True, usage_mode), sink, rec  # type: ignore[arg-type]


def feed_pieces(stream: _SseStream, data: bytes, cuts: list[int]) -> bool:
    done, pos = False, 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        if cut > pos:
            done = stream.feed(data[pos:cut]) or done
            pos = cut
    return done


@st.composite
def sse_text(draw: st.DrawFn) -> tuple[bytes, list[int], str]:
    """A stream of token events written with arbitrary (legal) SSE framing; returns (bytes, ids, finish)."""
    batches = draw(st.lists(st.lists(st.integers(0, 60_000), min_size=1, max_size=3), min_size=1, max_size=6))
    finish = draw(st.sampled_from(["length", "stop"]))
    eol = st.sampled_from(["\n", "\r\n", "\r"])
    out: list[str] = []
    for i, ids in enumerate(batches):
        fin = f'"{finish}"' if i == len(batches) - 1 else "null"
        spaced = draw(st.booleans())  # compact JSON (the fast path) or with spaces (json.loads)
        sep = ", " if spaced else ","
        payload = (
            f'{{"id":"c"{sep}"choices":[{{"index":0{sep}"text":"x"{sep}"finish_reason":{fin}{sep}'
            f'"token_ids":[{sep.join(map(str, ids))}]}}]}}'
        )
        if draw(st.booleans()):
            out.append(": keep-alive comment" + draw(eol))
        if draw(st.booleans()):
            out.append("event: message" + draw(eol) + "id: 7" + draw(eol))
        prefix = draw(st.sampled_from(["data: ", "data:"]))
        # A line end and the blank line after it use one style: "\r" then "\n" would be one CRLF.
        end = draw(eol)
        if draw(st.booleans()) and "," in payload:
            # one event in two data lines: joined with a newline, still one JSON document
            k = draw(st.sampled_from([i for i, c in enumerate(payload) if c == ","])) + 1
            out.append(prefix + payload[:k] + draw(eol) + prefix + payload[k:] + end + end)
        else:
            out.append(prefix + payload + end + end)
    n = sum(len(b) for b in batches)
    end = draw(eol)
    out.append(f'data: {{"choices":[],"usage":{{"completion_tokens":{n}}}}}' + end + end)
    end = draw(eol)
    out.append("data: [DONE]" + end + end)
    ids = [t for b in batches for t in b]
    return "".join(out).encode(), ids, finish


@settings(max_examples=300, deadline=None)
@given(case=sse_text(), cuts=st.lists(st.integers(0, 100_000), max_size=40))
def test_sse_any_framing_and_split_yields_the_same_tokens(
    case: tuple[bytes, list[int], str], cuts: list[int]
) -> None:
    data, ids, finish = case
    stream, sink, rec = sse_stream()
    assert feed_pieces(stream, data, cuts) is True  # [DONE] completes the answer by itself
    stream.finish()
    assert rec.token_ids == ids and rec.n_tokens == len(ids) and rec.finish_reason == finish
    assert sink.firsts == [ids[0]]
    assert stream.feed(b"data: junk after done\n\n") is True  # nothing after [DONE] is read


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 10_000), max_size=20), eol=st.sampled_from(["\n", "\r\n", "\r"]))
def test_sse_usage_mode_counts_from_usage(cuts: list[int], eol: str) -> None:
    """A stream without ids (TensorRT-LLM or SGLang chat): first token = first chunk with output,
    count = the last usage; the role chunk's empty content is not a token."""
    events = [
        '{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}],"usage":{"completion_tokens":0}}',
        '{"choices":[{"index":0,"delta":{"content":"Hel"}}],"usage":{"completion_tokens":1}}',
        '{"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"length"}],"usage":{"completion_tokens":3}}',
        '{"choices":[],"usage":{"completion_tokens":3}}',
        "[DONE]",
    ]
    data = "".join(f"data: {e} {eol}{eol}" for e in events).encode()  # trtllm-serve puts a space there
    stream, sink, rec = sse_stream(usage_mode=True)
    assert feed_pieces(stream, data, cuts) is True
    stream.finish()
    assert rec.n_tokens == 3 and rec.token_ids == [] and rec.finish_reason == "length"
    assert sink.firsts == [None]  # the time is known, the id is not: none is made up


def test_sse_end_of_body_without_final_blank_line_still_reads_done() -> None:
    stream, _, rec = sse_stream()
    assert stream.feed(b'data: {"choices":[{"index":0,"token_ids":[5]}]}\n\ndata: [DONE]') is False
    stream.finish()  # the body ended: the last event is read, as common clients do
    assert rec.token_ids == [5]


# -- HTTP framing errors are HttpErrors with the reason, never a hang or a raw ValueError -----------
@pytest.mark.parametrize(
    "header, fragment",
    [
        ("Content-Length: -1", "invalid Content-Length '-1'"),
        ("Content-Length: 12abc", "invalid Content-Length '12abc'"),
        ("Content-Length: 5\r\nContent-Length: 6", "invalid Content-Length '5, 6'"),
        ("Content-Length: ٣", "invalid Content-Length"),  # a Unicode digit int() would accept
        ("Transfer-Encoding: gzip, chunked", "unsupported Transfer-Encoding"),
        ("Content-Encoding: gzip\r\nContent-Length: 3", "compressed"),
    ],
)
def test_bad_framing_headers_fail_with_the_reason(header: str, fragment: str) -> None:
    ex = new_exchange([])
    with pytest.raises(HttpError, match=re.escape(fragment)):
        ex.feed(f"HTTP/1.1 200 OK\r\n{header}\r\n\r\nabc".encode())


def test_repeated_equal_content_length_is_one() -> None:
    got: list[bytes] = []
    ex = new_exchange(got)
    assert ex.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc") is True
    assert got == [b"abc"]


@settings(max_examples=300, deadline=None)
@given(value=st.text(max_size=12))
def test_any_content_length_value_parses_or_is_an_http_error(value: str) -> None:
    ex = new_exchange([])
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: " + value.encode("utf-8") + b"\r\n\r\n"
    try:
        ex.feed(wire)
    except HttpError as exc:
        assert "Content-Length" in str(exc) or "not an HTTP response" in str(exc)
    else:
        assert value.strip().isdigit() and value.strip().isascii()


@pytest.mark.parametrize("size", [b"0x10", b"1_0", b"-5", b"+5", b" "])
def test_chunk_sizes_that_int_would_accept_are_refused(size: bytes) -> None:
    ex = new_exchange([])
    with pytest.raises(HttpError, match="bad chunk size"):
        ex.feed(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\n" + b"x" * 20 + b"\r\n"
        )


def test_body_callback_can_complete_the_message_before_the_body_ends() -> None:
    loop = asyncio.new_event_loop()
    try:
        fut: asyncio.Future[Response] = loop.create_future()
        ex = _Exchange(fut, lambda data: b"[DONE]" in data, None)
        done = ex.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nc\r\ndata: [DONE]\r\n")
        assert done is False and fut.done() and fut.result().complete is False  # answered, still draining
        assert ex.feed(b"0\r\n\r\n") is True
    finally:
        loop.close()
