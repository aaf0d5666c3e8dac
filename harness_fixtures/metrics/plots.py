"""Figures as PNG: per test, client/engine/host/GPU runs against time since the test start and the
TTFT/TPOT CDFs; per session, a summary comparing its tests.

matplotlib is imported lazily and used through `Figure` + the Agg canvas only (no pyplot), so
plotting touches no global backend state and works in threads and headless CI. Each figure is
1200x800 px; a figure whose data is absent is skipped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..client.requestlog import Request, tpot_ms, ttft_ms
from ..results import CapacityResult, Percentiles
from ..stats import percentile
from .base import Sample
from .nvml import gpu_series
from .prometheus import BELOW_SUFFIX

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger("harness_fixtures.plots")

__all__ = [
    "DPI",
    "FIGSIZE_IN",
    "OK_STATUSES",
    "STATUS_COLORS",
    "LatencyMarks",
    "RunWindow",
    "build_figures",
    "write_capacity_plot",
    "write_plots",
    "write_session_summary",
]

FIGSIZE_IN = (12.0, 8.0)
DPI = 100
# Request log statuses counted as successful; None means the log did not record one.
OK_STATUSES = frozenset({None, "ok", "success", "completed"})

_TIME_LABEL = "time since test start (s)"
_LATENCY_SERIES = (
    ("ttft_s_p50", "TTFT p50"),
    ("ttft_s_p99", "TTFT p99"),
    ("itl_s_p50", "ITL p50"),
    ("itl_s_p99", "ITL p99"),
)
# A quantile below a histogram's lowest bucket is only a bound (harness_fixtures.metrics.prometheus):
# drawn as open down-triangles at the bound, never joined to the estimates.
_LATENCY_BOUNDS = tuple((f"{name}{BELOW_SUFFIX}", f"{label} < bound") for name, label in _LATENCY_SERIES)
_ENGINE_SERIES = frozenset(
    {
        "running",
        "waiting",
        "kv_cache_usage",
        "generation_tokens_per_s",
        "prompt_tokens_per_s",
        *(name for name, _ in _LATENCY_SERIES + _LATENCY_BOUNDS),
    }
)
_HOST_SERIES = frozenset({"cpu_pct", "cpu_max_core_pct", "client_cpu_pct", "mem_pct", "client_rss_mib"})


# -- data helpers ------------------------------------------------------------------------------
def _group(samples: Iterable[Sample]) -> dict[tuple[str, str], tuple[list[float], list[float]]]:
    out: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    for s in samples:
        ts, vs = out.setdefault((s.source, s.series), ([], []))
        ts.append(s.t_s)
        vs.append(s.value)
    return out


def _num(value: Any) -> float | None:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _is_ok(r: Request) -> bool:
    status = r.get("status")
    return (status.lower() if isinstance(status, str) else status) in OK_STATUSES


def _latencies_ms(r: Request) -> tuple[float | None, float | None]:
    """(TTFT, TPOT) of one request in ms as LoadGen defines them (harness_fixtures.client.requestlog)."""
    return ttft_ms(r), tpot_ms(r)


def _rolling(x: Sequence[float], y: Sequence[float]) -> tuple[Any, Any, Any, int]:
    """Trailing-window p50/p99 of y ordered by x; window = n/20 clamped to [5, 200] points."""
    import numpy as np

    order = np.argsort(np.asarray(x, dtype=float), kind="stable")
    xs = np.asarray(x, dtype=float)[order]
    ys = np.asarray(y, dtype=float)[order]
    n = len(xs)
    w = int(min(200, max(5, n // 20)))
    if n < w:
        return np.array([]), np.array([]), np.array([]), w
    windows = np.lib.stride_tricks.sliding_window_view(ys, w)
    # Bound the work on very long runs: evaluate every `stride`-th window.
    stride = max(1, math.ceil(len(windows) * w / 4_000_000))
    windows = windows[::stride]
    # harness_fixtures.stats' definition (LoadGen's: the value at index floor(n × q)), per window.
    ranked = np.sort(windows, axis=1)
    p50, p99 = ranked[:, min(w - 1, int(w * 0.5))], ranked[:, min(w - 1, int(w * 0.99))]
    return xs[w - 1 :: stride], p50, p99, w


def _new_figure(
    title: str, nrows: int, ncols: int = 1, sharex: bool = True, sharey: bool = False
) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharex=sharex, sharey=sharey, squeeze=False).ravel().tolist()
    fig.suptitle(title)
    return fig, axes


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"{what}: not reported", ha="center", va="center", transform=ax.transAxes, color="gray")


def _finish(ax: Axes, title: str, ylabel: str, xlabel: bool = False) -> None:
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(_TIME_LABEL)
    ax.grid(True, alpha=0.3)
    # Every plotted quantity is >= 0; a zero baseline keeps small jitter from looking like swings,
    # and constant series from getting an offset like "1e-11+1.6e1" on the axis.
    ax.set_ylim(bottom=0)
    ax.ticklabel_format(axis="y", useOffset=False)
    if ax.get_legend_handles_labels()[0]:
        _legend(ax)


def _legend(
    ax: Axes, handles: list[Any] | None = None, labels: list[str] | None = None, x: float = 1.01
) -> None:
    # Outside the axes, right: a legend never hides data. (Not loc="best": slow on large scatters,
    # and it warns, which a filterwarnings=error suite turns into a failure.)
    kw: dict[str, Any] = {"loc": "upper left", "bbox_to_anchor": (x, 1.0), "fontsize": "small"}
    if handles is not None and labels is not None:
        ax.legend(handles, labels, **kw)
    else:
        ax.legend(**kw)


# -- client ------------------------------------------------------------------------------------
def _client_figure(requests: Sequence[Request]) -> Figure | None:
    import numpy as np

    issued = [t for r in requests if (t := _num(r.get("issued_s"))) is not None]
    done_ok = [r for r in requests if _is_ok(r) and _num(r.get("done_s")) is not None]
    if not issued and not done_ok:
        return None
    ends = [_num(r.get("done_s")) for r in requests] + issued
    t_end = max(t for t in ends if t is not None)
    nbins = max(1, math.ceil(t_end))
    edges = np.arange(nbins + 1, dtype=float)

    fig, (ax_tp, ax_ttft, ax_tpot) = _new_figure("Client: throughput and per-request latency", 3)

    # Throughput per 1 s bin. Output tokens are spread over each request's streaming span (first
    # token at first_token_s, the rest evenly up to done_s) instead of piling up at completion.
    done_t = [t for r in done_ok if (t := _num(r["done_s"])) is not None]
    req_rate, _ = np.histogram(done_t, bins=edges)
    issue_rate, _ = np.histogram(issued, bins=edges)
    tok = np.zeros(nbins)
    for r in done_ok:
        n = _num(r.get("n_tokens")) or 0.0
        done = _num(r["done_s"])
        first = _num(r.get("first_token_s"))
        if n <= 0 or done is None:
            continue
        if first is None or n < 2 or done <= first:
            tok[min(int(done), nbins - 1)] += n
            continue
        tok[min(int(first), nbins - 1)] += 1.0
        rate = (n - 1.0) / (done - first)
        b0, b1 = int(first), min(int(done), nbins - 1)
        for b in range(b0, b1 + 1):
            overlap = min(done, b + 1.0) - max(first, float(b))
            if overlap > 0:
                tok[b] += rate * overlap
    centers = edges[:-1] + 0.5

    def bins(values: Any) -> Any:  # a step line covering each [k, k+1) bin exactly
        return np.append(values, values[-1])

    ax_tp.step(edges, bins(issue_rate), where="post", color="tab:gray", linestyle="--", label="issued req/s")
    ax_tp.step(edges, bins(req_rate), where="post", color="tab:blue", label="completed req/s")
    errors = [
        t
        for r in requests
        if not _is_ok(r) and (t := _num(r.get("done_s")) or _num(r.get("issued_s"))) is not None
    ]
    if errors:
        err_rate, _ = np.histogram(errors, bins=edges)
        ax_tp.step(edges, bins(err_rate), where="post", color="tab:red", label="failed req/s")
    ax_tok = ax_tp.twinx()
    ax_tok.plot(centers, tok, color="tab:orange", label="output tok/s")
    ax_tok.set_ylabel("output tokens/s")
    h1, l1 = ax_tp.get_legend_handles_labels()
    h2, l2 = ax_tok.get_legend_handles_labels()
    ax_tok.set_ylim(bottom=0)
    ax_tp.set_ylim(bottom=0)
    _legend(ax_tp, h1 + h2, l1 + l2, x=1.07)
    ax_tp.set_title("Throughput per 1 s bin")
    ax_tp.set_ylabel("requests/s")
    ax_tp.grid(True, alpha=0.3)

    # TTFT is measured from the issue time (what LoadGen sees): client-side queueing is included,
    # and the issue->send delay is drawn so it can be told apart from the server's share.
    ttft_x, ttft_y, delay_x, delay_y = [], [], [], []
    tpot_x, tpot_y = [], []
    for r in done_ok:
        iss, sent = _num(r.get("issued_s")), _num(r.get("sent_s"))
        if iss is None:
            continue
        ttft, tpot = _latencies_ms(r)
        if ttft is not None:
            ttft_x.append(iss)
            ttft_y.append(ttft)
        if tpot is not None:
            tpot_x.append(iss)
            tpot_y.append(tpot)
        if sent is not None:
            delay_x.append(iss)
            delay_y.append((sent - iss) * 1e3)
    for ax, xs, ys, name in ((ax_ttft, ttft_x, ttft_y, "TTFT"), (ax_tpot, tpot_x, tpot_y, "TPOT")):
        if not xs:
            _no_data(ax, name)
            continue
        ax.scatter(xs, ys, s=4, alpha=0.3, color="tab:blue", label=f"{name} per request", rasterized=True)
        rx, p50, p99, w = _rolling(xs, ys)
        if len(rx):
            ax.plot(rx, p50, color="tab:green", label=f"rolling p50 ({w} req)")
            ax.plot(rx, p99, color="tab:red", label=f"rolling p99 ({w} req)")
    if delay_x:
        rx, _, p99, w = _rolling(delay_x, delay_y)
        if len(rx):
            ax_ttft.plot(
                rx, p99, color="tab:purple", linestyle="--", label=f"issue->send delay p99 ({w} req)"
            )
    _finish(ax_ttft, "Time to first token vs issue time", "TTFT (ms)")
    _finish(ax_tpot, "Time per output token vs issue time", "TPOT (ms)", xlabel=True)
    return fig


# -- latency CDF -------------------------------------------------------------------------------
# Percentile ticks for the logit y axis: the tail gets as much room as the median.
_CDF_TICKS = (0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)


def _fmt_ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _pct_label(q: float) -> str:
    return f"p{q * 100:.4g}"


def _log_x(ax: Axes, lo: float, hi: float, max_125_decades: float) -> None:
    """Log x axis with plain-number ticks (1-10-100, or 1-2-5 steps) that fit the data's range."""
    from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, StrMethodFormatter

    ax.set_xscale("log")
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 0.0
    if decades < 0.7:
        # Under a decade, 1-9 steps crowd a narrow panel (900 and 1000 overlap): a few evenly spaced
        # round numbers read better.
        ax.xaxis.set_major_locator(MaxNLocator(nbins=3, steps=[1, 2, 2.5, 5, 10]))
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        return
    if decades <= max_125_decades:
        subs: tuple[float, ...] = (1.0, 2.0, 5.0)
    else:
        subs = (1.0,)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _marked(values: Sequence[float], marks: Percentiles | None) -> tuple[str, float, float]:
    """(whose, p50, p99) a CDF marks: LoadGen's percentiles (result.yaml's numbers) when the run has
    them, else the same definition over the client's requests (harness_fixtures.stats)."""
    if marks is not None and marks.p50 is not None and marks.p99 is not None:
        return "LoadGen", marks.p50, marks.p99
    p50, p99 = percentile(values, 50), percentile(values, 99)
    assert p50 is not None and p99 is not None
    return "client", p50, p99


def _cdf_text(requests: Sequence[Request], marks: LatencyMarks) -> str:
    """The marked percentiles of latency_cdf.png, also stored in the PNG (its Description text)."""
    parts = []
    for name, get, pct in (("TTFT", ttft_ms, marks.ttft_ms), ("TPOT", tpot_ms, marks.tpot_ms)):
        values = [v for r in requests if (v := get(r)) is not None]
        if values:
            who, p50, p99 = _marked(values, pct)
            parts.append(f"{name} {who} p50={p50} p99={p99} ms")
    return "; ".join(parts)


def _cdf_panel(
    ax: Axes,
    name: str,
    values: Sequence[float],
    limit_ms: float | None,
    target_pct: float | None,
    marks: Percentiles | None,
) -> None:
    import numpy as np

    if not values:
        _no_data(ax, name)
        ax.set_title(f"{name} CDF")
        return
    xs = np.sort(np.asarray(values, dtype=float))
    n = len(xs)
    # Hazen plotting positions: (i - 0.5) / n never reaches 0 or 1, which a logit axis cannot show.
    ys = (np.arange(n) + 0.5) / n
    ax.step(xs, ys, where="post", color="tab:blue", label=f"{name} per request, client-observed (n={n})")
    # The marked percentiles are LoadGen's (result.yaml's numbers); without them, the same definition
    # over the client's requests (harness_fixtures.stats).
    who, p50, p99 = _marked(values, marks)
    ax.plot([p50], [0.5], "o", color="tab:green", label=f"{who} p50 = {_fmt_ms(p50)} ms")
    ax.axvline(p99, color="tab:red", linestyle=":", linewidth=1)
    ax.plot([p99], [0.99], "o", color="tab:red", label=f"{who} p99 = {_fmt_ms(p99)} ms")
    if limit_ms is not None:
        over = float(np.mean(xs > limit_ms)) * 100
        ax.axvline(
            limit_ms,
            color="black",
            linestyle="--",
            label=f"LoadGen limit = {_fmt_ms(limit_ms)} ms\n({over:.2f} % of requests above)",
        )
        if target_pct is not None and 0 < target_pct < 1:
            ax.axhline(
                target_pct,
                color="tab:gray",
                linestyle="-.",
                linewidth=1,
                label=f"limit applies at {_pct_label(target_pct)}",
            )
    lo = min(xs[0], limit_ms or xs[0])
    hi = max(xs[-1], limit_ms or xs[-1])
    if lo > 0 and hi / lo > 4:  # e.g. a 500 ms limit against 50 ms TTFTs
        _log_x(ax, lo, hi, max_125_decades=3.0)
    ax.set_yscale("logit")
    y_lo, y_hi = 0.5 / n, 1 - 0.5 / n
    if n == 1:
        y_lo, y_hi = 0.25, 0.75
    ticks = [t for t in _CDF_TICKS if y_lo <= t <= y_hi] or [0.5]
    ax.set_ylim(min(y_lo, ticks[0]) * 0.8, 1 - (1 - max(y_hi, ticks[-1])) * 0.8)
    ax.set_yticks(ticks, [_pct_label(t) for t in ticks])
    ax.minorticks_off()
    ax.set_title(f"{name} CDF")
    ax.set_xlabel(f"{name} (ms{', log scale' if ax.get_xscale() == 'log' else ''})")
    ax.set_ylabel("percentile of requests")
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax)


def _cdf_figure(requests: Sequence[Request], marks: LatencyMarks) -> Figure | None:
    ttft: list[float] = []
    tpot: list[float] = []
    for r in requests:
        a, b = _latencies_ms(r)
        if a is not None:
            ttft.append(a)
        if b is not None:
            tpot.append(b)
    if not ttft and not tpot:
        return None
    limits = marks.limits_ms or {}
    fig, (ax_ttft, ax_tpot) = _new_figure(
        "Latency distribution of successful requests (client request log)", 2, sharex=False
    )
    _cdf_panel(ax_ttft, "TTFT", ttft, limits.get("ttft"), marks.target_percentile, marks.ttft_ms)
    _cdf_panel(ax_tpot, "TPOT", tpot, limits.get("tpot"), marks.target_percentile, marks.tpot_ms)
    return fig


# -- timeline figures --------------------------------------------------------------------------
def _plot_series(
    ax: Axes,
    grouped: Mapping[tuple[str, str], tuple[list[float], list[float]]],
    series: Sequence[tuple[str, str]],
    scale: float = 1.0,
    **style: Any,
) -> bool:
    """Draw each (series, label) from any source holding it; return whether anything was drawn."""
    drawn = False
    sources = {src for src, _ in grouped}
    for name, label in series:
        for (src, ser), (ts, vs) in sorted(grouped.items()):
            if ser != name:
                continue
            lab = label if len(sources) == 1 else f"{src}: {label}"
            ax.plot(ts, [v * scale for v in vs], label=lab, **style)
            drawn = True
    return drawn


def _engine_figure(grouped: Mapping[tuple[str, str], tuple[list[float], list[float]]]) -> Figure | None:
    eng = {k: v for k, v in grouped.items() if k[1] in _ENGINE_SERIES}
    if not eng:
        return None
    fig, axes = _new_figure("Engine (server /metrics)", 2, 2)
    panels = [
        (
            "Scheduler queue",
            "requests",
            [("running", "running"), ("waiting", "waiting")],
            1.0,
            "running/waiting",
        ),
        ("KV cache usage", "KV cache used (%)", [("kv_cache_usage", "KV cache")], 100.0, "KV cache usage"),
        (
            "Engine token throughput",
            "tokens/s",
            [("generation_tokens_per_s", "generation tok/s"), ("prompt_tokens_per_s", "prompt tok/s")],
            1.0,
            "token counters",
        ),
        (
            "Server-side latency (per scrape interval)",
            "latency (ms)",
            list(_LATENCY_SERIES),
            1e3,
            "latency histograms",
        ),
    ]
    for i, (ax, (title, ylabel, series, scale, what)) in enumerate(zip(axes, panels, strict=True)):
        drawn = _plot_series(ax, eng, series, scale=scale, marker=".", markersize=3)
        if series == list(_LATENCY_SERIES):
            bounds = _plot_series(
                ax, eng, _LATENCY_BOUNDS, scale=scale, linestyle="none", marker="v", fillstyle="none"
            )
            drawn = drawn or bounds
        if not drawn:
            _no_data(ax, what)
        _finish(ax, title, ylabel, xlabel=i >= 2)
    return fig


def _host_figure(grouped: Mapping[tuple[str, str], tuple[list[float], list[float]]]) -> Figure | None:
    host = {k: v for k, v in grouped.items() if k[1] in _HOST_SERIES}
    if not host:
        return None
    fig, (ax_cpu, ax_client, ax_mem) = _new_figure("Host", 3)
    if not _plot_series(ax_cpu, host, [("cpu_pct", "all cores"), ("cpu_max_core_pct", "busiest core")]):
        _no_data(ax_cpu, "host CPU")
    ax_cpu.set_ylim(0, 105)
    _finish(ax_cpu, "Host CPU", "CPU busy (%)")
    if _plot_series(ax_client, host, [("client_cpu_pct", "client process")], color="tab:red"):
        ax_client.axhline(100.0, color="gray", linestyle="--", label="one core (GIL limit for Python)")
    else:
        _no_data(ax_client, "client CPU")
    _finish(ax_client, "Benchmark client CPU", "CPU (% of one core)")
    if not _plot_series(ax_mem, host, [("mem_pct", "host memory used")]):
        _no_data(ax_mem, "memory")
    _finish(ax_mem, "Host memory", "memory used (%)", xlabel=True)
    return fig


def _gpu_figure(grouped: Mapping[tuple[str, str], tuple[list[float], list[float]]]) -> Figure | None:
    by_field: dict[str, list[tuple[str, int, list[float], list[float]]]] = {}
    sources = set()
    for (src, ser), (ts, vs) in grouped.items():
        parsed = gpu_series(ser)
        if parsed is not None:
            by_field.setdefault(parsed[1], []).append((src, parsed[0], ts, vs))
            sources.add(src)
    if not by_field:
        return None
    fig, axes = _new_figure("GPUs (NVML)", 2, 2)
    panels = [
        ("GPU utilization", "utilization (%)", "util_gpu_pct"),
        ("GPU power", "power (W)", "power_w"),
        ("GPU memory used", "memory used (MiB)", "mem_used_mib"),
        ("SM clock", "SM clock (MHz)", "sm_clock_mhz"),
    ]
    for i, (ax, (title, ylabel, fld)) in enumerate(zip(axes, panels, strict=True)):
        rows = sorted(by_field.get(fld, []), key=lambda r: (r[0], r[1]))
        for src, idx, ts, vs in rows:
            ax.plot(ts, vs, label=f"GPU {idx}" if len(sources) == 1 else f"{src}: GPU {idx}")
        if not rows:
            _no_data(ax, fld)
        _finish(ax, title, ylabel, xlabel=i >= 2)
    return fig


# -- session summary ---------------------------------------------------------------------------
STATUS_COLORS = {"VALID": "tab:green", "INVALID": "tab:orange", "ERROR": "tab:red"}
_OTHER_STATUS_COLOR = "tab:gray"  # INTERRUPTED, TIMEOUT, anything unknown


def _metric(result: Mapping[str, Any], *keys: str) -> float | None:
    value: Any = result
    for k in keys:
        value = value.get(k) if isinstance(value, Mapping) else None
    return _num(value)


def _summary_figure(results: Sequence[Mapping[str, Any]]) -> Figure:
    from matplotlib.patches import Patch

    n = len(results)
    fig, axes = _new_figure(
        f"Session summary: {n} test{'s' if n != 1 else ''}", 1, 4, sharex=False, sharey=True
    )
    labels = [str(r.get("test_id") or r.get("nodeid") or f"test {i}") for i, r in enumerate(results)]
    statuses = [str(r.get("status") or "?") for r in results]
    colors = [STATUS_COLORS.get(st, _OTHER_STATUS_COLOR) for st in statuses]
    ys = list(range(n))
    fontsize = "medium" if n <= 12 else "small" if n <= 25 else "x-small"

    for ax, key, title in (
        (axes[0], "tokens_per_s", "Output tokens/s"),
        (axes[1], "samples_per_s", "Samples/s"),
    ):
        vals = [_metric(r, key) for r in results]
        ax.barh(ys, [v or 0.0 for v in vals], color=colors, height=0.6)
        top = max((v for v in vals if v is not None), default=0.0)
        for y, v in zip(ys, vals, strict=True):
            text = "n/a" if v is None else f"{v:.4g}"
            ax.text(v or 0.0, y, f" {text}", va="center", ha="left", fontsize="small")
        ax.set_xlim(0, top * 1.35 if top > 0 else 1.0)
        ax.set_title(title)
        ax.set_xlabel(title.lower().replace("output ", ""))
        ax.grid(True, axis="x", alpha=0.3)

    for ax, key, title in ((axes[2], "ttft_ms", "TTFT"), (axes[3], "tpot_ms", "TPOT")):
        plotted: list[float] = []
        for y, r, c in zip(ys, results, colors, strict=True):
            p50, p99 = _metric(r, key, "p50"), _metric(r, key, "p99")
            pts = [v for v in (p50, p99) if v is not None and v > 0]
            plotted += pts
            if not pts:
                # x in axes fraction, y in data: a log axis has no zero to put the text at
                ax.text(0.02, y, "n/a", va="center", fontsize="small", transform=ax.get_yaxis_transform())
                continue
            ax.plot(pts, [y] * len(pts), color=c, linewidth=2, alpha=0.6)
            if p50 is not None and p50 > 0:
                ax.plot([p50], [y], "o", markerfacecolor="white", markeredgecolor=c, markersize=8)
            if p99 is not None and p99 > 0:
                ax.plot([p99], [y], "o", color=c, markersize=8)
                ax.annotate(
                    _fmt_ms(p99), (p99, y), xytext=(5, 4), textcoords="offset points", fontsize="small"
                )
        ax.set_title(f"{title} p50 / p99\n(LoadGen)")
        if plotted:
            _log_x(ax, min(plotted), max(plotted), max_125_decades=1.3)
            ax.set_xlabel(f"{title} (ms, log scale)")
            ax.margins(x=0.2)
        else:
            _no_data(ax, title)
            ax.set_xlabel(f"{title} (ms)")
            ax.set_xticks([])
        ax.grid(True, axis="x", which="both", alpha=0.3)

    axes[0].set_yticks(
        ys, [f"{lab}\n{st}" for lab, st in zip(labels, statuses, strict=True)], fontsize=fontsize
    )
    for tick, c in zip(axes[0].get_yticklabels(), colors, strict=True):
        tick.set_color(c)  # an ERROR row has no bars: its label still shows the status color
    axes[0].set_ylim(n - 0.5, -0.5)  # first test on top
    seen = dict.fromkeys(statuses)
    handles: list[Any] = [Patch(color=STATUS_COLORS.get(st, _OTHER_STATUS_COLOR), label=st) for st in seen]
    handles += [
        axes[3].plot([], [], "o", markerfacecolor="white", markeredgecolor="black", label="p50")[0],
        axes[3].plot([], [], "o", color="black", label="p99 (value shown)")[0],
    ]
    _legend(axes[3], handles, [str(h.get_label()) for h in handles])
    return fig


def write_session_summary(path: Path | str, results: Sequence[Mapping[str, Any]]) -> Path | None:
    """Write one PNG comparing a session's tests (throughput, TTFT/TPOT p50/p99, status colors).

    Never raises: a failure is logged as a warning and None returned, as it is for no results.

    :param path: the PNG to write, e.g. ``<session>/summary.png``.
    :param results: session.yaml's ``results`` rows (`BenchmarkResult` dicts; metrics may be None).
    """
    if not results:
        return None
    try:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        _summary_figure(results).savefig(out, dpi=DPI)
        return out
    except Exception as exc:  # a figure must never fail the session
        log.warning("session summary %s not written: %s: %s", path, type(exc).__name__, exc)
        return None


# -- public ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatencyMarks:
    """What the latency CDFs mark besides the requests: the scenario's limits and LoadGen's percentiles.

    :param limits_ms: ``{"ttft": ms, "tpot": ms}`` (either may be absent); None without limits.
    :param target_percentile: the fraction (0.99) at which LoadGen checks those limits.
    :param ttft_ms: LoadGen's TTFT percentiles of the run (result.yaml's numbers), marked on the CDF.
    """

    limits_ms: Mapping[str, float] | None = None
    target_percentile: float | None = None
    ttft_ms: Percentiles | None = None
    tpot_ms: Percentiles | None = None


@dataclass(frozen=True)
class RunWindow:
    """When the warm-up request ran and when LoadGen measured, in seconds since the test's t0."""

    warmup: tuple[float, float] | None = None
    loadgen: tuple[float, float] | None = None

    @classmethod
    def of(cls, client: Mapping[str, Any]) -> RunWindow:
        """From a run's client.json (the runner records both)."""
        w = client.get("warmup") or {}
        start, end = client.get("loadgen_start_s"), client.get("loadgen_end_s")
        return cls(
            (w["start_s"], w["end_s"])
            if w.get("start_s") is not None and w.get("end_s") is not None
            else None,
            (start, end) if start is not None and end is not None else None,
        )


def _shade(fig: Figure, window: RunWindow) -> None:
    """Mark the warm-up and LoadGen's measured window on every axis of a time figure: numbers outside
    the measured window are not part of the result."""
    for i, ax in enumerate(fig.axes):
        if window.warmup is not None:
            ax.axvspan(*window.warmup, color="tab:orange", alpha=0.12, label="warm-up" if i == 0 else None)
        if window.loadgen is not None:
            ax.axvspan(
                *window.loadgen,
                color="tab:green",
                alpha=0.06,
                label="LoadGen measured window" if i == 0 else None,
            )
    if fig.axes and (window.warmup or window.loadgen):
        _legend(fig.axes[0])


def build_figures(
    samples: Iterable[Sample],
    requests: Sequence[Request] = (),
    marks: LatencyMarks | None = None,
    window: RunWindow | None = None,
) -> dict[str, Figure]:
    """Figures by file stem ("client", "latency_cdf", "engine", "host", "gpu"); absent data -> no entry.

    :param samples: timeline samples (seconds since test start).
    :param requests: requests.jsonl rows (harness_fixtures.client.requestlog).
    :param window: the warm-up and LoadGen's measured window, shaded on the time figures.
    """
    grouped = _group(samples)
    figs: dict[str, Figure | None] = {
        "client": _client_figure(requests),
        "latency_cdf": _cdf_figure(requests, marks or LatencyMarks()),
        "engine": _engine_figure(grouped),
        "host": _host_figure(grouped),
        "gpu": _gpu_figure(grouped),
    }
    if window is not None:
        for stem in ("client", "engine", "host", "gpu"):
            if (fig := figs[stem]) is not None:
                _shade(fig, window)
    return {k: f for k, f in figs.items() if f is not None}


def write_plots(
    out_dir: Path | str,
    samples: Iterable[Sample],
    requests: Sequence[Request] = (),
    marks: LatencyMarks | None = None,
    window: RunWindow | None = None,
) -> list[Path]:
    """Write `<stem>.png` for each figure `build_figures` makes; return the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, fig in build_figures(samples, requests, marks, window).items():
        path = out / f"{stem}.png"
        text = {"Description": _cdf_text(requests, marks or LatencyMarks())} if stem == "latency_cdf" else {}
        fig.savefig(path, dpi=DPI, metadata=text)
        paths.append(path)
    return paths


def write_capacity_plot(path: Path, capacity: CapacityResult, limits: Any) -> str | None:
    """The capacity search's probes: load against TTFT and TPOT at the percentile each was judged at,
    with the limits, each probe's verdict and the load found; then the full-length runs after it
    (squares, at the scenario's percentile) and the load confirmed. Never raises (a missing figure
    loses no data)."""
    try:
        title = f"Capacity search: {len(capacity.probes)} probes, found " + (
            f"{capacity.found_qps:.4g} QPS" if capacity.found_qps else "no passing load"
        )
        if capacity.confirmations:
            title += f"; {len(capacity.confirmations)} full run(s), " + (
                f"VALID at {capacity.confirmed_qps:.4g} QPS" if capacity.confirmed_qps else "none VALID"
            )
        fig, axes = _new_figure(title, 2)
        judged = sorted({p.percentile for p in capacity.probes if p.percentile is not None})
        # Probes are judged at the percentile a full run's early stopping demands at their load (a little
        # above the scenario's); the limit line is the scenario's.
        at = (
            f"p{judged[0] * 100:.4g}–p{judged[-1] * 100:.4g}"
            if len(judged) > 1
            else f"p{(judged[0] if judged else limits.percentile) * 100:.4g}"
        )
        for ax, name, limit in ((axes[0], "ttft", limits.ttft_ms), (axes[1], "tpot", limits.tpot_ms)):
            for verdict, color in (("pass", "tab:green"), ("fail", "tab:red")):
                pts = [
                    (p.qps, m * limit)
                    for p in capacity.probes
                    if p.verdict == verdict and (m := getattr(p, f"{name}_margin")) is not None and limit
                ]
                if pts:
                    ax.plot(*zip(*pts, strict=True), "o", color=color, label=f"probe: {verdict}")
            for valid, color in ((True, "tab:green"), (False, "tab:red")):
                full = [
                    (r.qps, m * limit)
                    for r in capacity.confirmations
                    if (r.status == "VALID") == valid
                    and (m := getattr(r, f"{name}_margin")) is not None
                    and limit
                ]
                if full:
                    label = f"full run: {'VALID' if valid else 'INVALID'}"
                    ax.plot(*zip(*full, strict=True), "s", color=color, markerfacecolor="none", label=label)
            if limit:
                ax.axhline(limit, color="black", linestyle="--", label=f"limit {limit:g} ms")
            if capacity.found_qps:
                ax.axvline(capacity.found_qps, color="tab:blue", linestyle=":", label="found by the probes")
            if capacity.confirmed_qps:
                ax.axvline(capacity.confirmed_qps, color="tab:green", linestyle="-.", label="confirmed")
            _finish(
                ax,
                f"{name.upper()} {at} per probe, projected to the full run's length"
                + (", and per full run" if capacity.confirmations else ""),
                f"{name.upper()} {at} (ms)",
                xlabel=ax is axes[1],
            )
            _legend(ax)
        axes[1].set_xlabel("load (QPS)")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI)
        return str(path)
    except Exception as exc:  # a figure must never cost the result
        log.warning("capacity plot %s not written: %s: %s", path, type(exc).__name__, exc)
        return None
