"""requests.jsonl: one line per request, written by the runner as requests finish, read once by the
pipeline; and the client-side statistics computed from it.

Times are seconds since the test's t0 (the same clock as the telemetry timeline).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..results import ClientStats, Distribution, EndpointStats, LatencyLimits, RequestMetrics
from ..stats import describe, percentiles
from .streaming import RequestRecord

Request = dict[str, Any]


class RequestLogWriter:
    """Appends finished requests from the client thread; flushed about once a second, so an
    interrupted run keeps what it measured."""

    def __init__(self, path: Path, t0_ns: int) -> None:
        self._fh = path.open("w", buffering=1 << 16)
        self._t0 = t0_ns
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()

    def _s(self, ns: int) -> float | None:
        return round((ns - self._t0) / 1e9, 6) if ns else None

    def write(self, r: RequestRecord) -> None:
        line = {
            "query_id": r.query_id,
            "sample_index": r.sample_index,
            "issued_s": self._s(r.issued_ns),
            "sent_s": self._s(r.sent_ns),
            "first_token_s": self._s(r.first_token_ns),
            "done_s": self._s(r.done_ns),
            "n_tokens": r.n_tokens,
            "finish_reason": r.finish_reason,
            "status": r.status,
            "error": r.error,
            "server_request_id": r.server_request_id,
            "input_tokens": r.prompt_tokens,
            "endpoint": r.endpoint,
            # Gaps between token-carrying chunks as the client parsed them, in microseconds.
            "itl_us": [(b - a) // 1000 for a, b in itertools.pairwise(r.chunk_ns)]
            if r.status == "ok"
            else [],
        }
        with self._lock:
            self._fh.write(json.dumps(line) + "\n")
            now = time.monotonic()
            if now - self._last_flush > 1.0:
                self._fh.flush()
                self._last_flush = now

    def flush(self) -> None:
        with self._lock:
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            self._fh.close()


def read_requests(path: Path) -> list[Request]:
    """The rows of a requests.jsonl; a torn last line (a killed run) is skipped."""
    if not path.is_file():
        return []
    out = []
    with path.open() as fh:
        for line in fh:
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def ttft_ms(r: Request) -> float | None:
    """LoadGen issue → first token, as the client saw it (what LoadGen's TTFT measures, less its own
    scheduling delay); None for a failed request."""
    if r.get("status") != "ok" or r.get("first_token_s") is None or r.get("issued_s") is None:
        return None
    return (float(r["first_token_s"]) - float(r["issued_s"])) * 1e3


def tpot_ms(r: Request) -> float | None:
    """(done − first token) / (tokens − 1), LoadGen's TPOT formula; None below two tokens."""
    n = int(r.get("n_tokens") or 0)
    if r.get("status") != "ok" or n < 2 or r.get("first_token_s") is None or r.get("done_s") is None:
        return None
    return (float(r["done_s"]) - float(r["first_token_s"])) * 1e3 / (n - 1)


def client_stats(
    scenario: str,
    requests: list[Request],
    client: dict[str, Any],
    target_qps: float | None,
    scheduled_qps: float | None,
    completed_qps: float | None,
) -> ClientStats:
    """The client's own timings and load for result.yaml's ``client:``.

    Server: achieved = requests sent / (last send − LoadGen start), beside LoadGen's target and its
    scheduled rate (the Poisson schedule it drew). Other scenarios: LoadGen's completed rate.

    :param client: client.json of the run (workers, CPU, LoadGen start time).
    """
    ok = [r for r in requests if r.get("status") == "ok" and r.get("first_token_s") is not None]
    send_ttft = percentiles([(r["first_token_s"] - r["sent_s"]) * 1e3 for r in ok], (50.0, 99.0))
    lag = percentiles(
        [(r["sent_s"] - r["issued_s"]) * 1e3 for r in requests if r.get("sent_s") is not None], (50.0, 99.0)
    )
    achieved = completed_qps
    if scenario in ("Server", "Interactive"):
        sent = [r["sent_s"] for r in requests if r.get("sent_s") is not None]
        start = client.get("loadgen_start_s")
        achieved = None
        if sent and start is not None and max(sent) > start:
            achieved = len(sent) / (max(sent) - start)
    mean = sum((r["first_token_s"] - r["sent_s"]) * 1e3 for r in ok) / len(ok) if ok else None
    return ClientStats(
        ttft_ms_p50=_r(send_ttft.get(50.0)),
        ttft_ms_p99=_r(send_ttft.get(99.0)),
        ttft_ms_mean=_r(mean),
        dispatch_lag_ms_p50=_r(lag.get(50.0)),
        dispatch_lag_ms_p99=_r(lag.get(99.0)),
        requests=len(requests),
        target_qps=target_qps,
        scheduled_qps=scheduled_qps,
        achieved_qps=_r(achieved),
        workers=client.get("workers"),
        cpu_pct=client.get("cpu_pct_total", client.get("cpu_pct")),
        cpu_bound_fraction=client.get("cpu_bound_fraction"),
        cpu_samples=client.get("cpu_samples"),
        token_count=client.get("token_count"),
        max_connections=client.get("max_connections"),
        connections_note=client.get("connections_note"),
    )


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def distribution(values_ms: list[float]) -> Distribution:
    """n, mean, std, min, p50, p90, p99, max of ``values_ms`` (harness_fixtures.stats' percentiles)."""
    d = describe(values_ms)
    if not d:
        return Distribution()
    p90 = percentiles(values_ms, (90.0,))[90.0]
    return Distribution(
        n=int(d["n"]),
        mean=_r(d["mean"]),
        std=_r(d["std"]),
        min=_r(d["min"]),
        p50=_r(d["p50"]),
        p90=_r(p90),
        p99=_r(d["p99"]),
        max=_r(d["max"]),
    )


def e2el_ms(r: Request) -> float | None:
    """LoadGen issue → the answer's end, as the client saw it; None for a failed request."""
    if r.get("status") != "ok" or r.get("done_s") is None or r.get("issued_s") is None:
        return None
    return (float(r["done_s"]) - float(r["issued_s"])) * 1e3


def is_good(r: Request, limits: LatencyLimits | None) -> bool:
    """A successful request within every limit the run has (no limits: every successful request)."""
    if r.get("status") != "ok":
        return False
    if limits is None:
        return True
    ttft, tpot = ttft_ms(r), tpot_ms(r)
    if limits.ttft_ms is not None and (ttft is None or ttft > limits.ttft_ms):
        return False
    return not (limits.tpot_ms is not None and tpot is not None and tpot > limits.tpot_ms)


def request_metrics(
    requests: list[Request],
    limits: LatencyLimits | None,
    tokens_per_s: float | None,
    samples_per_s: float | None,
) -> RequestMetrics:
    """``requests:`` of result.yaml: per-request timings, token counts and goodput from requests.jsonl.

    Rates are LoadGen's (``tokens_per_s``, ``samples_per_s``) scaled by counts from the client, so they
    share LoadGen's denominator. Goodput is counted only when the run has latency limits (Server).

    :param limits: the TTFT/TPOT limits LoadGen checked the run against, or None.
    """
    ok = [r for r in requests if r.get("status") == "ok"]
    inputs = [int(r["input_tokens"]) for r in ok if isinstance(r.get("input_tokens"), int)]
    outputs = [int(r.get("n_tokens") or 0) for r in ok]
    itl = [us / 1e3 for r in ok for us in r.get("itl_us") or ()]
    out = RequestMetrics(
        ttft_ms=distribution([v for r in ok if (v := ttft_ms(r)) is not None]),
        tpot_ms=distribution([v for r in ok if (v := tpot_ms(r)) is not None]),
        itl_ms=distribution(itl),
        e2el_ms=distribution([v for r in ok if (v := e2el_ms(r)) is not None]),
        output_tokens_mean=_r(sum(outputs) / len(outputs)) if outputs else None,
    )
    total_in, total_out = int(np.sum(inputs)), int(np.sum(outputs))
    if ok and len(inputs) == len(ok):  # every prompt's length known, else the total would be a guess
        out.input_tokens_total = total_in
        out.input_tokens_mean = _r(total_in / len(inputs))
        if tokens_per_s is not None and total_out:
            out.total_token_throughput = _r(tokens_per_s * (total_in + total_out) / total_out)
    if limits is not None and (limits.ttft_ms is not None or limits.tpot_ms is not None) and ok:
        out.good_requests = len([r for r in ok if is_good(r, limits)])
        if samples_per_s is not None:
            out.request_goodput = _r(samples_per_s * out.good_requests / len(ok))
    return out


def endpoint_stats(
    requests: list[Request],
    urls: list[str],
    duration_s: float | None,
    summary: list[dict[str, Any]] | None = None,
) -> list[EndpointStats]:
    """``endpoints:`` of result.yaml: per endpoint, from the ``endpoint`` index of each request row —
    the one place these numbers are computed.

    :param urls: the endpoints' URLs without credentials, by index.
    :param duration_s: the LoadGen run's length (output tokens/s share LoadGen's denominator).
    :param summary: the runner's per-endpoint notes (``taken_out``, ``engine_window``) by index.
    """
    notes = {int(n.get("index", -1)): n for n in summary or []}
    total = len(requests)
    out = []
    for i, url in enumerate(urls):
        mine = [r for r in requests if int(r.get("endpoint") or 0) == i]
        ok = [r for r in mine if r.get("status") == "ok"]
        failed = [r for r in mine if r.get("status") != "ok"]
        ttft = percentiles([v for r in ok if (v := ttft_ms(r)) is not None], (50.0, 99.0))
        tpot = percentiles([v for r in ok if (v := tpot_ms(r)) is not None], (50.0, 99.0))
        tokens = sum(int(r.get("n_tokens") or 0) for r in ok)
        note = notes.get(i, {})
        out.append(
            EndpointStats(
                index=i,
                url=url,
                queries=len(mine),
                share=_r(len(mine) / total) if total else None,
                completed=len(ok),
                failures=len(failed),
                first_error=next((r.get("error") for r in failed), None),
                ttft_ms_p50=_r(ttft.get(50.0)),
                ttft_ms_p99=_r(ttft.get(99.0)),
                tpot_ms_p50=_r(tpot.get(50.0)),
                tpot_ms_p99=_r(tpot.get(99.0)),
                output_tokens=tokens,
                output_tokens_per_s=_r(tokens / duration_s) if duration_s else None,
                taken_out=note.get("taken_out"),
                engine_window=note.get("engine_window"),
            )
        )
    return out
