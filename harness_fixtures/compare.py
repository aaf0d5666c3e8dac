"""Compare two sets of results: ``python -m harness_fixtures.compare A B`` (or ``harness-compare``).

A and B are each a session folder, a result.yaml, a baseline file (``--harness-save-baseline``) or an
MLflow run (``mlflow:<run id>``; a session's parent run stands for all its tests). For every test
both hold and every metric, it prints A's and B's value, the change and a verdict:

- **unchanged**: the medians differ by at most the threshold (``--threshold``, default 5 %);
- **noisy**: they differ by more, but the runs of A and of B overlap (repeats, ``--harness-repeat``),
  so the difference is within what repeating the same test gives;
- **regression** / **improvement**: they differ by more than the threshold and the runs do not overlap,
  in the worse / better direction of the metric.

With one run per side, a difference beyond the threshold is a regression or an improvement: run tests
several times (odd N) to tell noise apart. Any session can also become a baseline file
(``--save-baseline FILE SESSION``) for ``--harness-baseline``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .gating import Baseline, GateError, baseline_from_session, hardware_of, save_baseline
from .table import BY_NAME, Spread, group_metrics

Verdict = Literal["regression", "improvement", "unchanged", "noisy", "changed"]
DEFAULT_METRICS = (
    "tokens_per_s",
    "samples_per_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "tpot_p50_ms",
    "tpot_p99_ms",
    "latency_p99_ms",
    "itl_p99_ms",
    "total_token_throughput",
    "request_goodput",
    "failed_requests",
    "rouge1",
    "rouge2",
    "rougeL",
    "rougeLsum",
    "gen_len",
)


class CompareError(ValueError):
    """An input cannot be read; the message names it and says what it must be."""


@dataclass
class Side:
    """One side of a comparison: each test's metrics over its runs, and what it ran on."""

    label: str
    tests: dict[str, dict[str, Spread]]
    context: dict[str, Any] = field(default_factory=dict)  # hardware, engine versions


@dataclass(frozen=True)
class Row:
    test_id: str
    metric: str
    a: Spread
    b: Spread
    change_pct: float | None
    verdict: Verdict

    def as_dict(self) -> dict[str, Any]:
        return {
            "test_id": self.test_id,
            "metric": self.metric,
            "a": self.a.summary(),
            "b": self.b.summary(),
            "change_pct": None if self.change_pct is None else round(self.change_pct, 3),
            "verdict": self.verdict,
        }


# -- reading ------------------------------------------------------------------------------------
def _yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CompareError(f"cannot read {path}: {exc}") from None


def _context(metadata: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    engines = sorted(
        {f"{(m.get('engine') or {}).get('kind')} {(m.get('engine') or {}).get('version')}" for m in metadata}
    )
    return {"hardware": hardware_of(dict(metadata[0])) if metadata else {}, "engine": engines}


def read_session(path: Path) -> Side:
    """A session folder (every ``*/result.yaml``; older schema versions too) or a session.yaml."""
    folder = path.parent if path.name == "session.yaml" else path
    results, metadata = [], []
    for rf in sorted(folder.glob("*/result.yaml")):
        r = _yaml(rf)
        if isinstance(r, dict) and "test_id" in r:
            results.append(r)
            md = rf.parent / "metadata.yaml"
            if md.is_file():
                metadata.append(_yaml(md))
    if not results and (folder / "session.yaml").is_file():
        results = (_yaml(folder / "session.yaml") or {}).get("results") or []
    if not results:
        raise CompareError(f"{path}: no */result.yaml and no session.yaml results: not a session folder")
    return Side(folder.name, group_metrics(results), _context(metadata))


def read_baseline(path: Path) -> Side:
    """A baseline file: each test's stored metrics (medians), with every run's values when it has them."""
    try:
        b = Baseline.load(path)
    except GateError as exc:
        raise CompareError(str(exc)) from None
    tests = {}
    for test, entry in b.results.items():
        values = entry.get("values") or {}
        tests[test] = {
            m: Spread(tuple(values.get(m) or [v])) for m, v in (entry.get("metrics") or {}).items()
        }
    return Side(path.name, tests, {"hardware": b.hardware})


def _nest(flat: Mapping[str, float]) -> dict[str, Any]:
    """MLflow metric keys (``ttft_ms.p99``) back into a result dict."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                break
        else:
            node[leaf] = value
    return out


def read_mlflow(run_id: str, tracking_uri: str | None) -> Side:
    """An MLflow run logged by the harness: one test, or a session's parent run (all its children)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise CompareError(
            f"mlflow:{run_id}: no tracking URI; pass --mlflow-tracking-uri or set MLFLOW_TRACKING_URI"
        )
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise CompareError("mlflow is not installed; pip install 'harness-fixtures[mlflow]'") from None
    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
        runs = [run]
        if run.data.tags.get("harness.kind") == "session":
            runs = client.search_runs(
                [run.info.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'",
                max_results=1000,
            )
    except Exception as exc:
        raise CompareError(f"mlflow:{run_id} at {uri}: {type(exc).__name__}: {exc}") from None
    results = []
    for r in runs:
        result = _nest(r.data.metrics)
        result["test_id"] = r.data.tags.get("harness.test_id") or r.info.run_name
        result["status"] = r.data.tags.get("status")
        results.append(result)
    return Side(f"mlflow:{run_id}", group_metrics(results))


def read_side(spec: str, tracking_uri: str | None = None) -> Side:
    """Whatever ``spec`` names: ``mlflow:<run id>``, a session folder or session.yaml, a result.yaml,
    or a baseline file."""
    if spec.startswith("mlflow:") or spec.startswith("runs:/"):
        return read_mlflow(spec.split(":", 1)[1].strip("/").split("/")[0], tracking_uri)
    path = Path(spec)
    if path.is_dir() or path.name == "session.yaml":
        return read_session(path)
    if not path.is_file():
        raise CompareError(f"{spec!r} is not a session folder, result.yaml, baseline file or mlflow:<run id>")
    data = _yaml(path)
    if isinstance(data, dict) and "test_id" in data and "status" in data:
        return Side(path.parent.name or path.name, group_metrics([data]))
    if isinstance(data, dict) and "results" in data and "created_utc" in data:
        return read_baseline(path)
    raise CompareError(f"{path}: neither a result.yaml (test_id, status) nor a baseline file (results)")


# -- comparing ----------------------------------------------------------------------------------
def verdict(metric: str, a: Spread, b: Spread, threshold_pct: float) -> tuple[float | None, Verdict]:
    """(change of the medians in percent, verdict) of one metric; see the module docstring."""
    if a.median == 0:
        change = None if b.median != 0 else 0.0
    else:
        change = (b.median - a.median) / abs(a.median) * 100
    if change is not None and abs(change) <= threshold_pct:
        return change, "unchanged"
    if (a.n > 1 or b.n > 1) and a.low <= b.high and b.low <= a.high:
        return change, "noisy"
    better = BY_NAME[metric].better if metric in BY_NAME else None
    if better is None:
        return change, "changed"
    up = b.median > a.median
    return change, "improvement" if up == (better == "higher") else "regression"


def compare(
    a: Side, b: Side, threshold_pct: float = 5.0, metrics: Sequence[str] = DEFAULT_METRICS
) -> list[Row]:
    rows = []
    for test in sorted(set(a.tests) & set(b.tests)):
        for m in metrics:
            if m in a.tests[test] and m in b.tests[test]:
                change, v = verdict(m, a.tests[test][m], b.tests[test][m], threshold_pct)
                rows.append(Row(test, m, a.tests[test][m], b.tests[test][m], change, v))
    return rows


def number(v: float) -> str:
    """4 significant digits, without exponents for the large numbers latencies in ms are."""
    return f"{v:.0f}" if abs(v) >= 1e4 else f"{v:.4g}"


def _fmt(s: Spread) -> str:
    text = number(s.median)
    return text + (f" [{number(s.low)}-{number(s.high)}] n={s.n}" if s.n > 1 else "")


def render(a: Side, b: Side, rows: Sequence[Row], threshold_pct: float) -> str:
    head = ("test", "metric", f"A: {a.label}", f"B: {b.label}", "change", "verdict")
    table = [head] + [
        (
            r.test_id,
            r.metric,
            _fmt(r.a),
            _fmt(r.b),
            "-" if r.change_pct is None else f"{r.change_pct:+.1f}%",
            r.verdict,
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    only_a, only_b = sorted(set(a.tests) - set(b.tests)), sorted(set(b.tests) - set(a.tests))
    if only_a:
        lines.append(f"only in A: {', '.join(only_a)}")
    if only_b:
        lines.append(f"only in B: {', '.join(only_b)}")
    for key in ("hardware", "engine"):
        if a.context.get(key) and b.context.get(key) and a.context[key] != b.context[key]:
            lines.append(f"note: {key} differs: A {a.context[key]} vs B {b.context[key]}")
    counts = {
        v: sum(1 for r in rows if r.verdict == v) for v in ("regression", "improvement", "noisy", "unchanged")
    }
    lines.append(
        f"{len(rows)} comparisons at a {threshold_pct:g}% threshold: "
        + ", ".join(f"{n} {v}" for v, n in counts.items())
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="harness-compare",
        description="Compare two sessions, result files, baselines or MLflow runs, metric by metric.",
    )
    p.add_argument(
        "a", nargs="?", help="Before: session folder, result.yaml, baseline file or mlflow:<run id>."
    )
    p.add_argument("b", nargs="?", help="After: the same kinds.")
    p.add_argument("--threshold", type=float, default=5.0, help="Percent change that counts. Default: 5.")
    p.add_argument("--metrics", help=f"Comma-separated metric names. Default: {','.join(DEFAULT_METRICS)}.")
    p.add_argument("--json", action="store_true", help="Print the rows as JSON.")
    p.add_argument(
        "--fail-on-regression", action="store_true", help="Exit 1 when any metric regressed. Default: exit 0."
    )
    p.add_argument("--mlflow-tracking-uri", help="For mlflow:<run id>. Default: $MLFLOW_TRACKING_URI.")
    p.add_argument(
        "--save-baseline",
        type=Path,
        metavar="FILE",
        help="Write session A as a baseline file for --harness-baseline (B not needed), then exit.",
    )
    args = p.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else list(DEFAULT_METRICS)
    unknown = [m for m in metrics if m not in BY_NAME]
    if unknown:
        p.error(f"unknown metric(s) {unknown}; known: {', '.join(BY_NAME)}")
    if args.threshold < 0:
        p.error(f"--threshold must be >= 0, got {args.threshold!r}")
    try:
        if args.save_baseline is not None:
            if args.a is None:
                p.error("--save-baseline needs the session folder to save (A)")
            b = baseline_from_session(Path(args.a))
            save_baseline(args.save_baseline, b.results, b.hardware)
            print(f"baseline of {len(b.results)} test(s) written to {args.save_baseline}")
            return 0
        if args.a is None or args.b is None:
            p.error("give two inputs to compare: A B")
        a, b_side = read_side(args.a, args.mlflow_tracking_uri), read_side(args.b, args.mlflow_tracking_uri)
    except (CompareError, GateError) as exc:
        print(f"harness-compare: error: {exc}", file=sys.stderr)
        return 2
    rows = compare(a, b_side, args.threshold, metrics)
    if not rows:
        print(
            f"harness-compare: error: nothing to compare: tests in A {sorted(a.tests)}, "
            f"in B {sorted(b_side.tests)}",
            file=sys.stderr,
        )
        return 2
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=1))
    else:
        print(render(a, b_side, rows, args.threshold))
    return 1 if args.fail_on_regression and any(r.verdict == "regression" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
