"""A multi-node engine's head, started by the suite, answers only once its other nodes have joined.

The head is a stand-in for SGLang's ``launch_server`` (run as ``python -m sglang.launch_server``, as
the launcher does): it reads the multi-node flags, waits at ``--dist-init-addr`` for the other
``--nnodes - 1`` nodes to connect, as SGLang's rank 0 waits for its peers, then serves through the
simulator. The other node is this test, connecting as a rank-1 node would."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from harness_fixtures.config import BenchmarkCase
from harness_fixtures.servers.base import EngineError, LaunchContext
from harness_fixtures.servers.launchers import SglangLauncher
from harness_fixtures.servers.process import free_port

HEAD = """\
import argparse, os, socket, sys

p = argparse.ArgumentParser()
for flag in ("--model-path", "--host", "--port", "--served-model-name", "--dist-init-addr"):
    p.add_argument(flag)
p.add_argument("--nnodes", type=int, default=1)
p.add_argument("--node-rank", type=int, default=0)
a, _ = p.parse_known_args()
host, port = a.dist_init_addr.rsplit(":", 1)
with socket.create_server((host, int(port))) as rendezvous:
    print(f"node 0 of {a.nnodes}: waiting at {a.dist_init_addr}", flush=True)
    for joined in range(1, a.nnodes):
        peer, _ = rendezvous.accept()
        print(f"node {peer.recv(16).decode()} joined", flush=True)
        peer.close()
sim = [sys.executable, "-m", "harness_fixtures.sim", "--host", a.host, "--port", a.port]
os.execv(sys.executable, sim + ["--served-model-name", a.served_model_name])
"""


def head_case(tmp_path: Path, rendezvous: int, start_timeout_s: float) -> BenchmarkCase:
    package = tmp_path / "fake" / "sglang"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "launch_server.py").write_text(HEAD)
    path = os.pathsep.join([str(tmp_path / "fake"), *sys.path])
    return BenchmarkCase.model_validate(
        {
            "name": "big",
            "engine": {
                "kind": "sglang",
                "model": "org/big",
                "executable": sys.executable,
                "start_timeout_s": start_timeout_s,
                "stop_timeout_s": 5,
                "env": {"PYTHONPATH": path},
                "args": {
                    "tp-size": 2,
                    "nnodes": 2,
                    "node-rank": 0,
                    "dist-init-addr": f"127.0.0.1:{rendezvous}",
                },
            },
            "dataset": {"path": "d.json"},
            "loadgen_model": {"Offline": "tiny"},
            "scenarios": ["Offline"],
            "source": str(tmp_path / "big.yaml"),
        }
    )


def test_the_head_is_healthy_only_after_the_other_node_joined(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    case = head_case(tmp_path, port, start_timeout_s=60)
    joined_at: list[float] = []

    def other_node() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    joined_at.append(time.monotonic())
                    s.sendall(b"1")
                    return
            except OSError:
                time.sleep(0.1)  # the head is not listening yet: a node retries, as SGLang's do

    node = threading.Thread(target=other_node, daemon=True)
    node.start()
    launcher = SglangLauncher()
    endpoint = launcher.start(LaunchContext(case=case, run_dir=tmp_path / "run"))
    try:
        healthy_at = time.monotonic()
        node.join(5)
        assert joined_at and joined_at[0] < healthy_at  # it could not answer before the node joined
        log = endpoint.log_path.read_text() if endpoint.log_path else ""
        assert f"node 0 of 2: waiting at 127.0.0.1:{port}" in log and "node 1 joined" in log
        assert endpoint.argv[endpoint.argv.index("--nnodes") + 1] == "2"
    finally:
        launcher.stop(endpoint)
    assert (
        not psutil.pid_exists(endpoint.pid) or psutil.Process(endpoint.pid).status() == psutil.STATUS_ZOMBIE
    )


def test_a_node_that_never_joins_fails_the_start_naming_the_nodes_and_the_address(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    case = head_case(tmp_path, port, start_timeout_s=3)
    with pytest.raises(EngineError) as exc:
        SglangLauncher().start(LaunchContext(case=case, run_dir=tmp_path / "run"))
    text = str(exc.value)
    assert "engine not healthy after 3 s" in text
    assert (
        f"SGLang across 2 nodes: the head serves only once all 2 nodes have joined at 127.0.0.1:{port}"
        in text
    )
    assert "--node-rank 1..1" in text
    assert f"node 0 of 2: waiting at 127.0.0.1:{port}" in text  # the head's log tail
    with pytest.raises(OSError):  # the head was stopped: nothing listens for nodes any more
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
