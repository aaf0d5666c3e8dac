"""GPU locks across processes: what xdist workers and concurrent sessions do to each other.

Each child process allocates from the same lock folder as a worker's engine manager would; a barrier
makes them ask at the same moment, and every lease is held until all children have reported, so a
GPU handed out twice would show up as an overlap."""

from __future__ import annotations

import json
import multiprocessing as mp
import multiprocessing.synchronize
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

import pytest
from support import sim_case

from harness_fixtures.servers.base import LaunchContext
from harness_fixtures.servers.gpus import Gpu, acquire
from harness_fixtures.servers.launchers import SimLauncher

CTX = mp.get_context("spawn")  # a fresh interpreter: nothing shared with this process but the folder
POOL = [Gpu(i, f"GPU-fa4e0000-0000-4000-8000-{i:012d}") for i in range(8)]


def hold_two(folder: str, start: Any, done: Any, out: Any) -> None:
    start.wait(timeout=60)
    lease = acquire(POOL, 2, owner="worker", wait_s=30, folder=Path(folder))
    out.put(sorted(g.index for g in lease.gpus))
    done.wait(timeout=60)  # hold until every worker has its set
    lease.release()


def test_four_workers_with_two_gpus_each_get_disjoint_sets(tmp_path: Path) -> None:
    start, done = CTX.Barrier(4), CTX.Event()
    out: Any = CTX.Queue()
    procs = [CTX.Process(target=hold_two, args=(str(tmp_path), start, done, out)) for _ in range(4)]
    for p in procs:
        p.start()
    try:
        sets = [out.get(timeout=60) for _ in procs]
    finally:
        done.set()
        for p in procs:
            p.join(timeout=30)
    assert all(p.exitcode == 0 for p in procs)
    assert all(len(s) == 2 for s in sets)
    assert sorted(i for s in sets for i in s) == list(range(8))  # four disjoint pairs


def session(
    folder: str,
    start: multiprocessing.synchronize.Barrier,
    waiting: multiprocessing.synchronize.Event,
    holding: Synchronized[int],
    most: Synchronized[int],
    out: Any,
) -> None:
    """A session wanting 5 of the 8 GPUs: two such sessions can never hold theirs at once."""
    start.wait(timeout=60)
    lease = acquire(
        POOL, 5, owner="session", wait_s=30, on_wait=lambda _msg: waiting.set(), folder=Path(folder)
    )
    with holding.get_lock():
        holding.value += 1
        most.value = max(most.value, holding.value)
    out.put(sorted(g.index for g in lease.gpus))
    waiting.wait(timeout=30)  # the first holder keeps its GPUs until the other one is seen waiting
    with holding.get_lock():
        holding.value -= 1
    lease.release()


def test_two_concurrent_sessions_never_hold_a_gpu_at_once(tmp_path: Path) -> None:
    start, waiting = CTX.Barrier(2), CTX.Event()
    holding, most = CTX.Value("i", 0), CTX.Value("i", 0)
    out: Any = CTX.Queue()
    procs = [
        CTX.Process(target=session, args=(str(tmp_path), start, waiting, holding, most, out))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    sets = [out.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert all(p.exitcode == 0 for p in procs)
    assert waiting.is_set()  # one session really waited for the other
    assert most.value == 1  # never both at once, although each set needs 5 of the 8
    assert all(len(s) == 5 for s in sets)


def test_the_engine_process_gets_exactly_its_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher puts the lease's CUDA_VISIBLE_DEVICES over the suite's own (a real simulator
    process reports what it got), and the endpoint carries it for telemetry and metadata."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")  # what pytest itself was given
    lease = acquire(POOL, 2, owner="engine for simcase", wait_s=1, folder=tmp_path / "locks")
    launcher = SimLauncher()
    ctx = LaunchContext(case=sim_case(tmp_path), run_dir=tmp_path / "engine", gpu_env=lease.env())
    endpoint = launcher.start(ctx)
    try:
        answer = ctx.http_config().get(endpoint.server_url(), "/sim/env", timeout_s=10)
        seen = json.loads(answer.text)
    finally:
        launcher.stop(endpoint)
        lease.release()
    want = f"{POOL[0].uuid},{POOL[1].uuid}"
    assert seen["CUDA_VISIBLE_DEVICES"] == want
    assert seen["pid"] == endpoint.pid
    assert endpoint.gpu_env == {"CUDA_VISIBLE_DEVICES": want}
    assert f"CUDA_VISIBLE_DEVICES={want!r}" in (tmp_path / "engine" / "engine.log").read_text()
