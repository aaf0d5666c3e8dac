"""The engine's own counters and histograms over LoadGen's measured window.

The runner reads the engine's /metrics right before LoadGen starts (after the warm-up request and the
connection prewarm) and right after it returns; the difference is what the engine did for exactly the
queries LoadGen measured. The periodic collector scrapes once a second and cannot separate the
warm-up from the run that way. Gauges over the window (queue, KV cache) come from the timeline.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..client.errors import HttpError
from ..client.httpconfig import HttpConfig, HttpConfigError, ServerUrl
from ..results import EngineWindow, HistogramWindow
from .prometheus import ScrapeState
from .timeline import Sample

# Canonical histograms reported over the window (names of harness_fixtures.metrics.prometheus).
WINDOW_HISTOGRAMS = ("ttft_s", "itl_s", "tpot_s", "e2e_s", "queue_s", "prefill_s", "decode_s")


def fetch_metrics_text(
    http: HttpConfig, url: ServerUrl, paths: Sequence[str], timeout_s: float = 5.0
) -> str | None:
    """The engine's Prometheus text from the first of ``paths`` that serves it (the session's headers,
    proxy and TLS), or None when none can be read (never raises: a window without engine numbers is
    still a valid run)."""
    for path in paths:
        try:
            reply = http.get(url, path, timeout_s)
        except (HttpError, HttpConfigError):
            return None
        if reply.status == 200 and not reply.text.lstrip().startswith(("[", "{")):
            return reply.text
    return None


def engine_window(before: str, after: str) -> EngineWindow:
    """Counter and histogram deltas between two /metrics texts."""
    state = ScrapeState()
    state.update(before, 0.0)  # the baseline
    state.update(after, 1.0)
    hists = {}
    for name in WINDOW_HISTOGRAMS:
        h = state.histogram_summary(name)
        if h:
            hists[name.removesuffix("_s")] = HistogramWindow(
                count=h["count"], mean=_us(h.get("mean")), p50=_us(h.get("p50")), p99=_us(h.get("p99"))
            )
    return EngineWindow(
        generation_tokens=state.delta("generation_tokens"),
        prompt_tokens=state.delta("prompt_tokens"),
        requests=state.delta("request_success"),
        preemptions=state.delta("preemptions"),
        histograms=hists,
    )


def _us(seconds: float | None) -> float | None:
    """Seconds to the microsecond: finer than any engine's histogram buckets resolve."""
    return None if seconds is None else round(seconds, 6)


def gauges_over(
    window: EngineWindow, samples: Sequence[Sample], start_s: float, end_s: float
) -> EngineWindow:
    """Add what the engine's gauges showed inside [start_s, end_s]: the share of samples with requests
    waiting in its queue and the KV-cache peak."""
    inside = [s for s in samples if s.source == "engine" and start_s <= s.t_s <= end_s]
    waiting = [s.value for s in inside if s.series == "waiting"]
    kv = [s.value for s in inside if s.series == "kv_cache_usage"]
    return window.model_copy(
        update={
            "waiting_share": round(sum(v > 0 for v in waiting) / len(waiting), 4) if waiting else None,
            "kv_cache_peak": round(max(kv), 4) if kv else None,
        }
    )
