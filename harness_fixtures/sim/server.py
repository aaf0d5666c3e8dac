"""The simulator's aiohttp app: vLLM-shaped OpenAI endpoints over an engine-like FIFO batch, with vLLM's
Prometheus metrics, server-side per-request records (``/sim/requests``) and fault injection.

Per-token work is a string format, a heap push and one socket write per due group of tokens: the client
benchmark needs > 1,000 req/s of 32-token streams on a 2-core box shared with the client. One
:class:`_TokenClock` timer serves every stream; deadlines are absolute (``time.monotonic()``), so a late
wake-up sends every token already due in one write instead of letting the schedule drift.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import json
import math
import os
import random
import sys
import time
import zlib
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from harness_fixtures.sim.settings import SimSettings, load_responses

# vLLM v1's bucket boundaries (vllm/v1/metrics/loggers.py), so dashboards and quantiles line up.
# fmt: off
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                             60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# fmt: on
FINISH_REASONS = ("stop", "length", "abort")

# uvloop timers tick in whole ms: a token due within half a tick leaves now rather than after a spin.
_EARLY_S = 0.0005
_SSE_DONE = "data: [DONE]\n\n"
_MALFORMED_SSE = "data: {malformed-sse-from-sim\n\n"


def package_version() -> str:
    """The harness-fixtures version, or ``0+unknown`` when run from a tree that is not installed."""
    try:
        from importlib.metadata import version

        return version("harness-fixtures")
    except Exception:
        return "0+unknown"


class _Histogram:
    """Bucket counts without prometheus-client's per-observation lock: the event loop is the only writer."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value_s: float, n: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value_s)] += n
        self.sum += value_s * n

    def family(self, name: str, doc: str, labels: list[str], values: list[str]) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, doc, labels=labels)
        cumulative, buckets = 0, []
        for bound, count in zip(self.bounds, self.counts[:-1], strict=True):
            cumulative += count
            buckets.append((repr(float(bound)), float(cumulative)))
        buckets.append(("+Inf", float(cumulative + self.counts[-1])))
        fam.add_metric(values, buckets, self.sum)
        return fam


class ServedRequest:
    """Server-side truth about one generation request; times are ``time.monotonic_ns()``.

    ``first_token_ns`` / ``last_token_ns`` are stamped just before the send, so a client that stamps on
    receipt (same CLOCK_MONOTONIC on Linux) never sees an earlier time. Non-streaming answers stamp
    ``first_token_ns`` when the first token falls due (nothing is sent until the last one).
    """

    __slots__ = (
        "admitted_ns",
        "endpoint",
        "expected_first_token_id",
        "fault",
        "finish_reason",
        "first_token_id",
        "first_token_ns",
        "last_token_ns",
        "max_tokens",
        "n_tokens",
        "prompt_len",
        "received_ns",
        "request_id",
        "status",
        "stream",
        "x_request_id",
    )

    def __init__(self, request_id: str, x_request_id: str, endpoint: str, received_ns: int) -> None:
        self.request_id = request_id
        self.x_request_id = x_request_id
        self.endpoint = endpoint
        self.received_ns = received_ns
        self.stream = False
        self.prompt_len = 0
        self.max_tokens = 0
        self.n_tokens = 0
        self.admitted_ns: int | None = None
        self.first_token_ns: int | None = None
        self.last_token_ns: int | None = None
        # received → running → ok | truncated | disconnected; or error (400/500) | hung
        self.status = "received"
        self.finish_reason: str | None = None
        self.fault: str | None = None
        self.first_token_id: int | None = None
        self.expected_first_token_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def add_fault(self, name: str) -> None:
        self.fault = name if self.fault is None else f"{self.fault},{name}"


def _error(status: int, message: str, err_type: str, param: str | None = None) -> web.Response:
    # vLLM's ErrorResponse shape: {"error": {"message", "type", "param", "code"}}.
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return web.json_response(body, status=status)


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _text_ids(text: str, vocab_size: int) -> list[int]:
    # A cheap stand-in tokenizer: one id per whitespace-separated word, stable across runs.
    return [3 + zlib.crc32(word.encode()) % (vocab_size - 3) for word in text.split()]


class Simulator:
    """State shared by the handlers: settings, the batch and its queue, metric state and the records."""

    def __init__(self, settings: SimSettings, served_model_name: str) -> None:
        self.settings = settings
        self.served_model_name = served_model_name
        self.model_json = json.dumps(served_model_name)
        self.version = f"sim-{package_version()}"
        self.responses = load_responses(settings.responses_file) if settings.responses_file else None
        self.rng = random.Random(settings.seed)
        self.jitter_rng = random.Random(settings.seed + 1)  # its own stream: faults stay where they were
        self.records: deque[ServedRequest] = deque(maxlen=settings.records_max)
        self.generation_requests = 0
        self.clock = _TokenClock()
        # Batch: `running` counts held slots; a released slot passes straight to the oldest waiter.
        self.running = 0
        self.waiting: deque[asyncio.Future[None]] = deque()
        self.hung = 0
        self.active: set[ServedRequest] = set()
        # Metric state, read by _Collector at scrape time.
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.success_total = dict.fromkeys(FINISH_REASONS, 0)
        self.ttft = _Histogram(TTFT_BUCKETS_S)
        self.itl = _Histogram(ITL_BUCKETS_S)
        self.e2e = _Histogram(REQUEST_LATENCY_BUCKETS_S)
        self.queue_time = _Histogram(REQUEST_LATENCY_BUCKETS_S)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    # -- batch slots -------------------------------------------------------------------------------
    async def acquire_slot(self) -> None:
        if self.running < self.settings.max_batch and not self.waiting:
            self.running += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release_slot()  # the slot was handed over just before the cancel
            elif fut in self.waiting:
                self.waiting.remove(fut)
            raise

    def release_slot(self) -> None:
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.running -= 1

    # -- output ------------------------------------------------------------------------------------
    def _generate_ids(self, prompt_ids: list[int], n: int) -> list[int]:
        # shake_128 of the prompt ids: deterministic per prompt, ~10x cheaper than a Python-level PRNG loop.
        s = self.settings
        digest = hashlib.shake_128(array("q", prompt_ids).tobytes()).digest(4 * n)
        span, eos = s.vocab_size - 3, s.eos_token_id
        out = [3 + v % span for v in memoryview(digest).cast("I")]
        if eos in out:  # ids start at 3, so only a custom eos_token_id can collide
            out = [t if t != eos else (t + 1 if t + 1 < s.vocab_size else 3) for t in out]
        return out

    def answer(self, prompt_ids: list[int], max_tokens: int, ignore_eos: bool) -> tuple[list[int], str]:
        """The output ids and finish_reason for a prompt: the reference answer, else a deterministic one."""
        s = self.settings
        eos = s.eos_token_id
        ref = self.responses.get(tuple(prompt_ids)) if self.responses else None
        if ref is not None:
            toks = ref[:max_tokens]
            finish = "stop" if (toks and toks[-1] == eos) or len(ref) < max_tokens else "length"
        elif s.eos_after_tokens is not None and not ignore_eos and s.eos_after_tokens < max_tokens:
            toks = [*self._generate_ids(prompt_ids, s.eos_after_tokens), eos]
            finish = "stop"
        else:
            toks = self._generate_ids(prompt_ids, max_tokens)
            finish = "length"
        if s.double_eos and max_tokens > 0:
            base = toks[:-1] if toks and toks[-1] == eos else toks
            toks = [*base[: max(max_tokens - 2, 0)], eos, eos][:max_tokens]
            finish = "stop"
        return toks, finish

    def token_text(self, tok: int) -> str:
        # EOS is a special token: vLLM's detokenizer skips it, so its chunk carries empty text.
        return "" if tok == self.settings.eos_token_id else f" t{tok}"

    # -- bookkeeping -------------------------------------------------------------------------------
    def observe_finished(self, rec: ServedRequest) -> None:
        received = rec.received_ns
        if rec.admitted_ns is not None:
            self.queue_time.observe((rec.admitted_ns - received) * 1e-9)
        if rec.first_token_ns is not None:
            self.ttft.observe((rec.first_token_ns - received) * 1e-9)
        if rec.last_token_ns is not None and rec.status == "ok":
            self.e2e.observe((rec.last_token_ns - received) * 1e-9)
        reason = rec.finish_reason if rec.status == "ok" and rec.finish_reason else "abort"
        self.success_total[reason] = self.success_total.get(reason, 0) + 1


class _Collector:
    """Builds vLLM's metric families from the simulator's plain counters at scrape time."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def collect(self) -> Iterator[Metric]:
        sim = self.sim
        labels, values = ["model_name", "engine"], [sim.served_model_name, "0"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            fam = GaugeMetricFamily(name, doc, labels=labels)
            fam.add_metric(values, value)
            return fam

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            # prometheus-client appends _total on exposition: vllm:prompt_tokens → vllm:prompt_tokens_total
            fam = CounterMetricFamily(name, doc, labels=labels)
            fam.add_metric(values, value)
            return fam

        kv_tokens = sum(r.prompt_len + r.n_tokens for r in sim.active)
        kv_usage = min(1.0, kv_tokens / sim.settings.kv_cache_capacity_tokens)
        yield gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", len(sim.active)
        )
        yield gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            len(sim.waiting) + sim.hung,
        )
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv_usage)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", sim.prompt_tokens_total)
        yield counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", sim.generation_tokens_total
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*labels, "finished_reason"],
        )
        for reason, count in sim.success_total.items():
            success.add_metric([*values, reason], count)
        yield success
        for hist, name, doc in (
            (sim.ttft, "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds."),
            (sim.itl, "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds."),
            (sim.e2e, "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds."),
            (sim.queue_time, "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase."),
        ):
            yield hist.family(name, doc, labels, values)


# -- token streaming ---------------------------------------------------------------------------------


class _TokenClock:
    """One timer for every running stream: a heap of (due, seq, job) fired at the earliest due time.

    A timer, a task switch and two aiohttp coroutine frames per token become one heap push per token; at
    1,000 streams/s the clock wakes about once per ms and sends every token due by then.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _StreamJob]] = []
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = math.inf

    def schedule(self, job: _StreamJob, due: float) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, job))
        if due < self._timer_due:
            self._arm(due)

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due
        self._timer = asyncio.get_running_loop().call_later(max(0.0, due - time.monotonic()), self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_due = None, math.inf
        heap = self._heap
        limit = time.monotonic() + _EARLY_S
        while heap and heap[0][0] <= limit:
            job = heapq.heappop(heap)[2]
            try:
                following = job.step(limit)
            except Exception as exc:  # a bug in one stream must not stop the clock for all of them
                following = None
                if not job.done.done():
                    job.done.set_exception(exc)
            if following is not None:
                self._seq += 1
                heapq.heappush(heap, (following, self._seq, job))
        if heap:
            self._arm(heap[0][0])


class _StreamJob:
    """One streaming answer: renders vLLM-shaped SSE chunks and sends the tokens that are due.

    The clock writes tokens straight to the transport, chunk-framed as aiohttp's writer would; the
    request's own coroutine sends the last group, usage and [DONE] through ``write_eof``, so aiohttp's
    writer still ends the body.
    """

    __slots__ = (
        "chat",
        "chunked",
        "cut",
        "done",
        "finish",
        "first_due",
        "head",
        "include_usage",
        "itl_s",
        "k",
        "malformed",
        "n",
        "prev_ns",
        "prompt_ids_json",
        "prompt_len",
        "rec",
        "return_token_ids",
        "sent",
        "sim",
        "stall",
        "transport",
        "truncate",
    )

    def __init__(
        self,
        sim: Simulator,
        rec: ServedRequest,
        transport: asyncio.Transport | None,
        chunked: bool,
        tokens: list[int],
        finish: str,
        first_due: float,
        itl_s: float,
        *,
        chat: bool,
        include_usage: bool,
        return_token_ids: bool,
        prompt_ids: list[int],
        malformed: bool,
        truncate: bool,
        stall: bool = False,
    ) -> None:
        s = sim.settings
        self.sim, self.rec, self.transport, self.chunked = sim, rec, transport, chunked
        self.finish, self.first_due, self.itl_s = finish, first_due, itl_s
        self.chat, self.include_usage, self.return_token_ids = chat, include_usage, return_token_ids
        self.malformed, self.truncate, self.stall = malformed, truncate, stall
        self.n, self.k, self.prev_ns, self.prompt_len = len(tokens), 0, 0, len(prompt_ids)
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        obj = "chat.completion.chunk" if chat else "text_completion"
        self.head = (
            f'data: {{"id":{json.dumps(rec.request_id)},"object":"{obj}","created":{int(time.time())},'
            f'"model":{sim.model_json},"choices":[{{"index":0,'
        )
        self.prompt_ids_json = json.dumps(prompt_ids, separators=(",", ":")) if return_token_ids else "null"
        self.sent = list(tokens)
        if s.first_token_mismatch and tokens:
            wrong = tokens[0] + 1 if tokens[0] + 1 < s.vocab_size else 3
            self.sent[0] = wrong if wrong != s.eos_token_id else wrong + 1
            rec.add_fault("first_token_mismatch")
        if tokens:
            rec.first_token_id = self.sent[0]
        # Where the malformed line goes / the stream is cut: after at least one token, about half way.
        self.cut = max(1, self.n // 2)

    def render(self, k: int, j: int) -> str:
        """SSE events for tokens k..j-1 (and the chat role chunk before token 0)."""
        parts = []
        head, n, text, ids_on = self.head, self.n, self.sim.token_text, self.return_token_ids
        if self.chat and k == 0:
            # vLLM's first chat chunk carries the role; prompt_token_ids rides on it at the top level.
            role = head + '"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'
            parts.append(role + (f',"prompt_token_ids":{self.prompt_ids_json}}}\n\n' if ids_on else "}\n\n"))
        for i in range(k, j):
            tok = self.sent[i]
            fin = f'"{self.finish}"' if i == n - 1 else "null"
            ids = f"[{tok}]" if ids_on else "null"
            if self.chat:
                parts.append(
                    f'{head}"delta":{{"content":"{text(tok)}"}},"logprobs":null,'
                    f'"finish_reason":{fin},"token_ids":{ids}}}]}}\n\n'
                )
            else:
                pids = self.prompt_ids_json if i == 0 else "null"
                parts.append(
                    f'{head}"text":"{text(tok)}","logprobs":null,"finish_reason":{fin},'
                    f'"stop_reason":null,"prompt_token_ids":{pids},"token_ids":{ids}}}]}}\n\n'
                )
            if self.malformed and i == self.cut - 1:
                parts.append(_MALFORMED_SSE)
        return "".join(parts)

    def tail(self) -> str:
        """What follows the last token: the usage chunk when asked for, then [DONE]."""
        if not self.include_usage:
            return _SSE_DONE
        return _usage_chunk(self.sim, self.rec.request_id, self.chat, self.prompt_len, self.n) + _SSE_DONE

    def account(self, k: int, j: int, stamp_ns: int) -> None:
        """Book tokens k..j-1 as handed to the socket at ``stamp_ns`` (taken before the send)."""
        rec, sim = self.rec, self.sim
        if k == 0:
            rec.first_token_ns = stamp_ns
        else:
            sim.itl.observe((stamp_ns - self.prev_ns) * 1e-9)
        if j - k > 1:
            sim.itl.observe(0.0, j - k - 1)  # tokens that left in the same write
        self.prev_ns = rec.last_token_ns = stamp_ns
        rec.n_tokens = self.k = j
        sim.generation_tokens_total += j - k

    def step(self, limit: float) -> float | None:
        """Send the tokens due by ``limit``; return when the next is due, or None when the clock is done."""
        if self.done.done():  # the request was cancelled
            return None
        k, n = self.k, self.n
        transport = self.transport
        if self.stall and k >= self.cut:
            # Stalled: nothing more is sent; look again later for the client giving up.
            if transport is None or transport.is_closing():
                self.done.set_exception(ConnectionResetError("client disconnected from a stalled stream"))
                return None
            self.rec.status = "stalled"
            return limit + 0.25
        j = n if self.itl_s <= 0 else min(n, max(k + 1, int((limit - self.first_due) / self.itl_s) + 1))
        if (self.truncate or self.stall) and j >= self.cut:
            j = self.cut
        elif j == n:
            self.done.set_result("final")  # the request's coroutine sends the rest with write_eof
            return None
        if transport is None or transport.is_closing():
            self.done.set_exception(ConnectionResetError("client disconnected"))
            return None
        data = self.render(k, j).encode()
        stamp_ns = time.monotonic_ns()
        transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        self.account(k, j, stamp_ns)
        if self.truncate and j == self.cut:
            self.rec.status = "truncated"
            transport.close()  # no terminating chunk, no [DONE]: as when an engine dies mid-answer
            self.done.set_result("truncated")
            return None
        return self.first_due + j * self.itl_s


def _usage_chunk(sim: Simulator, request_id: str, chat: bool, prompt: int, completion: int) -> str:
    # vLLM serialises this chunk with exclude_none, so system_fingerprint follows usage.
    obj = "chat.completion.chunk" if chat else "text_completion"
    return (
        f'data: {{"id":{json.dumps(request_id)},"object":"{obj}","created":{int(time.time())},'
        f'"model":{sim.model_json},'
        f'"choices":[],"usage":{{"prompt_tokens":{prompt},"total_tokens":{prompt + completion},'
        f'"completion_tokens":{completion}}},"system_fingerprint":"{sim.version}"}}\n\n'
    )


async def _stream(
    sim: Simulator, resp: web.StreamResponse, job: _StreamJob, done_without_end: bool = False
) -> None:
    if job.n:
        sim.clock.schedule(job, job.first_due)
        try:
            outcome = await job.done
        except asyncio.CancelledError:
            if not job.done.done():
                job.done.cancel()  # the clock drops the job
            raise
        if outcome == "truncated":
            return
    data = (job.render(job.k, job.n) + job.tail()).encode()
    stamp_ns = time.monotonic_ns()
    if done_without_end:
        await resp.write(data)  # everything up to [DONE], but the body never ends
        if job.n:
            job.account(job.k, job.n, stamp_ns)
        job.rec.status = "ok"
        return
    await resp.write_eof(data)  # last tokens, usage, [DONE] and the terminating chunk in one send
    if job.n:
        job.account(job.k, job.n, stamp_ns)
    job.rec.status = "ok"


async def _respond(
    sim: Simulator,
    request: web.Request,
    rec: ServedRequest,
    tokens: list[int],
    finish: str,
    first_due: float,
    itl_s: float,
    headers: dict[str, str],
    *,
    chat: bool,
    return_token_ids: bool,
    prompt_ids: list[int],
    malformed: bool,
    truncate: bool,
) -> web.StreamResponse:
    """A non-streaming answer: sent whole once its last token is due."""
    n = len(tokens)
    for due in (first_due, first_due + max(n - 1, 0) * itl_s):
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if rec.first_token_ns is None and n:
            rec.first_token_ns = time.monotonic_ns()
    if request.transport is None or request.transport.is_closing():
        raise ConnectionResetError("client disconnected before the answer was ready")
    text = "".join(sim.token_text(t) for t in tokens)
    usage = {"prompt_tokens": len(prompt_ids), "total_tokens": len(prompt_ids) + n, "completion_tokens": n}
    ids = tokens if return_token_ids else None
    pids = prompt_ids if return_token_ids else None
    created = int(time.time())
    body: dict[str, Any]
    if chat:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "tool_calls": [],
            "reasoning": None,
        }
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
            "token_ids": ids,
        }
        body = {
            "id": rec.request_id,
            "object": "chat.completion",
            "created": created,
            "model": sim.served_model_name,
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": sim.version,
            "usage": usage,
            "prompt_logprobs": None,
            "prompt_token_ids": pids,
            "kv_transfer_params": None,
        }
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
            "token_ids": ids,
            "prompt_logprobs": None,
            "prompt_token_ids": pids,
        }
        body = {
            "id": rec.request_id,
            "object": "text_completion",
            "created": created,
            "model": sim.served_model_name,
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": sim.version,
            "usage": usage,
            "kv_transfer_params": None,
        }
    data = json.dumps(body).encode()
    if malformed:
        data = b'{"id": ' + json.dumps(rec.request_id).encode() + b", malformed-json-from-sim"
    rec.n_tokens = n
    sim.generation_tokens_total += n
    if n:
        rec.first_token_id = tokens[0]
        sim.itl.observe(itl_s, n - 1)
    rec.last_token_ns = time.monotonic_ns()  # before the send, as for streams
    if truncate:
        cut = web.StreamResponse(headers={**headers, "Content-Type": "application/json"})
        cut.content_length = len(data)
        await cut.prepare(request)
        await cut.write(data[: len(data) // 2])
        rec.status = "truncated"
        if request.transport is not None:
            request.transport.close()
        return cut
    rec.status = "ok"
    return web.Response(body=data, headers={**headers, "Content-Type": "application/json"})


# -- request parsing ---------------------------------------------------------------------------------


def _int_field(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _BadRequest(f"{name} must be a non-negative integer, got {value!r}", name)
    return value


def _completion_prompt(body: dict[str, Any], vocab_size: int) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (list, str)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return _text_ids(prompt, vocab_size)
    if isinstance(prompt, list) and prompt:
        try:
            array("q", prompt)  # C-speed check that every id is an int64
        except (TypeError, OverflowError):
            pass
        else:
            return prompt
    raise _BadRequest(
        "prompt must be a non-empty string or list of token ids (batches unsupported)", "prompt"
    )


def _chat_prompt(body: dict[str, Any], vocab_size: int) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("messages must be a non-empty list", "messages")
    parts = []
    for msg in messages:
        if not isinstance(msg, dict):
            raise _BadRequest("each message must be an object with role and content", "messages")
        content = msg.get("content")
        if isinstance(content, list):  # OpenAI content parts
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        parts.append(f"<|{msg.get('role', 'user')}|> {content or ''}")
    return _text_ids(" ".join(parts), vocab_size)


# -- handlers ----------------------------------------------------------------------------------------

SIM_KEY = web.AppKey("sim", Simulator)
GPU_ENV_KEYS = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")


def _require_authorization(expected: str) -> Any:
    """Every path answers 401 (vLLM's shape) unless the request carries exactly this Authorization."""

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != expected:
            return _error(401, "Unauthorized", "AuthenticationError")
        response: web.StreamResponse = await handler(request)
        return response

    return check


def build_app(settings: SimSettings, served_model_name: str) -> web.Application:
    """The aiohttp application; ``app[SIM_KEY]`` is the :class:`Simulator` behind it.

    :raises SimSettingsError: the responses_file content is malformed.
    """
    sim = Simulator(settings, served_model_name)
    middlewares = (
        [_require_authorization(settings.require_authorization)] if settings.require_authorization else []
    )
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=middlewares)
    app[SIM_KEY] = sim
    created = int(time.time())

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(_: web.Request) -> web.Response:
        return web.json_response({"version": sim.version})

    async def models(_: web.Request) -> web.Response:
        card = {
            "id": served_model_name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": served_model_name,
            "parent": None,
            "max_model_len": settings.max_model_len,
            "permission": [],
        }
        return web.json_response({"object": "list", "data": [card]})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(sim.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def sim_requests(_: web.Request) -> web.Response:
        return web.json_response([r.as_dict() for r in sim.records])

    async def sim_env(_: web.Request) -> web.Response:
        # Which GPUs a real engine in its place would use: tests check the suite's assignment here.
        return web.json_response({k: os.environ.get(k) for k in GPU_ENV_KEYS} | {"pid": os.getpid()})

    async def sim_reset(_: web.Request) -> web.Response:
        sim.records.clear()
        return web.json_response({"cleared": True})

    async def completions(request: web.Request) -> web.StreamResponse:
        return await _generate(sim, request, chat=False)

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await _generate(sim, request, chat=True)

    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/sim/requests", sim_requests)
    app.router.add_get("/sim/env", sim_env)
    app.router.add_post("/sim/reset", sim_reset)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


async def _generate(sim: Simulator, request: web.Request, *, chat: bool) -> web.StreamResponse:
    received_ns = time.monotonic_ns()
    s = sim.settings
    sim.generation_requests += 1
    if s.crash_after_requests is not None and sim.generation_requests > s.crash_after_requests:
        sys.stderr.write(
            f"harness_fixtures.sim: crash_after_requests={s.crash_after_requests} reached at request "
            f"{sim.generation_requests}; exiting 1 (simulated engine crash)\n"
        )
        sys.stderr.flush()
        os._exit(1)

    try:
        body = json.loads(await request.read())
        if not isinstance(body, dict):
            raise ValueError("not an object")
    except ValueError:
        return _error(400, "request body must be a JSON object", "BadRequestError")
    model = body.get("model")
    if model is not None and model != sim.served_model_name:
        return _error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")

    # vLLM 0.32 ids are "cmpl-" + 16 hex digits; a caller's X-Request-Id (or request_id) replaces the hex.
    x_request_id = request.headers.get("X-Request-Id") or str(body.get("request_id") or os.urandom(8).hex())
    rec = ServedRequest(
        ("chatcmpl-" if chat else "cmpl-") + x_request_id, x_request_id, request.path, received_ns
    )
    sim.records.append(rec)
    try:
        if chat:
            prompt_ids = _chat_prompt(body, s.vocab_size)
            max_tokens = _int_field(body, "max_completion_tokens")
            if max_tokens is None:
                max_tokens = _int_field(body, "max_tokens")
            if max_tokens is None:
                max_tokens = max(s.max_model_len - len(prompt_ids), 0)
        else:
            prompt_ids = _completion_prompt(body, s.vocab_size)
            max_tokens = _int_field(body, "max_tokens")
            if max_tokens is None:
                max_tokens = s.default_max_tokens
        prompt_len = len(prompt_ids)
        if prompt_len + max_tokens > s.max_model_len:
            raise _BadRequest(
                f"This model's maximum context length is {s.max_model_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.",
                "max_tokens",
            )
        stream = bool(body.get("stream"))
        if stream and s.ignore_stream_rate and sim.rng.random() < s.ignore_stream_rate:
            stream = False  # a server (or gateway) that ignores "stream": one JSON body
            rec.add_fault("ignore_stream")
        stream_options = body.get("stream_options")
        include_usage = (
            # vLLM's StreamOptions.include_usage defaults to true once stream_options is given
            stream and isinstance(stream_options, dict) and bool(stream_options.get("include_usage", True))
        )
        return_token_ids = bool(body.get("return_token_ids"))
        tokens, finish = sim.answer(prompt_ids, max_tokens, bool(body.get("ignore_eos")))
    except _BadRequest as exc:
        rec.status = "error"
        return _error(400, str(exc), "BadRequestError", exc.param)
    rec.stream, rec.prompt_len, rec.max_tokens, rec.finish_reason = stream, prompt_len, max_tokens, finish
    if tokens:
        rec.expected_first_token_id = tokens[0]

    if s.hang_after_requests is not None and sim.generation_requests > s.hang_after_requests:
        rec.status, rec.fault = "hung", "hang"
        sim.hung += 1
        try:
            await asyncio.get_running_loop().create_future()  # never resolved: the engine is stuck
        finally:
            sim.hung -= 1
    if s.http_500_rate and sim.rng.random() < s.http_500_rate:
        rec.status, rec.fault = "error", "http_500"
        sim.success_total["abort"] += 1
        return _error(500, "simulated internal server error", "InternalServerError")
    malformed = bool(s.malformed_sse_rate) and sim.rng.random() < s.malformed_sse_rate
    truncate = bool(s.truncate_stream_rate) and sim.rng.random() < s.truncate_stream_rate
    stall = stream and bool(s.stall_stream_rate) and sim.rng.random() < s.stall_stream_rate
    done_without_end = stream and bool(s.done_without_end_rate) and sim.rng.random() < s.done_without_end_rate
    for name, on in (
        ("malformed_sse", malformed),
        ("truncate_stream", truncate),
        ("stall_stream", stall),
        ("done_without_end", done_without_end),
        ("double_eos", s.double_eos),
    ):
        if on:
            rec.add_fault(name)

    headers = {"X-Request-Id": x_request_id}
    resp: web.StreamResponse | None = None
    if stream:
        # Like vLLM's StreamingResponse, the headers leave before the request is scheduled.
        headers["Content-Type"] = "text/event-stream; charset=utf-8"
        headers["Cache-Control"] = "no-cache"
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)

    admitted = False
    try:
        await sim.acquire_slot()
        admitted = True
        admitted_mono = time.monotonic()
        rec.admitted_ns = time.monotonic_ns()
        rec.status = "running"
        sim.active.add(rec)
        sim.prompt_tokens_total += prompt_len
        factor = sim.jitter_rng.lognormvariate(0.0, s.latency_jitter) if s.latency_jitter else 1.0
        ttft_ms = s.ttft_base_ms + s.ttft_per_prompt_token_ms * prompt_len
        first_due = admitted_mono + ttft_ms * factor / 1000.0
        # A fuller batch decodes slower: the requests running beside this one set its pace.
        itl_s = (s.itl_ms + s.itl_per_running_ms * (sim.running - 1)) * factor / 1000.0
        if resp is None:
            return await _respond(
                sim,
                request,
                rec,
                tokens,
                finish,
                first_due,
                itl_s,
                headers,
                chat=chat,
                return_token_ids=return_token_ids,
                prompt_ids=prompt_ids,
                malformed=malformed,
                truncate=truncate,
            )
        job = _StreamJob(
            sim,
            rec,
            request.transport,
            resp.headers.get("Transfer-Encoding", "").lower() == "chunked",
            tokens,
            finish,
            first_due,
            itl_s,
            chat=chat,
            include_usage=include_usage,
            return_token_ids=return_token_ids,
            prompt_ids=prompt_ids,
            malformed=malformed,
            truncate=truncate,
            stall=stall,
        )
        await _stream(sim, resp, job, done_without_end)
        if not done_without_end:
            return resp
    except ConnectionResetError:
        # The client went away mid-answer (vLLM aborts the request): not a server error, no traceback.
        rec.status = "disconnected"
        return resp if resp is not None else web.Response(status=499)
    finally:
        if admitted:
            sim.active.discard(rec)
            sim.release_slot()
        if rec.status in ("running", "received"):
            rec.status = "disconnected"  # cancelled (shutdown) or gone
        sim.observe_finished(rec)
    # done_without_end: the engine is done (its slot is free), but the HTTP body is left open, as a
    # faulty gateway might; once the client closes, what aiohttp would still write has nowhere to go.
    while request.transport is not None and not request.transport.is_closing():
        await asyncio.sleep(0.25)
    raise asyncio.CancelledError
