"""Engine metrics scraped from a Prometheus endpoint (vLLM, SGLang, TensorRT-LLM), in one vocabulary.

Gauges become series as they are; counters become per-second rates between scrapes (`<name>_per_s`)
with run totals kept for `delta()`; histograms become per-interval quantile estimates
(`<name>_p50`, `<name>_p99`, `<name>_mean`) from bucket deltas, with run totals in `summary()`.
Values of one family are summed over its label sets (model_name, engine, finished_reason ...), except
`kv_cache_usage`, a fraction in [0, 1], which is averaged.

A quantile whose rank falls in a histogram's lowest bucket is not a number: interpolating between 0
and that bucket's bound says nothing about where the observations lie (at GPU speed most inter-token
latencies sit below vLLM's lowest 10 ms bound, most TTFTs below SGLang's 100 ms). It is reported as
:class:`BelowLowestBucket`, which surfaces as the series or key `<name>_p50_below` holding the bound
(and no `<name>_p50`), so every consumer stays numeric and none can mistake the bound for an
estimate. The client's own per-token timing is the measurement there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..client.http import HttpError
from ..client.httpconfig import HttpConfig, ServerUrl
from .base import BaseCollector

__all__ = [
    "BELOW_SUFFIX",
    "DEFAULT_NAMES",
    "BelowLowestBucket",
    "PrometheusCollector",
    "ScrapeState",
    "histogram_quantile",
    "metrics_url",
    "quantile_or_bound",
]

# Canonical name -> engine metric names, in priority order: the first one present in a scrape wins,
# because engines expose deprecated aliases of the same data side by side for a release or two
# (vLLM 0.10: gpu_cache_usage_perc next to kv_cache_usage_perc, time_per_output_token_seconds next
# to inter_token_latency_seconds); summing both would double-count. Counter names omit `_total`.
# Where each engine's names were read: docs/engines.md.
DEFAULT_NAMES: dict[str, tuple[str, ...]] = {
    # TensorRT-LLM's gauges need enable_iter_perf_stats (the trtllm launcher sets it).
    "running": ("vllm:num_requests_running", "sglang:num_running_reqs", "trtllm_num_requests_running"),
    "waiting": ("vllm:num_requests_waiting", "sglang:num_queue_reqs", "trtllm_num_requests_waiting"),
    # All three are fractions in [0, 1] (TensorRT-LLM's: used / max KV-cache blocks).
    "kv_cache_usage": (
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "sglang:token_usage",
        "trtllm_kv_cache_utilization",
    ),
    "prompt_tokens": ("vllm:prompt_tokens", "sglang:prompt_tokens", "trtllm_prompt_tokens"),
    "generation_tokens": ("vllm:generation_tokens", "sglang:generation_tokens", "trtllm_generation_tokens"),
    # SGLang counts requests processed (its aborts are counted separately as well).
    "request_success": ("vllm:request_success", "sglang:num_requests", "trtllm_request_success"),
    # SGLang calls a preemption a retraction; TensorRT-LLM exports no preemption counter.
    "preemptions": ("vllm:num_preemptions", "sglang:num_retracted_requests"),
    # All in tokens. SGLang and TensorRT-LLM have no query counter: their prompt tokens are the
    # queried tokens.
    "prefix_cache_hits": (
        "vllm:prefix_cache_hits",
        "vllm:gpu_prefix_cache_hits",
        "sglang:cached_tokens",
        "trtllm_prompt_cached_tokens",
    ),
    "prefix_cache_queries": (
        "vllm:prefix_cache_queries",
        "vllm:gpu_prefix_cache_queries",
        "sglang:prompt_tokens",
        "trtllm_prompt_tokens",
    ),
    "ttft_s": (
        "vllm:time_to_first_token_seconds",
        "sglang:time_to_first_token_seconds",
        "trtllm_time_to_first_token_seconds",
    ),
    # TensorRT-LLM has no per-token histogram: its time_per_output_token is per request (tpot_s).
    "itl_s": (
        "vllm:inter_token_latency_seconds",
        "vllm:time_per_output_token_seconds",
        "sglang:inter_token_latency_seconds",
    ),
    "tpot_s": ("vllm:request_time_per_output_token_seconds", "trtllm_time_per_output_token_seconds"),
    "e2e_s": (
        "vllm:e2e_request_latency_seconds",
        "sglang:e2e_request_latency_seconds",
        "trtllm_e2e_request_latency_seconds",
    ),
    "queue_s": (
        "vllm:request_queue_time_seconds",
        "sglang:queue_time_seconds",
        "trtllm_request_queue_time_seconds",
    ),
    "prefill_s": ("vllm:request_prefill_time_seconds", "trtllm_request_prefill_time_seconds"),
    "decode_s": ("vllm:request_decode_time_seconds", "trtllm_request_decode_time_seconds"),
}

_MEAN_GAUGES = frozenset({"kv_cache_usage"})


def metrics_url(url: str, path: str = "/metrics") -> str:
    """`{base}{path}` for a server base URL (its path prefix and query kept, an OpenAI-style `/v1`
    dropped, as for every request: client.httpconfig.ServerUrl); a /metrics URL is kept as it is."""
    u = url.rstrip("/")
    if urlsplit(u).path.endswith("/metrics"):
        return u
    return ServerUrl.parse(u).url("/" + path.lstrip("/"))


def _strip_total(name: str) -> str:
    return name[: -len("_total")] if name.endswith("_total") else name


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Estimate quantile `q` in [0, 1] from cumulative buckets [(le, count)], sorted by le.

    Linear interpolation inside the bucket holding the rank, like PromQL's `histogram_quantile`:
    the first bucket's lower bound is 0 (if its le is positive); a rank in the +Inf bucket returns
    the largest finite bound. None when the buckets hold no observations.
    """
    if not buckets:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for i, (le, count) in enumerate(buckets):
        if count >= rank and count > prev_count:
            if math.isinf(le):
                return prev_le if i > 0 else None
            if i == 0 and le <= 0:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


BELOW_SUFFIX = "_below"


@dataclass(frozen=True)
class BelowLowestBucket:
    """A quantile known only to lie at or below `bound`, the histogram's lowest finite bucket bound."""

    bound: float


def quantile_or_bound(q: float, buckets: Sequence[tuple[float, float]]) -> float | BelowLowestBucket | None:
    """Like `histogram_quantile`, but a rank inside the lowest bucket (below its positive bound)
    yields `BelowLowestBucket(bound)` instead of an interpolated number. None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    first_le, first_count = buckets[0]
    if first_le > 0 and not math.isinf(first_le) and first_count > 0 and first_count >= q * buckets[-1][1]:
        return BelowLowestBucket(first_le)
    return histogram_quantile(q, buckets)


def _quantile_pairs(key: str, value: float | BelowLowestBucket | None) -> list[tuple[str, float]]:
    """`(key, value)`, or `(key + "_below", bound)` for a quantile below the lowest bucket."""
    if value is None:
        return []
    if isinstance(value, BelowLowestBucket):
        return [(key + BELOW_SUFFIX, value.bound)]
    return [(key, value)]


@dataclass
class _Hist:
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    count: float = 0.0
    sum: float = 0.0

    def sorted_buckets(self) -> list[tuple[float, float]]:
        return sorted(self.buckets.items())


@dataclass
class _CounterTotals:
    first: float
    last: float
    delta: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0


class ScrapeState:
    """Turns successive /metrics texts into canonical series; pure (no I/O), so it is unit-testable.

    :param names: canonical name -> engine names in priority order (default `DEFAULT_NAMES`).
    """

    def __init__(self, names: Mapping[str, Sequence[str]] | None = None) -> None:
        self.names = {k: tuple(_strip_total(n) for n in v) for k, v in (names or DEFAULT_NAMES).items()}
        self.n_scrapes = 0
        self._prev_t: float | None = None
        self._prev_counters: dict[str, float] = {}
        self._prev_hists: dict[str, _Hist] = {}
        self.counters: dict[str, _CounterTotals] = {}
        self.hist_totals: dict[str, _Hist] = {}
        self.gauges_last: dict[str, float] = {}
        self.kinds: dict[str, str] = {}

    def _parse(self, text: str) -> dict[str, tuple[str, list[Any]]]:
        from prometheus_client.parser import text_string_to_metric_families

        return {_strip_total(f.name): (f.type, f.samples) for f in text_string_to_metric_families(text)}

    def update(self, text: str, t_s: float) -> list[tuple[str, float]]:
        """Feed one scrape taken at `t_s`; return the (series, value) pairs it yields."""
        families = self._parse(text)
        out: list[tuple[str, float]] = []
        dt = None if self._prev_t is None else t_s - self._prev_t
        for canon, raw_names in self.names.items():
            raw = next((n for n in raw_names if n in families), None)
            if raw is None:
                continue
            ftype, samples = families[raw]
            if ftype == "counter":
                self.kinds[canon] = "counter"
                self._update_counter(canon, samples, t_s, dt, out)
            elif ftype == "histogram":
                self.kinds[canon] = "histogram"
                self._update_histogram(canon, samples, out)
            elif ftype in ("gauge", "unknown"):
                self.kinds[canon] = "gauge"
                values = [s.value for s in samples if not math.isnan(s.value)]
                if not values:
                    continue
                v = math.fsum(values)
                if canon in _MEAN_GAUGES:
                    v /= len(values)
                self.gauges_last[canon] = v
                out.append((canon, v))
        self._prev_t = t_s
        self.n_scrapes += 1
        return out

    def _update_counter(
        self, canon: str, samples: list[Any], t_s: float, dt: float | None, out: list[tuple[str, float]]
    ) -> None:
        value = math.fsum(s.value for s in samples if not s.name.endswith("_created"))
        prev = self._prev_counters.get(canon)
        self._prev_counters[canon] = value
        tot = self.counters.get(canon)
        if tot is None:
            self.counters[canon] = _CounterTotals(first=value, last=value, t_first=t_s, t_last=t_s)
            return
        # A drop means the server restarted: counting restarts from zero.
        inc = value - prev if prev is not None and value >= prev else value
        tot.delta += inc
        tot.last = value
        tot.t_last = t_s
        if dt is not None and dt > 0:
            out.append((f"{canon}_per_s", inc / dt))

    def _update_histogram(self, canon: str, samples: list[Any], out: list[tuple[str, float]]) -> None:
        cur = _Hist()
        for s in samples:
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                cur.buckets[le] = cur.buckets.get(le, 0.0) + s.value
            elif s.name.endswith("_count"):
                cur.count += s.value
            elif s.name.endswith("_sum"):
                cur.sum += s.value
        prev = self._prev_hists.get(canon)
        self._prev_hists[canon] = cur
        total = self.hist_totals.setdefault(canon, _Hist())
        if prev is None:
            # First sight: the baseline. Bounds are recorded so totals keep the engine's buckets.
            for le in cur.buckets:
                total.buckets.setdefault(le, 0.0)
            return
        reset = cur.count < prev.count
        d = _Hist(
            buckets={le: c - (0.0 if reset else prev.buckets.get(le, 0.0)) for le, c in cur.buckets.items()},
            count=cur.count - (0.0 if reset else prev.count),
            sum=cur.sum - (0.0 if reset else prev.sum),
        )
        for le, c in d.buckets.items():
            total.buckets[le] = total.buckets.get(le, 0.0) + c
        total.count += d.count
        total.sum += d.sum
        if d.count > 0:
            b = d.sorted_buckets()
            for q, suffix in ((0.5, "p50"), (0.99, "p99")):
                out += _quantile_pairs(f"{canon}_{suffix}", quantile_or_bound(q, b))
            out.append((f"{canon}_mean", d.sum / d.count))

    def delta(self, name: str) -> float | None:
        """Increase of counter `name` over the scrapes seen (resets handled); None if never seen."""
        tot = self.counters.get(name)
        return None if tot is None else tot.delta

    def histogram_summary(self, name: str) -> dict[str, float]:
        """Run totals of histogram `name`: count, sum, mean and p50/p99/max estimated from buckets.

        A quantile below the lowest bucket is `p50_below` / `p99_below` (the bound) instead of
        `p50` / `p99`. `max` is the upper bound of the highest non-empty finite bucket (an estimate,
        not an observation). {} when no observation arrived between the first and last scrape.
        """
        h = self.hist_totals.get(name)
        if h is None or h.count <= 0:
            return {}
        b = h.sorted_buckets()
        out = {"count": h.count, "sum": h.sum, "mean": h.sum / h.count}
        for q, key in ((0.5, "p50"), (0.99, "p99")):
            out.update(_quantile_pairs(key, quantile_or_bound(q, b)))
        prev = 0.0
        top: float | None = None
        for le, c in b:
            if c > prev:
                top = le
            prev = c
        if top is not None:
            finite = [le for le, _ in b if not math.isinf(le)]
            out["max"] = top if not math.isinf(top) else (finite[-1] if finite else math.inf)
        return out


class PrometheusCollector(BaseCollector):
    """Scrapes an engine's Prometheus endpoint every `interval_s` seconds.

    Failures never raise: an HTTP error status marks the collector failed; connection errors before
    any successful scrape mark it unavailable (the endpoint never answered). With several `paths`,
    an answer that is not Prometheus text (an HTTP error, or JSON such as TensorRT-LLM's `/metrics`)
    moves on to the next path until one works; that one is kept.

    :param url: the server base URL (`http://host:port`, `/v1` tolerated) or the full metrics URL.
    :param interval_s: seconds between scrapes.
    :param headers: extra HTTP headers, e.g. an Authorization header.
    :param timeout_s: per-request timeout; keep it below the interval.
    :param names: canonical -> engine names; defaults to `DEFAULT_NAMES`. Use `extra_names` to add.
    :param extra_names: additional engine names per canonical name, tried before the defaults.
    :param name: source name in the timeline.
    :param paths: metrics paths on the server, in the order to try (`/metrics` by default).
    :param http: the session's HTTP configuration (proxies, TLS): the streaming client's; default: the
        environment's proxies and the system's CAs.
    """

    def __init__(
        self,
        url: str,
        interval_s: float = 1.0,
        headers: Mapping[str, str] | None = None,
        *,
        timeout_s: float = 2.0,
        names: Mapping[str, Sequence[str]] | None = None,
        extra_names: Mapping[str, Sequence[str]] | None = None,
        name: str = "engine",
        stop_timeout_s: float | None = None,
        paths: Sequence[str] = ("/metrics",),
        http: HttpConfig | None = None,
    ) -> None:
        super().__init__(
            name,
            interval_s=interval_s,
            stop_timeout_s=timeout_s + 1.0 if stop_timeout_s is None else stop_timeout_s,
        )
        if not paths:
            raise ValueError("paths must name at least one metrics path, e.g. ('/metrics',)")
        self.url = metrics_url(url, paths[0])
        self._fallbacks = [metrics_url(url, p) for p in paths[1:]]
        self.headers = dict(headers or {})
        self.timeout_s = timeout_s
        table = dict(names or DEFAULT_NAMES)
        for canon, extra in (extra_names or {}).items():
            table[canon] = tuple(extra) + tuple(table.get(canon, ()))
        self.state = ScrapeState(table)
        self.n_ok = 0
        self._only_connection_errors = True
        self._http = http
        self._own_http: HttpConfig | None = None

    def _setup(self) -> str | None:
        if self._http is None:
            self._http = self._own_http = HttpConfig.build()
        return None

    def _teardown(self) -> None:
        if self._own_http is not None:
            self._own_http.close()  # the connections of a configuration made here

    def _sample(self) -> Iterable[tuple[str, float]]:
        assert self._http is not None
        while True:
            t_before = self._now_s()
            try:
                resp = self._http.fetch(self.url, self.headers, self.timeout_s)
            except HttpError as exc:
                raise ConnectionError(f"cannot scrape {self.url}: {exc}") from exc
            t = (t_before + self._now_s()) / 2.0
            problem = None
            if resp.status != 200:
                problem = f"HTTP {resp.status} from {self.url}"
            elif resp.text.lstrip().startswith(("[", "{")):
                problem = f"{self.url} answers JSON, not Prometheus text"
            if problem is not None and self.n_ok == 0 and self._fallbacks:
                self.url = self._fallbacks.pop(0)  # this path is not the engine's; try the next
                continue
            if problem is not None:
                self._only_connection_errors = False
                raise RuntimeError(problem)
            try:
                pairs = self.state.update(resp.text, t)
            except Exception:
                self._only_connection_errors = False
                raise
            self.n_ok += 1
            return pairs

    @property
    def status(self) -> str:
        if self.n_ok == 0 and self.n_errors > 0 and self._only_connection_errors:
            return f"unavailable ({self._first_error})"
        return super().status

    def delta(self, name: str) -> float | None:
        """Increase of counter `name` (canonical, e.g. "generation_tokens") over the run."""
        return self.state.delta(name)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per-series stats, plus: counter rate series carry `delta`, `first`, `last` and the run's
        mean `rate_per_s`; each histogram's canonical name holds its run totals (count, sum, mean,
        p50, p99, max from the accumulated bucket deltas, more exact than averaging interval p99s)."""
        out = super().summary()
        # list(): the scrape thread may add names while a caller reads a live summary.
        for canon, tot in list(self.state.counters.items()):
            extra = {"delta": tot.delta, "first": tot.first, "last": tot.last}
            elapsed = tot.t_last - tot.t_first
            if elapsed > 0:
                extra["rate_per_s"] = tot.delta / elapsed
            out.setdefault(f"{canon}_per_s", {}).update(extra)
        for canon in list(self.state.hist_totals):
            hs = self.state.histogram_summary(canon)
            if hs:
                out[canon] = hs
        return out
