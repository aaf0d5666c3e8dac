"""The merged metrics timeline as a CSV file, its reader, and per-series summaries.

File format (`timeline.csv`, schema 2): a plain CSV that ``pandas.read_csv(path)`` reads as it is —
header ``t_s,source,series,value,t_unix_s`` and one row per sample sorted by t_s (seconds since the
test's t0); ``t_unix_s`` is the sample's wall-clock time (empty when t0's wall time is unknown), so
no metadata line is needed. Schema 1 files started with a ``# schema_version=1 t0_unix_s=...``
comment line and had no ``t_unix_s`` column; the reader reads both.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from ..results import write_text_atomic
from ..stats import describe

__all__ = ["SCHEMA_VERSION", "Sample", "Timeline", "read_timeline", "summarize", "write_timeline"]

SCHEMA_VERSION = 2
_COLUMNS_V1 = ["t_s", "source", "series", "value"]
_COLUMNS = [*_COLUMNS_V1, "t_unix_s"]


class Sample(NamedTuple):
    """One observation: seconds since the test's t0, collector name, series name, value."""

    t_s: float
    source: str
    series: str
    value: float


class Timeline(NamedTuple):
    t0_unix_s: float | None
    samples: list[Sample]


def write_timeline(path: Path | str, samples: Iterable[Sample], t0_unix_s: float | None = None) -> Path:
    """Write `samples` to `path` (parents created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = sorted(samples, key=lambda s: (s.t_s, s.source, s.series))
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(_COLUMNS)
    for s in rows:
        wall = "" if t0_unix_s is None else f"{t0_unix_s + float(s.t_s):.6f}"
        # repr-exact floats: a round trip returns the same numbers.
        w.writerow([repr(float(s.t_s)), s.source, s.series, repr(float(s.value)), wall])
    write_text_atomic(path, f.getvalue())  # a result file: never half written
    return path


def read_timeline(path: Path | str) -> Timeline:
    """Read a file written by `write_timeline` (schema 2, or schema 1 with its comment line).

    :raises ValueError: when the header is not the expected one or the schema version is newer.
    """
    path = Path(path)
    t0: float | None = None
    with path.open(newline="", encoding="utf-8") as f:
        first = f.readline()
        if first.startswith("#"):  # schema 1: the t0 wall time on a comment line
            fields = dict(kv.split("=", 1) for kv in first[1:].split() if "=" in kv)
            version = int(fields.get("schema_version", "1"))
            if version > 1:
                raise ValueError(
                    f"{path}: timeline schema_version {version!r} is newer than this reader's "
                    f"{SCHEMA_VERSION}; upgrade harness-fixtures"
                )
            t0 = float(fields["t0_unix_s"]) if fields.get("t0_unix_s") else None
            header = f.readline()
        else:
            header = first
        columns = header.strip().split(",")
        if columns not in (_COLUMNS, _COLUMNS_V1):
            raise ValueError(f"{path}: expected header {','.join(_COLUMNS)!r}, got {header.strip()!r}")
        samples = []
        for r in csv.reader(f):
            try:
                samples.append(Sample(float(r[0]), r[1], r[2], float(r[3])))
                if t0 is None and len(r) > 4 and r[4]:
                    t0 = float(r[4]) - float(r[0])
            except (IndexError, ValueError):
                continue  # a torn last row (the run was killed mid-write) or a foreign one
    return Timeline(t0, samples)


def summarize(samples: Iterable[Sample]) -> dict[str, dict[str, dict[str, float]]]:
    """{source: {series: {n, mean, std, min, max, p50, p99}}} over the samples' values (NaN ignored)."""
    grouped: dict[str, dict[str, list[float]]] = {}
    for s in samples:
        grouped.setdefault(s.source, {}).setdefault(s.series, []).append(s.value)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for source, series in sorted(grouped.items()):
        for name, values in sorted(series.items()):
            st = describe(values)
            if st:
                out.setdefault(source, {})[name] = st
    return out
