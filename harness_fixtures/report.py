"""One report of several sessions: ``python -m harness_fixtures.report SESSION... --out DIR`` (or
``harness-report``).

Sessions from several nodes or days are merged into one table (``report.csv``, one row per test of
each session, session.csv's columns), one summary figure (``summary.png``, every test of every session
side by side) and one self-contained HTML page (``report.html``: the sessions, the table, the summary
figure and each test's latency CDF and client plots, images embedded). Files are only read.
"""

from __future__ import annotations

import argparse
import base64
import html
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .compare import number
from .table import BY_NAME, flat_row, to_csv

# Columns of the HTML table (all of them are in report.csv).
HTML_COLUMNS = (
    "session",
    "test_id",
    "repeat",
    "status",
    "tokens_per_s",
    "samples_per_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "tpot_p50_ms",
    "tpot_p99_ms",
    "itl_p99_ms",
    "latency_p99_ms",
    "total_token_throughput",
    "request_goodput",
    "failed_requests",
    "rouge1",
)
PLOTS = ("latency_cdf.png", "client.png")


class ReportError(ValueError):
    """A session cannot be read; the message names it."""


@dataclass
class Session:
    path: Path
    results: list[dict[str, Any]] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)  # same order; {} when missing
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def host(self) -> str:
        env = next((m.get("environment") or {} for m in self.metadata if m), {})
        return str(env.get("hostname") or "?")


def read_session(path: Path) -> Session:
    if not path.is_dir():
        raise ReportError(f"{path}: not a folder; pass session folders (harness_output/<stamp>)")
    s = Session(path)
    for rf in sorted(path.glob("*/result.yaml")):
        try:
            r = yaml.safe_load(rf.read_text())
            md_path = rf.parent / "metadata.yaml"
            md = yaml.safe_load(md_path.read_text()) if md_path.is_file() else {}
        except (OSError, yaml.YAMLError) as exc:
            raise ReportError(f"cannot read {rf}: {exc}") from None
        if isinstance(r, dict) and "test_id" in r:
            s.results.append({**r, "_dir": rf.parent.name})
            s.metadata.append(md if isinstance(md, dict) else {})
    if not s.results:
        raise ReportError(f"{path}: no */result.yaml: not a session folder")
    if (path / "session.yaml").is_file():
        doc = yaml.safe_load((path / "session.yaml").read_text()) or {}
        s.info = {k: doc.get(k) for k in ("started_utc", "finished_utc", "command_line")}
    return s


def rows(sessions: Sequence[Session]) -> list[dict[str, Any]]:
    """The merged table: every test of every session, by test then session."""
    out = [flat_row(r, s.name, m) for s in sessions for r, m in zip(s.results, s.metadata, strict=True)]
    return sorted(out, key=lambda row: (str(row["test_id"]), str(row["session"]), row.get("repeat") or 0))


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return number(v)
    return "" if v is None else html.escape(str(v))


def render_html(sessions: Sequence[Session], table: Sequence[Mapping[str, Any]], summary: Path | None) -> str:
    head = "".join(f"<th>{html.escape(BY_NAME[c].label if c in BY_NAME else c)}</th>" for c in HTML_COLUMNS)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in HTML_COLUMNS) + "</tr>" for row in table
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>harness-fixtures report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:90%}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:nth-child(-n+4){text-align:left}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>harness-fixtures report: {len(sessions)} session(s), {len(table)} test run(s)</h1>",
        "<h2>Sessions</h2><ul>",
        *(
            f"<li><b>{html.escape(s.name)}</b> on {html.escape(s.host)}, "
            f"{html.escape(str(s.info.get('started_utc') or '?'))} – "
            f"{html.escape(str(s.info.get('finished_utc') or '?'))}: "
            f"<code>{html.escape(' '.join(map(str, s.info.get('command_line') or [])))}</code></li>"
            for s in sessions
        ),
        "</ul><h2>Results</h2>",
        "<p>LoadGen's values for throughput, TTFT, TPOT and end-to-end latency; the client's for ITL, "
        "total token throughput and goodput (every column is in report.csv).</p>",
        f"<table><tr>{head}</tr>\n{body}</table>",
    ]
    if summary is not None and summary.is_file():
        parts += ["<h2>Summary</h2>", _img(summary, "summary")]
    parts.append("<h2>Per test</h2>")
    for s in sessions:
        for r in s.results:
            plots = [s.path / r["_dir"] / "plots" / p for p in PLOTS]
            shown = [p for p in plots if p.is_file()]
            if shown:
                parts.append(
                    f"<h3>{html.escape(s.name)} / {html.escape(str(r['_dir']))} ({r.get('status')})</h3>"
                )
                parts += [_img(p, f"{r['_dir']} {p.stem}") for p in shown]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(sessions: Sequence[Session], out: Path) -> dict[str, Path]:
    """report.csv, summary.png and report.html in ``out``; returns their paths."""
    from .metrics.plots import write_session_summary

    out.mkdir(parents=True, exist_ok=True)
    table = rows(sessions)
    (out / "report.csv").write_text(to_csv(table))
    # one figure over every run: each labelled by its session, so two nodes' tests sit side by side
    labelled = [{**r, "test_id": f"{s.name} {r['_dir']}"} for s in sessions for r in s.results]
    summary = write_session_summary(out / "summary.png", labelled)
    (out / "report.html").write_text(render_html(sessions, table, summary))
    files = {"csv": out / "report.csv", "html": out / "report.html"}
    if summary is not None:
        files["summary"] = summary
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="harness-report",
        description="Merge sessions (nodes, days) into one table, one summary figure and one HTML page.",
    )
    p.add_argument("sessions", nargs="+", type=Path, help="Session folders (harness_output/<stamp>).")
    p.add_argument("--out", type=Path, default=Path("harness_report"), help="Default: harness_report.")
    args = p.parse_args(argv)
    try:
        sessions = [read_session(path) for path in args.sessions]
    except ReportError as exc:
        print(f"harness-report: error: {exc}", file=sys.stderr)
        return 2
    files = write_report(sessions, args.out)
    table = rows(sessions)
    cols = ("session", "test_id", "status", "tokens_per_s", "ttft_p99_ms", "tpot_p99_ms")
    widths = [max(len(c), *(len(_cell(r.get(c))) for r in table)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in table:
        print("  ".join(_cell(r.get(c)).ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
