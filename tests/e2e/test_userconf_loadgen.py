"""user.conf validation (harness_fixtures.userconf), checked against what LoadGen itself does.

LoadGen ignores typos and misreads some values silently, so where a test claims "LoadGen would
misread this", LoadGen is asked, in a subprocess (its config state is process-global).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness_fixtures.loadgen.userconf import UserConfError, lookup, parse_user_conf

# Loads each conf into a fresh TestSettings and prints the asked attributes. The first FromConfig of
# a process also loads the built-in mlperf.conf, so an empty file goes first and every job sees only
# its own file on top of LoadGen's defaults.
LOADGEN_READER = """
import json, sys, tempfile, mlperf_loadgen as lg
jobs = json.load(sys.stdin)
with tempfile.NamedTemporaryFile("w", suffix=".conf") as empty:
    lg.TestSettings().FromConfig(empty.name, "m", "Server", 1)
out = []
for job in jobs:
    s = lg.TestSettings()
    rc = s.FromConfig(job["path"], job["model"], job["scenario"], 1)
    default = getattr(lg.TestSettings(), job["attr"])
    out.append({"rc": rc, "value": getattr(s, job["attr"]), "default": default})
print(json.dumps(out))
"""


def loadgen_read(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-c", LOADGEN_READER],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return list(json.loads(proc.stdout.strip().splitlines()[-1]))


def write(tmp_path: Path, text: str, name: str = "user.conf") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_of(path: Path) -> str:
    with pytest.raises(UserConfError) as info:
        parse_user_conf(path)
    return str(info.value)


# Lines LoadGen reads differently from what they say (each verified against LoadGen below).
MISREAD: list[tuple[str, str, dict[str, Any]]] = [
    ("m.Server.min_query_count = 1e3", "whole number", {"rc": 0, "value": 1}),
    ("m.Server.min_query_count = 2.5", "whole number", {"rc": 0, "value": 2}),
    ("m.Server.min_query_count = -5", "whole number", {"rc": 0, "value": 2**64 - 5}),
    ("m.Server.min_query_count = 010", "leading zeros", {"rc": 0, "value": 8}),
    ("m.Server.min_query_count=700", "spaces around '='", {"rc": 0, "value": "default"}),
    ("m.Server.min_query_count = 7 8", "one value", {"rc": 0, "value": 8}),
    ("m.Server.min_query_count = 700 # why", "comment after the value", {"rc": -22}),
    ("m.Server.min_query_count = 700 #", "comment after the value", {"rc": -22}),
    ("m.Server.target_qps = -3", "must be a number >= 0", {"rc": 0, "value": -3.0}),
]


def test_lines_loadgen_misreads_are_rejected(tmp_path: Path) -> None:
    jobs = []
    for i, (line, fragment, _) in enumerate(MISREAD):
        path = write(tmp_path, line + "\n", f"bad{i}.conf")
        assert fragment in errors_of(path), line
        attr = "server_target_qps" if "target_qps" in line else "min_query_count"
        jobs.append({"path": str(path), "model": "m", "scenario": "Server", "attr": attr})
    for (line, _, expected), got in zip(MISREAD, loadgen_read(jobs), strict=True):
        assert got["rc"] == expected["rc"], line
        if "value" in expected:
            want = got["default"] if expected["value"] == "default" else expected["value"]
            assert got["value"] == want, f"{line}: LoadGen read {got['value']!r}"


def test_accepted_values_read_as_written_and_lookup_follows_loadgen_precedence(tmp_path: Path) -> None:
    everything = [
        "*.*.min_query_count = 1",
        "m.*.min_query_count = 2",
        "*.Server.min_query_count = 3",
        "m.Server.min_query_count = 4",
        "m.Offline.min_query_count = 5",
        "other.Server.min_query_count = 6",
    ]
    cases: list[tuple[list[str], str, int | None]] = [
        (everything, "Server", 4),  # exact
        (everything[:3] + everything[4:], "Server", 3),  # *.scenario beats model.*
        (everything[:2] + everything[4:], "Server", 2),  # model.* beats *.*
        (everything[:1] + everything[4:], "Server", 1),
        (everything[4:], "Server", None),  # other scenarios and models never apply
        (everything, "Offline", 5),
        (["m.Server.min_query_count = 7", "m.Server.min_query_count = 8"], "Server", 8),  # last wins
        (["m.Server.min_query_count = 0x10"], "Server", 16),
        (["m.Server.min_query_count = +9"], "Server", 9),
    ]
    jobs = []
    for i, (lines, scenario, _) in enumerate(cases):
        path = write(tmp_path, "\n".join(lines) + "\n", f"prec{i}.conf")
        jobs.append({"path": str(path), "model": "m", "scenario": scenario, "attr": "min_query_count"})
    doubles = ["1e2", ".5", "2.", "7"]
    for i, value in enumerate(doubles):
        path = write(tmp_path, f"m.Server.target_qps = {value}\n", f"qps{i}.conf")
        jobs.append({"path": str(path), "model": "m", "scenario": "Server", "attr": "server_target_qps"})

    got = loadgen_read(jobs)
    for (lines, scenario, expected), job, lg in zip(cases, jobs, got, strict=False):
        entries = parse_user_conf(Path(job["path"]))
        ours = lookup(entries, "m", scenario, "min_query_count")
        assert lg["rc"] == 0
        assert (int(ours, 0) if ours is not None else None) == expected, lines
        assert lg["value"] == (lg["default"] if expected is None else expected), (lines, scenario)
    for value, lg in zip(doubles, got[len(cases) :], strict=True):
        (entry,) = parse_user_conf(tmp_path / f"qps{doubles.index(value)}.conf")
        assert lg["rc"] == 0 and lg["value"] == float(entry.value), value


def test_loadgen_ignores_token_latency_limits_without_use_token_latencies(tmp_path: Path) -> None:
    """Why the parser rejects such lines: LoadGen itself keeps its default limits."""
    without = write(tmp_path, "m.Server.ttft_latency = 10\n", "without.conf")
    with_flag = write(tmp_path, "m.*.use_token_latencies = 1\nm.Server.ttft_latency = 10\n", "with.conf")
    jobs = [
        {"path": str(p), "model": "m", "scenario": "Server", "attr": "ttft_latency"}
        for p in (without, with_flag)
    ]
    ignored, read = loadgen_read(jobs)
    assert ignored["rc"] == 0 and ignored["value"] == ignored["default"] == 100_000_000  # ns
    assert read["value"] == 10_000_000
