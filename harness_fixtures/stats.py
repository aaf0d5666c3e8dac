"""The one percentile definition for numbers the harness computes itself (client timings, telemetry).

LoadGen's own metrics (TTFT, TPOT, latency percentiles of a run) are always LoadGen's values, read from
its detail log. For everything else the harness uses LoadGen's definition too — the value at index
``floor(n × q)`` of the sorted sample, a nearest-rank percentile without interpolation — so a client-side
p99 and LoadGen's p99 over the same requests are the same kind of number, and every p99 printed,
written or plotted for one quantity is the same value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

PERCENTILES: tuple[float, ...] = (50.0, 90.0, 95.0, 99.0, 99.9)


def percentile(values: Iterable[float], q: float) -> float | None:
    """Percentile ``q`` (0–100) of ``values`` as LoadGen computes it; None when there are none."""
    arr = np.sort(np.fromiter(values, dtype=float))
    if arr.size == 0:
        return None
    return float(arr[min(arr.size - 1, int(arr.size * q / 100.0))])


def percentiles(values: Sequence[float], qs: Iterable[float] = PERCENTILES) -> dict[float, float]:
    """Several percentiles of the same values (sorted once); {} when there are none."""
    arr = np.sort(np.asarray(values, dtype=float))
    if arr.size == 0:
        return {}
    return {q: float(arr[min(arr.size - 1, int(arr.size * q / 100.0))]) for q in qs}


def describe(values: Iterable[float]) -> dict[str, float]:
    """{n, mean, std, min, max, p50, p99} of ``values`` with NaNs dropped; {} when nothing is left."""
    arr = np.fromiter((v for v in values if not math.isnan(v)), dtype=float)
    if arr.size == 0:
        return {}
    ps = percentiles(arr.tolist(), (50.0, 99.0))
    return {
        "n": float(arr.size),
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "p50": ps[50.0],
        "p99": ps[99.0],
    }


def round4(value: float) -> float:
    """ROUGE as the MLPerf reference prints it: numpy's rounding of a float64 to 4 decimals (which can
    differ from Python's round in the last digit)."""
    return float(np.round(np.float64(value), 4))
