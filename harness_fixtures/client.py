"""Streaming OpenAI-compatible client: one asyncio + aiohttp event loop on its own thread.

FACTS.md §3 measured this as the best single-process design: callers hand work over with
``submit`` (thread-safe, returns at once) and get ``on_first_token`` / ``on_complete`` callbacks on
the loop thread with the timestamps the loop observed. Token ids come from the server's per-chunk
``token_ids`` (vLLM's ``return_token_ids``); a request that fails is reported with an error and no
tokens — never with made-up ones.
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

import aiohttp

# A generous per-connection read buffer: aiohttp's 64 KiB default throttles long streams (vllm#39963).
READ_BUFSIZE = 4 * 1024 * 1024


@dataclass
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
    server_request_id: str | None = None


FirstTokenCallback = Callable[[RequestRecord], None]
CompleteCallback = Callable[[RequestRecord], None]


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    served_model: str
    api: str = "completions"
    max_tokens: int = 128
    min_tokens: int = 1
    temperature: float = 0.0
    top_k: int = 1
    top_p: float = 1.0
    seed: int | None = 42
    ignore_eos: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)
    request_timeout_s: float = 600.0
    max_connections: int = 1024
    api_key: str | None = field(default=None, repr=False)  # never printed: repr=False


class StreamingClient:
    """Sends prompts, streams answers, reports first token and completion through callbacks."""

    def __init__(
        self,
        config: ClientConfig,
        prompts: Sequence[list[int] | str],
        on_first_token: FirstTokenCallback,
        on_complete: CompleteCallback,
    ) -> None:
        self.config = config
        self._prompts = prompts
        self._on_first_token = on_first_token
        self._on_complete = on_complete
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ready = threading.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self.records: list[RequestRecord] = []
        self.failed = 0
        self.first_error: str | None = None
        path = "/v1/completions" if config.api == "completions" else "/v1/chat/completions"
        self._url = config.base_url.rstrip("/") + path
        self._headers = {"Content-Type": "application/json"}
        if config.api_key:
            self._headers["Authorization"] = f"Bearer {config.api_key}"

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            import uvloop

            self._loop = uvloop.new_event_loop()
        except ImportError:
            self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="harness-client", daemon=True)
        self._thread.start()
        self._ready.wait(30)

    def _run_loop(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._open())
        self._ready.set()
        self._loop.run_forever()

    async def _open(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.config.max_connections, ttl_dns_cache=None)
        self._session = aiohttp.ClientSession(
            connector=connector,
            read_bufsize=READ_BUFSIZE,
            timeout=aiohttp.ClientTimeout(total=self.config.request_timeout_s),
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._loop is None or self._thread is None:
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
        if self._session is not None:
            await self._session.close()

    # -- work ------------------------------------------------------------------------------------
    def submit(self, items: list[tuple[int, int]]) -> None:
        """Hand (query_id, sample_index) pairs to the loop; returns immediately (LoadGen's thread)."""
        issued = time.monotonic_ns()
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

    def _payload(self, prompt: list[int] | str) -> dict[str, Any]:
        c = self.config
        body: dict[str, Any] = {
            "model": c.served_model,
            "max_tokens": c.max_tokens,
            "min_tokens": c.min_tokens,
            "temperature": c.temperature,
            "top_k": c.top_k,
            "top_p": c.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        if c.seed is not None:
            body["seed"] = c.seed
        if c.ignore_eos:
            body["ignore_eos"] = True
        if c.api == "completions":
            body["prompt"] = prompt
        else:
            body["messages"] = [{"role": "user", "content": prompt}]
        body.update(c.extra_body)
        return body

    async def _request(self, rec: RequestRecord, report: bool = True) -> None:
        assert self._session is not None
        payload = json.dumps(self._payload(self._prompts[rec.sample_index]))
        try:
            rec.sent_ns = time.monotonic_ns()
            async with self._session.post(self._url, data=payload, headers=self._headers) as resp:
                rec.server_request_id = resp.headers.get("X-Request-Id")
                if resp.status != 200:
                    body = (await resp.text())[:300]
                    raise _RequestFailed(f"HTTP {resp.status}: {body}")
                await self._read_stream(resp, rec, report)
            rec.status = "ok"
        except asyncio.CancelledError:
            rec.status, rec.error = "error", "cancelled (client stopped before the answer finished)"
        except _RequestFailed as exc:
            rec.status, rec.error = "error", str(exc)
        except asyncio.TimeoutError:
            rec.status, rec.error = "error", f"timeout after {self.config.request_timeout_s:g} s"
        except aiohttp.ClientError as exc:
            rec.status, rec.error = "error", f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            rec.status, rec.error = "error", f"{type(exc).__name__}: {exc}"
        rec.done_ns = time.monotonic_ns()
        if rec.status != "ok":
            rec.token_ids = []
            rec.n_tokens = 0
            self.failed += 1 if report else 0
            if self.first_error is None and report:
                self.first_error = f"query {rec.query_id} (sample {rec.sample_index}): {rec.error}"
        if report:
            self._on_complete(rec)

    async def _read_stream(self, resp: aiohttp.ClientResponse, rec: RequestRecord, report: bool) -> None:
        done = False
        async for raw in resp.content:
            line = raw.strip()
            if not line or not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                raise _RequestFailed(f"malformed SSE data: {data[:200]!r}") from None
            if "error" in chunk:
                raise _RequestFailed(f"server error in stream: {json.dumps(chunk['error'])[:300]}")
            usage = chunk.get("usage")
            if usage:
                rec.usage_tokens = usage.get("completion_tokens")
            for choice in chunk.get("choices") or ():
                ids = choice.get("token_ids")
                if ids is None:
                    ids = (choice.get("delta") or {}).get("token_ids")
                if ids:
                    if not rec.token_ids:
                        rec.first_token_ns = time.monotonic_ns()
                        rec.first_token_id = ids[0]
                        rec.token_ids = list(ids)
                        if report:
                            self._on_first_token(rec)
                    else:
                        rec.token_ids.extend(ids)
                if choice.get("finish_reason"):
                    rec.finish_reason = choice["finish_reason"]
        if not done:
            raise _RequestFailed(
                f"stream ended without [DONE] after {len(rec.token_ids)} tokens (truncated response)"
            )
        if not rec.token_ids:
            raise _RequestFailed(
                "no token ids in the stream: the server must support `return_token_ids` "
                f"(usage said {rec.usage_tokens} tokens)"
            )
        if rec.usage_tokens is not None and rec.usage_tokens != len(rec.token_ids):
            raise _RequestFailed(
                f"stream carried {len(rec.token_ids)} token ids but usage says {rec.usage_tokens}"
            )
        rec.n_tokens = len(rec.token_ids)


class _RequestFailed(Exception):
    pass
