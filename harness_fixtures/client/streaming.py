"""Streaming OpenAI-compatible client: one asyncio event loop (uvloop when available) on its own thread.

Measured as the best single-process design (docs/performance.md): callers hand work over with
``submit`` (thread-safe, returns at once) and get ``on_first_token`` / ``on_complete`` callbacks on
the loop thread with the timestamps the loop observed. Output tokens are counted the way the server's
request profile says (:mod:`harness_fixtures.client.payload`): token ids per chunk (vLLM's
``return_token_ids``, SGLang's, trtllm-serve's ``detokenize: false``) checked against the usage
chunk, or ``usage.completion_tokens`` where the stream carries no ids. A request that fails is
reported with an error and no tokens, never with made-up ones. HTTP goes through
:mod:`harness_fixtures.client.http`, which parses SSE events inside the protocol callback (half the
CPU per request of aiohttp's stream reader).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .http import ConnectionPool, HttpError, RequestTimeout, Response
from .httpconfig import HttpConfig, ServerUrl
from .payload import build_payload
from .sizing import fit_connections_to_fd_limit
from .spec import ClientSpec

# The fast path of a token chunk: vLLM's compact JSON puts each choice's ids after this key.
_TOKEN_IDS = b'"token_ids":['
_FINISH = b'"finish_reason":'
_ID = b'"id":"'


@dataclass(slots=True)  # one per request, kept for the run: no per-instance __dict__
class RequestRecord:
    """Timestamps (time.monotonic_ns) and outcome of one request; one line of requests.jsonl."""

    query_id: int
    sample_index: int
    issued_ns: int
    sent_ns: int = 0
    first_token_ns: int = 0
    done_ns: int = 0
    n_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    first_token_id: int | None = None
    usage_tokens: int | None = None
    finish_reason: str | None = None
    status: str = "pending"
    error: str | None = None
    server_request_id: str | None = None  # the stream's SSE/JSON ``id``, else the X-Request-Id header
    prompt_tokens: int | None = None  # the server's usage.prompt_tokens
    # When each token-carrying chunk was parsed (time.monotonic_ns): the client-side inter-token
    # latencies. One int per chunk; emptied with token_ids once the request is logged.
    chunk_ns: list[int] = field(default_factory=list)
    endpoint: int = 0  # index of the endpoint that served it (runs with several endpoints)


FirstTokenCallback = Callable[[RequestRecord], None]
CompleteCallback = Callable[[RequestRecord], None]


class StreamingClient:
    """Sends prompts, streams answers, reports first token and completion through callbacks.

    :param http: the HTTP configuration; default: built from ``spec.http`` in this process (``env:``
        values and the server URL's credentials are read here).
    :raises HttpConfigError: a header, credential, proxy or TLS setting that cannot be used.
    """

    def __init__(
        self,
        spec: ClientSpec,
        prompts: Sequence[list[int] | str],
        on_first_token: FirstTokenCallback,
        on_complete: CompleteCallback,
        http: HttpConfig | None = None,
    ) -> None:
        self.spec = spec
        self.url = ServerUrl.parse(spec.base_url)
        # The environment's proxies and CA variables are checked when a request needs them.
        self.http = http or HttpConfig.build(spec.http, check_environment=False)
        self.http.headers_for(self.url)  # a credential conflict fails here, not in the loop thread
        self.token_source = spec.token_source
        self._prompts = prompts
        self._on_first_token = on_first_token
        self._on_complete = on_complete
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: ConnectionPool | None = None
        self._bodies: dict[int, bytes] = {}  # encoded request body per sample (Server re-sends samples)
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self.records: list[RequestRecord] = []
        self.failed = 0
        self.first_error: str | None = None
        self.max_connections = spec.max_connections
        self.connections_note: str | None = None  # why fewer connections than asked for (file limit)
        self._path = "/v1/completions" if spec.generation.api == "completions" else "/v1/chat/completions"
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        self._head = b""

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the loop thread; raises what stopped it from starting (never a silent dead thread)."""
        try:
            import uvloop

            self._loop = uvloop.new_event_loop()
        except ImportError:
            self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="harness-client", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the client's event loop did not start within 30 s")
        if self._start_error is not None:
            raise self._start_error

    def _run_loop(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._open())
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _open(self) -> None:
        self.max_connections, self.connections_note = fit_connections_to_fd_limit(self.spec.max_connections)
        self._pool = ConnectionPool(self.url, self.http, limit=self.max_connections)
        self._head = self._pool.request_head(self._path, self._headers)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self._close(), self._loop)
        with contextlib.suppress(Exception):  # closing must never mask the run's result
            fut.result(timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)

    async def _close(self) -> None:
        for task in list(self._inflight):
            task.cancel()
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._pool is not None:
            await self._pool.aclose()

    # -- work ------------------------------------------------------------------------------------
    def submit(self, items: list[tuple[int, int]], issued_ns: int | None = None) -> None:
        """Hand (query_id, sample_index) pairs to the loop; returns immediately (LoadGen's thread).

        ``issued_ns`` (time.monotonic_ns) is when LoadGen issued them; default: now.
        """
        issued = time.monotonic_ns() if issued_ns is None else issued_ns
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._dispatch, items, issued)

    def _dispatch(self, items: list[tuple[int, int]], issued_ns: int) -> None:
        assert self._loop is not None
        for qid, idx in items:
            rec = RequestRecord(query_id=qid, sample_index=idx, issued_ns=issued_ns)
            self.records.append(rec)
            task = self._loop.create_task(self._request(rec))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def warmup(self, sample_index: int = 0, timeout_s: float = 600.0) -> RequestRecord:
        """One request outside any measurement, so connections and engine caches are warm."""
        assert self._loop is not None
        rec = RequestRecord(query_id=-1, sample_index=sample_index, issued_ns=time.monotonic_ns())
        fut = asyncio.run_coroutine_threadsafe(self._request(rec, report=False), self._loop)
        fut.result(timeout_s)
        return rec

    def prewarm(self, connections: int, timeout_s: float = 30.0) -> int:
        """Open up to ``connections`` keep-alive connections before the run; returns how many are idle."""
        assert self._loop is not None and self._pool is not None
        fut = asyncio.run_coroutine_threadsafe(self._pool.prewarm(connections, timeout_s), self._loop)
        return fut.result(timeout_s + 5)

    def _payload(self, prompt: list[int] | str) -> dict[str, Any]:
        return build_payload(
            self.spec.request_profile, self.spec.generation, self.spec.served_model, prompt, self.token_source
        )

    def _body(self, sample_index: int) -> bytes:
        body = self._bodies.get(sample_index)
        if body is None:
            body = json.dumps(self._payload(self._prompts[sample_index])).encode()
            self._bodies[sample_index] = body
        return body

    async def _request(self, rec: RequestRecord, report: bool = True) -> None:
        assert self._pool is not None
        body = self._body(rec.sample_index)
        stream = _SseStream(self, rec, report, self.token_source == "usage")
        try:
            resp = await self._pool.post(
                self._head,
                body,
                stream.feed,
                self.spec.request_timeout_s,
                stream.head,
                stream.sent,
                self.spec.idle_timeout_s,
            )
            if resp.status != 200:
                raise _RequestFailed(f"HTTP {resp.status}: {resp.body[:300].decode(errors='replace')}")
            stream.finish()
            rec.status = "ok"
        except asyncio.CancelledError:
            rec.status, rec.error = "error", "cancelled (client stopped before the answer finished)"
        except _RequestFailed as exc:
            rec.status, rec.error = "error", str(exc)
        except RequestTimeout as exc:
            rec.status, rec.error = "error", str(exc)
        except HttpError as exc:
            rec.status, rec.error = "error", f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            rec.status, rec.error = "error", f"{type(exc).__name__}: {exc}"
        rec.done_ns = time.monotonic_ns()
        if rec.status != "ok":
            rec.token_ids = []
            rec.chunk_ns = []
            rec.n_tokens = 0
            self.failed += 1 if report else 0
            if self.first_error is None and report:
                self.first_error = f"query {rec.query_id} (sample {rec.sample_index}): {rec.error}"
        if report:
            self._on_complete(rec)


PLAIN_BODY_MAX = 1 << 20  # bytes of a non-streamed (plain JSON) answer kept to describe it


class _SseStream:
    """Server-sent events of one answer, parsed as the bytes arrive (inside the protocol callback).

    Framing as the SSE specification has it: lines end in CRLF, LF or CR; ``data:`` lines (one
    optional space after the colon) accumulate and a blank line dispatches the event; comments and
    other fields are skipped. ``data: [DONE]`` completes the answer at once.
    """

    __slots__ = ("buf", "client", "cr", "data", "done", "id_seen", "plain", "rec", "report", "usage_mode")

    def __init__(self, client: StreamingClient, rec: RequestRecord, report: bool, usage_mode: bool) -> None:
        self.client, self.rec, self.report, self.usage_mode = client, rec, report, usage_mode
        self.buf = b""
        self.data: bytes | None = None  # the data of the event being read
        self.cr = False  # the last bytes ended in CR: a following LF belongs to it
        self.done = False
        self.id_seen = False  # the stream named its id (it wins over the X-Request-Id header)
        self.plain: bytearray | None = None  # a non-streamed JSON answer, collected to describe it

    def sent(self) -> None:
        self.rec.sent_ns = time.monotonic_ns()

    def head(self, resp: Response) -> None:
        self.rec.server_request_id = resp.headers.get("x-request-id")
        ctype = resp.headers.get("content-type", "").lower()
        if resp.status == 200 and ctype.startswith("application/") and "json" in ctype:
            self.plain = bytearray()

    def feed(self, data: bytes) -> bool:
        """Parse received body bytes; True once the answer is complete ([DONE])."""
        if self.done:
            return True
        if self.plain is not None:
            self.plain += data[: PLAIN_BODY_MAX - len(self.plain)]
            return False
        if self.cr or b"\r" in data:
            if self.cr and data.startswith(b"\n"):
                data = data[1:]
            self.cr = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self.buf + data if self.buf else data
        start = 0
        while (nl := buf.find(b"\n", start)) >= 0:
            line = buf[start:nl]
            start = nl + 1
            if self._line(line):
                self.done = True
                self.buf = b""
                return True
        self.buf = buf[start:]
        return False

    def _line(self, line: bytes) -> bool:
        if not line:  # a blank line dispatches the event
            data, self.data = self.data, None
            return data is not None and self._event(data)
        if line.startswith(b"data:"):
            value = line[6:] if line.startswith(b"data: ") else line[5:]
            self.data = value if self.data is None else self.data + b"\n" + value
        elif line.startswith(b"id:") and not self.id_seen:
            self._set_id(line[3:].strip().decode(errors="replace"))
        # event:, retry: and ":" comments carry nothing this client needs
        return False

    def _set_id(self, value: str | None) -> None:
        if value:
            self.rec.server_request_id = value
            self.id_seen = True

    def _event(self, data: bytes) -> bool:
        """One event's data; True at ``[DONE]``. Raises _RequestFailed for an error or bad JSON."""
        if data.strip() == b"[DONE]":
            return True
        if not self.id_seen:
            self._set_id(_chunk_id(data))
        if not self.usage_mode:
            fast = _token_chunk(data)
            if fast is not None:
                ids, finish = fast
                if ids:
                    self._tokens(ids)
                if finish:
                    self.rec.finish_reason = finish
                return False
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            raise _RequestFailed(f"malformed SSE data: {data[:200]!r}") from None
        if not isinstance(chunk, dict):
            raise _RequestFailed(f"malformed SSE data (not a JSON object): {data[:200]!r}")
        if "error" in chunk:
            raise _RequestFailed(f"server error in stream: {json.dumps(chunk['error'])[:300]}")
        rec = self.rec
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            rec.usage_tokens = usage["completion_tokens"]
            if isinstance(usage.get("prompt_tokens"), int):
                rec.prompt_tokens = usage["prompt_tokens"]
            if self.usage_mode and rec.usage_tokens > 0 and not rec.first_token_ns:
                self._first(None)
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            got: list[int] | None = choice.get("token_ids")
            delta = choice.get("delta") or {}
            if got is None and isinstance(delta, dict):
                got = delta.get("token_ids")
            if self.usage_mode:
                if not rec.first_token_ns and (got or _has_output(choice, delta)):
                    self._first(None)
            elif got:
                self._tokens(got)
            if choice.get("finish_reason"):
                rec.finish_reason = choice["finish_reason"]
        return False

    def _first(self, first_id: int | None, now: int | None = None) -> None:
        rec = self.rec
        rec.first_token_ns = now or time.monotonic_ns()
        rec.first_token_id = first_id
        if self.report:
            self.client._on_first_token(rec)

    def _tokens(self, ids: list[int]) -> None:
        rec = self.rec
        now = time.monotonic_ns()
        rec.chunk_ns.append(now)
        if not rec.token_ids:
            rec.token_ids = list(ids)
            self._first(ids[0], now)
        else:
            rec.token_ids.extend(ids)

    def finish(self) -> None:
        """The response ended: it must have carried [DONE] and a token count that agrees with usage."""
        rec = self.rec
        if self.plain is not None:
            raise _RequestFailed(_plain_answer(bytes(self.plain)))
        if not self.done:
            # A last line or event without its terminator is still read (lenient, as common clients are).
            for line in (self.buf, b""):
                if self._line(line):
                    self.done = True
                    break
        if not self.done:
            got = rec.usage_tokens if self.usage_mode else len(rec.token_ids)
            raise _RequestFailed(f"stream ended without [DONE] after {got} tokens (truncated response)")
        if self.usage_mode:
            if rec.usage_tokens is None:
                raise _RequestFailed(
                    "no usage in the stream: tokens are counted from usage.completion_tokens for this "
                    "server and API, and it sent none (it must honour stream_options.include_usage)"
                )
            if rec.usage_tokens > 0 and not rec.first_token_ns:
                raise _RequestFailed(
                    f"usage says {rec.usage_tokens} tokens but no chunk carried output: time to first "
                    "token unknown"
                )
            rec.n_tokens = rec.usage_tokens
            return
        if not rec.token_ids:
            profile = self.client.spec.request_profile.name
            raise _RequestFailed(
                f"no token ids in the stream (usage said {rec.usage_tokens} tokens): the server must send "
                f"them as {profile} does when asked (return_token_ids, or detokenize: false for "
                "trtllm-serve); a server that cannot (SGLang before it supported return_token_ids) needs "
                "engine.request_profile set to its kind, or generation.count_tokens: usage"
            )
        if rec.usage_tokens is not None and rec.usage_tokens != len(rec.token_ids):
            raise _RequestFailed(
                f"stream carried {len(rec.token_ids)} token ids but usage says {rec.usage_tokens}"
            )
        rec.n_tokens = len(rec.token_ids)


def _chunk_id(data: bytes) -> str | None:
    """The ``"id"`` of a chunk (vLLM's request id, first key of every chunk), by a byte search.

    ``"id":"`` cannot occur inside a JSON string (its quotes would be escaped), so the first match is
    a key; vLLM writes the chunk's own id first.
    """
    i = data.find(_ID)
    if i < 0:
        return None
    i += len(_ID)
    j = data.find(b'"', i)
    return data[i:j].decode(errors="replace") if j > i else None


def _has_output(choice: dict[str, Any], delta: Any) -> bool:
    """A chunk that carries generated output (text, content, reasoning or a tool call)."""
    if choice.get("text"):
        return True
    if isinstance(delta, dict):
        return bool(
            delta.get("content")
            or delta.get("reasoning_content")
            or delta.get("reasoning")
            or delta.get("tool_calls")
        )
    return False


def _plain_answer(body: bytes) -> str:
    """The error for a 200 answer that is one JSON document instead of an event stream."""
    what = "a complete JSON answer"
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        if "error" in doc:
            return f"server error (HTTP 200, JSON, not a stream): {json.dumps(doc['error'])[:300]}"
        usage = doc.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            what += f" with {usage['completion_tokens']} tokens"
    return (
        f"the server sent {what} (Content-Type: application/json), not an event stream: it ignored "
        '"stream": true, so time to first token cannot be measured; check that the endpoint streams '
        "(a gateway may buffer or rewrite it)"
    )


def _token_chunk(data: bytes) -> tuple[list[int], str | None] | None:
    """(token ids, finish_reason) of an ordinary one-choice token chunk in compact JSON, else None.

    Most chunks of a stream are exactly that; json.loads costs ~4x more than these byte searches.
    Anything else (usage, errors, several choices, other spacing) returns None and is parsed in full.
    A key can't be faked by text: quotes inside JSON strings are escaped.
    """
    i = data.find(_TOKEN_IDS)
    if i < 0 or b'"usage"' in data or b'"error"' in data or data.count(b'"index":') > 1:
        return None
    i += len(_TOKEN_IDS)
    j = data.find(b"]", i)
    if j < 0 or data.find(_TOKEN_IDS, j) >= 0:
        return None
    try:
        ids = [int(x) for x in data[i:j].split(b",")] if j > i else []
    except ValueError:
        return None
    finish: str | None = None
    k = data.find(_FINISH)
    if k >= 0:
        k += len(_FINISH)
        if data.startswith(b'"', k):
            end = data.find(b'"', k + 1)
            if end < 0:
                return None
            finish = data[k + 1 : end].decode()
        elif not data.startswith(b"null", k):
            return None
    return ids, finish


class _RequestFailed(Exception):
    pass
