"""Capacity search and the INVALID diagnosis end to end on the simulator, whose batch slots, TTFT and
inter-token latency make the boundary computable: the truth comes from a brute-force grid of short
runs judged the way LoadGen judges a full run (latency limits at the percentile early stopping demands)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import run_pipeline

from harness_fixtures.client.requestlog import read_requests
from harness_fixtures.config import BenchmarkCase
from harness_fixtures.loadgen.capacity import Limits, early_stopping_percentile, isotonic, probe_margins
from harness_fixtures.results import BenchmarkResult
from harness_fixtures.servers import Endpoint

pytestmark = pytest.mark.slow
StartSim = Callable[..., tuple[Endpoint, BenchmarkCase]]

TOKENS = 8
# 4 slots, each request holds one for 20 + 7 × 2 = 34 ms: at most ~118 requests/s, and TTFT grows
# from 20 ms as the slots fill and requests queue.
SIM: dict[str, Any] = {"ttft_base_ms": 20, "itl_ms": 2, "max_batch": 4}


def user_conf(tmp_path: Path, ttft_ms: int = 45, tpot_ms: int = 50) -> Path:
    conf = tmp_path / "user.conf"
    conf.write_text(
        "tiny.*.performance_sample_count_override = 16\n"
        "tiny.*.use_token_latencies = 1\n"
        "tiny.Offline.target_qps = 1000\n"
        "tiny.Offline.min_duration = 200\n"
        "tiny.Offline.min_query_count = 200\n"
        "tiny.Server.min_duration = 1000\n"
        "tiny.Server.min_query_count = 150\n"
        "tiny.Server.target_latency_percentile = 90\n"
        f"tiny.Server.ttft_latency = {ttft_ms}\n"
        f"tiny.Server.tpot_latency = {tpot_ms}\n"
    )
    return conf


PROBE = {"capacity_probe_queries": 150, "capacity_probe_duration_ms": 1000}


def search(
    start_sim: StartSim, tmp_path: Path, sim: dict[str, Any], name: str, **conf: int
) -> BenchmarkResult:
    endpoint, case = start_sim(name=name, max_tokens=TOKENS, **sim)
    return run_pipeline(
        case,
        "Server",
        endpoint,
        tmp_path / name,
        user_conf(tmp_path, **conf),
        find_capacity=True,
        request_timeout_s=30,
        test_timeout_s=120,
        output_dir=tmp_path / "out",
        output_dir_explicit=True,
        **PROBE,
    ).result


def test_search_finds_the_boundary_of_a_known_capacity_and_confirms_it(
    start_sim: StartSim, tmp_path: Path
) -> None:
    result = search(start_sim, tmp_path, SIM, "known")
    cap = result.capacity
    assert cap is not None and cap.found_qps is not None, cap
    assert len(cap.probes) <= 8, cap.probes
    assert cap.binding_constraint == "ttft"
    # The confirmation is a full run at the load found, with the user's settings: the test's result.
    assert result.status == "VALID", (result.reason, result.diagnosis)
    assert result.rate is not None and result.rate.source == "capacity search"
    # At the load found, or, after INVALID full runs, each step below the last: every one recorded,
    # the earlier ones INVALID with their files kept, the last one the test's own run.
    runs = cap.confirmations
    assert 1 <= len(runs) <= 3 and runs[0].qps == pytest.approx(cap.found_qps), runs
    assert result.settings["target_qps"] == pytest.approx(runs[-1].qps)
    assert cap.confirmed_qps == runs[-1].qps and runs[-1].status == "VALID" and runs[-1].dir == "."
    for n, run in enumerate(runs[:-1], 1):
        # folders are written relative to the session folder (here tmp_path)
        assert run.status == "INVALID" and run.dir == f"known/confirmation-{n}" and run.margin is not None
        assert (tmp_path / run.dir / "requests.jsonl").is_file()
        assert runs[n].qps < run.qps
    assert Path(str(cap.plot)).is_file()
    # drawn again after the full runs, with them in it
    assert Path(str(cap.plot)).stat().st_mtime >= (tmp_path / "known" / "requests.jsonl").stat().st_mtime

    # --harness-target-qps auto reuses it: same model, engine, hardware and limits, no new search.
    endpoint, case = start_sim(name="known", max_tokens=TOKENS, **SIM)
    reused = run_pipeline(
        case, "Server", endpoint, tmp_path / "auto", user_conf(tmp_path), target_qps_auto=True,
        request_timeout_s=30, test_timeout_s=120, output_dir=tmp_path / "out", output_dir_explicit=True,
    ).result  # fmt: skip
    assert reused.rate is not None and reused.rate.source == "stored capacity", reused.rate
    assert reused.rate.value == cap.confirmed_qps and reused.capacity is None
    assert not (tmp_path / "auto" / "capacity").exists()

    # The truth: a grid of runs as long as a full one here (1 s, 150 queries) at ~6 % steps of the upper
    # bound, each judged as LoadGen judges a full run: TTFT within the limit at the percentile its early
    # stopping demands of that many queries. One unlucky grid point must not decide, so the truth is
    # where the monotone (isotonic) fit of the grid's margins reaches 1.
    endpoint, case = start_sim(name="grid", max_tokens=TOKENS, **SIM)
    conf = user_conf(tmp_path)
    upper = cap.upper_bound_qps
    limits = Limits(ttft_ms=45, tpot_ms=None, percentile=0.9)
    grid = []
    for k in range(6, 19):
        qps = round(upper * k / 18, 3)
        test_dir = tmp_path / f"grid-{k}"
        run_pipeline(
            case, "Server", endpoint, test_dir, conf, target_qps=qps, min_duration_ms=1000,
            min_query_count=150, request_timeout_s=30, test_timeout_s=120,
        )  # fmt: skip
        requests = read_requests(test_dir / "requests.jsonl")
        at = early_stopping_percentile(len(requests), limits.percentile)
        assert at is not None
        grid.append((qps, probe_margins(requests, limits, at)["ttft"] or math.inf))
    fitted = isotonic(grid)
    truth = max((q for q, m in fitted if m <= 1.0), default=None)
    assert truth is not None, grid
    step = upper / 18
    assert abs(cap.found_qps - truth) <= max(0.10 * truth, step), (cap.found_qps, truth, grid, cap.probes)


def test_noisy_engine_still_converges_and_names_the_binding_limit(
    start_sim: StartSim, tmp_path: Path
) -> None:
    result = search(start_sim, tmp_path, {**SIM, "latency_jitter": 0.15, "seed": 3}, "noisy")
    cap = result.capacity
    assert cap is not None and cap.found_qps is not None, cap
    assert cap.binding_constraint == "ttft" and len(cap.probes) <= 10
    assert cap.precision is not None and cap.precision <= 0.10


def test_tpot_bound_engine_names_tpot(start_sim: StartSim, tmp_path: Path) -> None:
    # Decoding slows by 1.5 ms per request already running: TPOT, not TTFT, meets its limit first.
    sim = {**SIM, "itl_per_running_ms": 1.5}
    result = search(start_sim, tmp_path, sim, "tpot", ttft_ms=2000, tpot_ms=5)
    cap = result.capacity
    assert cap is not None and cap.found_qps is not None, cap
    assert cap.binding_constraint == "tpot"
    failed = [p for p in cap.probes if p.verdict == "fail"]
    assert failed and all(p.diagnosis for p in failed)  # every failed probe says why


def test_no_load_passes_below_unloaded_latency(start_sim: StartSim, tmp_path: Path) -> None:
    # TTFT alone is 20 ms: a 10 ms limit cannot be met at any load.
    endpoint, case = start_sim(name="tight", max_tokens=TOKENS, **SIM)
    outcome = run_pipeline(
        case, "Server", endpoint, tmp_path / "tight", user_conf(tmp_path, ttft_ms=10),
        target_qps=20, request_timeout_s=30, test_timeout_s=120,
    )  # fmt: skip
    r = outcome.result
    assert r.status == "INVALID" and r.diagnosis is not None
    assert r.diagnosis.verdict.startswith("latency limit below the engine's unloaded TTFT"), r.diagnosis
    assert "ttft_latency" in r.diagnosis.next_step


def test_overloaded_engine_is_diagnosed_as_saturated(start_sim: StartSim, tmp_path: Path) -> None:
    endpoint, case = start_sim(name="over", max_tokens=TOKENS, **SIM)
    outcome = run_pipeline(
        case, "Server", endpoint, tmp_path / "over", user_conf(tmp_path),
        target_qps=150, request_timeout_s=30, test_timeout_s=120,
    )  # fmt: skip
    r = outcome.result
    assert r.status == "INVALID" and r.diagnosis is not None, r.reason
    assert r.diagnosis.verdict.startswith("engine saturated"), r.diagnosis
    assert r.engine is not None and r.engine.waiting_share is not None and r.engine.waiting_share > 0.1
    assert "queue" in r.engine.histograms and r.engine.histograms["queue"].count > 0
    assert "--harness-find-capacity" in r.diagnosis.next_step
    # The engine's own counters cover LoadGen's window only: no warm-up tokens in them.
    assert r.engine.generation_tokens == r.queries.output_tokens == TOKENS * r.queries.completed
