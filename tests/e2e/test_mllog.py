"""MLLOG parsing (harness_fixtures.loadgen.mllog) on real LoadGen logs.

The logs come from tiny LoadGen runs with a do-nothing SUT (module fixture, one subprocess): every
sample answers with N_TOKENS tokens, so the numbers LoadGen logs can be checked against what the SUT
did and against LoadGen's own human-readable summary.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness_fixtures.loadgen.mllog import LoadGenRun, MllogError, invalid_constraints, parse_mllog


def metrics_from_mllog(values: dict[str, Any]) -> dict[str, Any]:
    run = LoadGenRun(values)
    return {
        "samples_per_s": run.samples_per_s,
        "tokens_per_s": run.tokens_per_s,
        "ttft_ms": run.ttft_ms,
        "tpot_ms": run.tpot_ms,
        "latency_ms": run.latency_ms,
        "settings": run.settings,
    }


def latency_limits(values: dict[str, Any]) -> tuple[dict[str, float] | None, float | None]:
    return LoadGenRun(values).latency_limits()


N_TOKENS = 5
OFFLINE_DELAY_S = 0.3

GENERATOR = f"""
import array, sys, threading
from pathlib import Path
import mlperf_loadgen as lg

out = Path(sys.argv[1])
keep = []


def respond(samples, n_tokens):
    for s in samples:
        buf = array.array("i", range(n_tokens))
        keep.append(buf)
        ptr, n = buf.buffer_info()
        lg.FirstTokenComplete([lg.QuerySampleResponse(s.id, ptr, buf.itemsize)])
        lg.QuerySamplesComplete([lg.QuerySampleResponse(s.id, ptr, n * buf.itemsize, n_tokens)])


def run(name, scenario, delay_s=0.0, n_tokens={N_TOKENS}, **fields):
    settings = lg.TestSettings()
    settings.scenario = getattr(lg.TestScenario, scenario)
    settings.mode = lg.TestMode.PerformanceOnly
    settings.use_token_latencies = True
    for key, value in fields.items():
        setattr(settings, key, value)

    def issue(samples):
        if delay_s:
            threading.Timer(delay_s, respond, [samples, n_tokens]).start()
        else:
            respond(samples, n_tokens)

    sut = lg.ConstructSUT(issue, lambda: None)
    qsl = lg.ConstructQSL(16, 16, lambda s: None, lambda s: None)
    d = out / name
    d.mkdir(parents=True)
    log_out = lg.LogOutputSettings()
    log_out.outdir = str(d)
    log_settings = lg.LogSettings()
    log_settings.log_output = log_out
    log_settings.enable_trace = False
    lg.StartTestWithLogSettings(sut, qsl, settings, log_settings)
    lg.DestroyQSL(qsl)
    lg.DestroySUT(sut)


offline = dict(offline_expected_qps=100, min_duration_ms=200, min_query_count=1)
# Answers after the min duration: VALID.
run("offline", "Offline", delay_s={OFFLINE_DELAY_S}, **offline)
# Answers at once (min duration not met) with 1 token per answer (a LoadGen error each): INVALID.
run("offline_short", "Offline", n_tokens=1, **offline)
server = dict(server_target_qps=1000, min_duration_ms=200, min_query_count=200,
              server_target_latency_percentile=0.9)
run("server", "Server", **server)
# A 1 ns TTFT limit: every query is over it.
run("server_overlatency", "Server", ttft_latency=1, **server)
"""


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mllog")
    subprocess.run([sys.executable, "-c", GENERATOR, str(out)], check=True, timeout=120, capture_output=True)
    return out


def summary_number(run_dir: Path, label: str) -> float:
    """A number from LoadGen's own text summary, e.g. ``Samples per second: 72.5``."""
    text = (run_dir / "mlperf_log_summary.txt").read_text()
    match = re.search(rf"^{re.escape(label)}\s*:\s*(\S+)$", text, re.MULTILINE)
    assert match, f"{label!r} not in the summary"
    return float(match.group(1))


def parsed(run_dir: Path) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    values, errors = parse_mllog(run_dir / "mlperf_log_detail.txt")
    return values, errors, metrics_from_mllog(values)


def test_offline_valid(logs: Path) -> None:
    values, errors, m = parsed(logs / "offline")
    assert values["result_validity"] == "VALID" and errors == []
    assert invalid_constraints(values) == []
    assert m["samples_per_s"] == summary_number(logs / "offline", "Samples per second")
    assert m["tokens_per_s"] == summary_number(logs / "offline", "Tokens per second")
    assert m["tokens_per_s"] == pytest.approx(N_TOKENS * m["samples_per_s"], rel=1e-3)
    # Every answer came OFFLINE_DELAY_S after the one query was issued.
    lat = m["latency_ms"]
    assert OFFLINE_DELAY_S * 1e3 <= lat.p50 <= lat.p90 <= lat.p99 <= lat.max < OFFLINE_DELAY_S * 1e3 + 1000
    assert lat.p50 == round(summary_number(logs / "offline", "50.00 percentile latency (ns)") / 1e6, 3)
    assert m["settings"]["scenario"] == "Offline"
    assert m["settings"]["min_duration_ms"] == 200
    assert m["settings"]["samples_per_query"] == values["result_query_count"] * 22  # 1.1 × 100/s × 0.2 s


def test_server_valid(logs: Path) -> None:
    d = logs / "server"
    values, errors, m = parsed(d)
    assert values["result_validity"] == "VALID" and errors == []
    assert invalid_constraints(values) == []
    assert m["samples_per_s"] == pytest.approx(summary_number(d, "Completed samples per second"), abs=0.01)
    assert m["tokens_per_s"] == summary_number(d, "Completed tokens per second")
    assert m["tokens_per_s"] == pytest.approx(N_TOKENS * m["samples_per_s"], rel=0.05)
    ttft, tpot = m["ttft_ms"], m["tpot_ms"]
    assert ttft.p50 == round(summary_number(d, "50.00 percentile first token latency (ns)") / 1e6, 3)
    assert ttft.p99 == round(summary_number(d, "99.00 percentile first token latency (ns)") / 1e6, 3)
    assert None not in (ttft.p90, ttft.p95, ttft.p99_9, ttft.mean, ttft.max)
    assert ttft.p50 <= ttft.p90 <= ttft.p99 <= ttft.max
    assert tpot.p50 is not None and tpot.p99 is not None and tpot.p50 <= tpot.p99
    # The SUT answers inside the issue callback: far below a millisecond, mostly.
    assert ttft.p50 < 50
    assert m["settings"]["target_qps"] == 1000
    assert m["settings"]["min_query_count"] == 200


def test_invalid_runs_name_the_failed_constraints(logs: Path) -> None:
    values, errors, _ = parsed(logs / "server_overlatency")
    assert values["result_validity"] == "INVALID"
    reasons = invalid_constraints(values)
    assert "latency constraints not met" in reasons
    assert "early stopping not met" in reasons
    (ttft_reason,) = [r for r in reasons if r.startswith("early_stopping_ttft_result:")]
    assert "Run unsuccessful. Processed 200 queries." in ttft_reason  # LoadGen's '*' bullets dropped
    assert "min duration not met" not in reasons

    values, errors, _ = parsed(logs / "offline_short")
    assert values["result_validity"] == "INVALID"
    # LoadGen's own recommendation (result_invalid_reason) follows the failed condition.
    assert invalid_constraints(values) == [
        "min duration not met",
        "Increase expected QPS so the loadgen pre-generates a larger (coalesced) query.",
    ]
    # Each 1-token answer is a LoadGen error record.
    assert len(errors) == 22 and set(errors) == {"error_runtime: Number of tokens need to be greater than 1"}


def test_torn_last_line_keeps_everything_before_it(logs: Path, tmp_path: Path) -> None:
    text = (logs / "server" / "mlperf_log_detail.txt").read_text()
    lines = text.splitlines(keepends=True)
    assert '"key": "num_errors"' in lines[-1]
    torn = tmp_path / "mlperf_log_detail.txt"
    torn.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed mid-write

    values, errors, m = parsed(tmp_path)
    full, _, full_m = parsed(logs / "server")
    assert "num_errors" not in values
    assert values == {k: v for k, v in full.items() if k != "num_errors"}
    assert m == full_m and errors == []


def test_log_without_results_and_missing_log(tmp_path: Path) -> None:
    path = tmp_path / "mlperf_log_detail.txt"
    path.write_text('LoadGen started\n:::MLLOG {"key": "loadgen_version", "value": "6.0.17"}\n')
    values, errors = parse_mllog(path)
    assert values == {"loadgen_version": "6.0.17"} and errors == []
    m = metrics_from_mllog(values)
    assert m["samples_per_s"] is None and m["tokens_per_s"] is None and m["ttft_ms"].p50 is None

    with pytest.raises(MllogError, match="does not exist"):
        parse_mllog(tmp_path / "nothing.txt")


def test_latency_limits_only_for_server(logs: Path) -> None:
    values, _, _ = parsed(logs / "server_overlatency")
    limits, pct = latency_limits(values)
    assert limits is not None and pct == 0.9
    assert limits["ttft"] == 1e-6  # the 1 ns limit, in ms and not rounded to zero
    assert limits["tpot"] == values["requested_server_tpot_latency"] / 1e6 > 0
    assert latency_limits(parsed(logs / "offline")[0]) == (None, None)
    assert latency_limits({**values, "requested_use_token_latencies": False}) == (None, None)
    assert latency_limits({}) == (None, None)
