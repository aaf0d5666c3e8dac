"""Servers across a network make a Network SUT: LoadGen gets a Query Dispatch Library whose name is
"Network SUT" and its nodes' names, each asked over the network (MLPerf's Network division), and the
MLPerf log carries that name."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from support import TINY_SIM, TINY_USER_CONF, run_pipeline

from harness_fixtures.client.httpconfig import HttpConfig, HttpSettings, ServerUrl
from harness_fixtures.config import BenchmarkCase
from harness_fixtures.loadgen.child import run_child
from harness_fixtures.loadgen.runner import network_sut_name
from harness_fixtures.loadgen.spec import RunSpec
from harness_fixtures.servers import Endpoint
from harness_fixtures.servers.process import free_port

StartSim = Callable[..., tuple[Endpoint, BenchmarkCase]]


def sut_name(run_dir: Path) -> str:
    text = (run_dir / "mlperf" / "mlperf_log_detail.txt").read_text()
    found = re.search(r'"key": "sut_name", "value": "([^"]*)"', text)
    assert found, text[:2000]
    return found.group(1)


def test_a_network_sut_is_named_from_its_nodes_answers(start_sim: StartSim, tmp_path: Path) -> None:
    endpoint, case = start_sim(name="net", **TINY_SIM)
    conf = tmp_path / "user.conf"
    conf.write_text(TINY_USER_CONF)
    local = run_pipeline(case, "Offline", endpoint, tmp_path / "local", conf).result
    assert local.status == "VALID"
    assert sut_name(tmp_path / "local") == "PySUT"  # loopback servers the suite started: no Network SUT

    # The same run as the pipeline writes it for servers on other hosts (here: loopback, flagged).
    spec = RunSpec.model_validate_json((tmp_path / "local" / "run_spec.json").read_text())
    assert spec.network_sut is False
    remote = spec.model_copy(update={"network_sut": True, "out_dir": str(tmp_path / "remote")})
    outcome = run_child(remote, endpoint)
    assert outcome.returncode == 0, outcome
    port = ServerUrl.parse(endpoint.base_url).port
    assert sut_name(tmp_path / "remote") == f"Network SUT: 127.0.0.1:{port} (net)"  # the model id it served
    rows = [json.loads(line) for line in (tmp_path / "remote" / "requests.jsonl").read_text().splitlines()]
    assert rows and all(r["status"] == "ok" for r in rows)


def test_a_node_that_does_not_answer_is_named_so() -> None:
    http = HttpConfig.build(HttpSettings(), check_environment=False)
    port = free_port("127.0.0.1")  # nothing listens there
    name = network_sut_name(http, [ServerUrl.parse(f"http://127.0.0.1:{port}")])
    assert name == f"Network SUT: 127.0.0.1:{port} (unreachable: HttpError)"
