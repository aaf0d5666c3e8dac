"""Every test gets LoadGen's built-in mlperf.conf plus user.conf, as a standalone MLPerf run does.

LoadGen loads mlperf.conf only on the first ``FromConfig`` of a process, so two tests sharing a process
would differ: the second would lack every value that comes only from mlperf.conf. The harness runs each
test in its own LoadGen process; two scenarios back to back in one session must both show those values.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harness_fixtures.loadgen.mllog import parse_mllog
from harness_fixtures.loadgen.userconf import parse_user_conf

if TYPE_CHECKING:
    from support import HarnessProject

# Short runs; none of these keys is one checked below.
USER_CONF = """\
llama3_1-8b.*.performance_sample_count_override = 16
llama3_1-8b.Offline.target_qps = 100
llama3_1-8b.Offline.min_duration = 200
llama3_1-8b.Offline.min_query_count = 1
llama3_1-8b.Server.target_qps = 40
llama3_1-8b.Server.min_duration = 300
llama3_1-8b.Server.min_query_count = 10
llama3_1-8b.Server.target_latency_percentile = 50
"""

# Values that only LoadGen's built-in mlperf.conf sets for llama3_1-8b (LoadGen's defaults differ).
MLPERF_CONF_ONLY: dict[str, Any] = {
    "requested_sample_concatenate_permutation": True,  # llama3_1-8b.*.sample_concatenate_permutation = 1
    "requested_qsl_rng_seed": 2085463073848966840,  # *.*.qsl_rng_seed
    "requested_sample_index_rng_seed": 2747215439041700203,
    "requested_schedule_rng_seed": 16159082839903944936,
}
MLPERF_CONF_ONLY_SERVER: dict[str, Any] = {
    "requested_server_ttft_latency": 2_000_000_000,  # llama3_1-8b.Server.ttft_latency = 2000 (ms)
    "requested_server_tpot_latency": 100_000_000,  # llama3_1-8b.Server.tpot_latency = 100
    "requested_server_target_latency_ns": 0,  # llama3_1-8b.Server.target_latency = 0
}
CONF_KEYS = {"sample_concatenate_permutation", "qsl_rng_seed", "sample_index_rng_seed", "schedule_rng_seed",
             "ttft_latency", "tpot_latency", "target_latency"}  # fmt: skip

# What two FromConfig calls in ONE process give (the failure this file guards against).
SAME_PROCESS = """
import json, sys, mlperf_loadgen as lg
out = []
for _ in range(2):
    s = lg.TestSettings()
    rc = s.FromConfig(sys.argv[1], "llama3_1-8b", "Server", 1)
    out.append([rc, s.sample_concatenate_permutation, s.qsl_rng_seed, s.ttft_latency, s.tpot_latency,
                s.server_target_latency_ns])
print(json.dumps(out))
"""


def test_checked_values_tell_a_shared_process_apart(tmp_path: Path) -> None:
    conf = tmp_path / "user.conf"
    conf.write_text(USER_CONF)
    assert not {e.key for e in parse_user_conf(conf)} & CONF_KEYS  # they come from mlperf.conf only
    proc = subprocess.run(
        [sys.executable, "-c", SAME_PROCESS, str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    first, second = json.loads(proc.stdout.strip().splitlines()[-1])
    assert first == [0, True, 2085463073848966840, 2_000_000_000, 100_000_000, 0]
    # The second load in the same process misses every one of them.
    assert second[0] == 0
    assert second[1] is False and second[2] != first[2] and second[3] != first[3] and second[5] != first[5]


@pytest.mark.slow
def test_back_to_back_tests_each_get_mlperf_conf(harness_project: HarnessProject) -> None:
    harness_project.model("llama", ("Offline", "Server"), loadgen_model="llama3_1-8b")
    harness_project.user_conf(USER_CONF)

    harness_project.run().assert_outcomes(passed=2)

    (session,) = harness_project.session_dirs()
    for test_id in ("llama_offline", "llama_server"):  # run in this order, in one pytest process
        detail = session / test_id / "mlperf" / "mlperf_log_detail.txt"
        values, errors = parse_mllog(detail)
        assert values["requested_scenario"] == test_id.split("_")[1].capitalize()
        expected = {**MLPERF_CONF_ONLY, **(MLPERF_CONF_ONLY_SERVER if test_id.endswith("server") else {})}
        assert {k: values.get(k) for k in expected} == expected, test_id
        assert "Multiple conf files" not in detail.read_text()
        assert errors == []
        # user.conf was applied on top.
        assert values["requested_performance_sample_count_override"] == 16
        assert values["requested_min_duration_ms"] == (200 if test_id.endswith("offline") else 300)
