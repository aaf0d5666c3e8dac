"""Engines across nodes, from their flags: what the suite starts (the head), how many GPUs of this
node that takes, and the layouts it refuses before any engine starts (a node that serves no HTTP,
a missing rendezvous address, sizes that do not divide over the nodes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from harness_fixtures.config import BenchmarkCase, EngineSpec, node_layout
from harness_fixtures.servers.base import LaunchContext
from harness_fixtures.servers.gpus import Gpu, GpuAllocator, GpuError, check_gpu_needs
from harness_fixtures.servers.launchers import SglangLauncher, VllmLauncher

SGLANG_2_NODES = {"tp-size": 16, "nnodes": 2, "node-rank": 0, "dist-init-addr": "10.0.0.1:5000"}


def case(kind: str, args: dict[str, Any] | list[str], tmp_path: Path, **engine: Any) -> BenchmarkCase:
    exe = tmp_path / "vllm"
    exe.write_text("#!/bin/sh\n")
    return BenchmarkCase.model_validate(
        {
            "name": "m",
            "engine": {"kind": kind, "model": "org/model", "args": args, "executable": str(exe), **engine},
            "dataset": {"path": "d.json"},
            "loadgen_model": {"Offline": "tiny"},
            "scenarios": ["Offline"],
            "source": str(tmp_path / "m.yaml"),
        }
    )


def test_sglang_head_gets_the_multi_node_flags_and_its_share_of_the_gpus(tmp_path: Path) -> None:
    c = case("sglang", SGLANG_2_NODES, tmp_path)
    argv = SglangLauncher().build_argv(LaunchContext(case=c, run_dir=tmp_path), "0.0.0.0", 30000)
    assert argv[argv.index("--nnodes") + 1] == "2"
    assert argv[argv.index("--node-rank") + 1] == "0"
    assert argv[argv.index("--dist-init-addr") + 1] == "10.0.0.1:5000"
    layout = c.engine.nodes()
    assert layout is not None and layout.nodes == 2 and layout.rendezvous == "10.0.0.1:5000"
    assert c.engine.gpu_count() == 8  # tp 16 over 2 nodes: 8 on the head, the node the suite starts
    # the same flags in argv form read the same
    argv_form = ["--tp-size", "16", "--nnodes=2", "--dist-init-addr", "10.0.0.1:5000"]
    assert node_layout("sglang", argv_form) == layout


@pytest.mark.parametrize(
    ("kind", "args", "says"),
    [
        (
            "sglang",
            {**SGLANG_2_NODES, "node-rank": 1},
            "node-rank is 1: the suite starts the head (node rank 0)",
        ),
        ("sglang", {"tp-size": 16, "nnodes": 2}, "dist-init-addr is missing"),
        (
            "sglang",
            {"tp-size": 3, "nnodes": 2, "dist-init-addr": "h:1"},
            "3 GPUs, over nnodes 2, which does not",
        ),
        ("vllm", {"headless": True, "data-parallel-size": 4}, "a headless vLLM serves no HTTP"),
        (
            "vllm",
            ["--data-parallel-size", "4", "--data-parallel-start-rank", "2"],
            "data-parallel-start-rank is '2'",
        ),
        (
            "vllm",
            {"data-parallel-size": 4, "data-parallel-size-local": 2},
            "data-parallel-address is missing",
        ),
        ("vllm", {"tensor-parallel-size": 8, "nnodes": 2}, "master-addr is missing"),
        ("vllm", {"tensor-parallel-size": 8, "nnodes": 0}, "--nnodes is 0; give a whole number >= 1"),
    ],
)
def test_layouts_the_suite_cannot_start_are_refused_when_the_case_loads(
    kind: str, args: Any, says: str, tmp_path: Path
) -> None:
    with pytest.raises(ValidationError, match=says.replace("(", r"\(").replace(")", r"\)")):
        case(kind, args, tmp_path)


def test_vllm_layouts_and_the_gpus_they_take_on_the_head(tmp_path: Path) -> None:
    dp = {
        "tensor-parallel-size": 2,
        "data-parallel-size": 8,
        "data-parallel-size-local": 4,
        "data-parallel-address": "10.0.0.1",
        "data-parallel-rpc-port": 13345,
    }
    layout = node_layout("vllm", dp)
    assert layout is not None and layout.nodes == 2 and layout.rendezvous == "10.0.0.1:13345"
    assert layout.local_gpus == 8  # 2 × 4 local ranks; the 4 other ranks are another node's
    assert "--headless" in layout.others and "--data-parallel-start-rank" in layout.others
    mp = node_layout(
        "vllm", {"tensor-parallel-size": 8, "pipeline-parallel-size": 2, "nnodes": 2, "master-addr": "h"}
    )
    assert mp is not None and mp.local_gpus == 8 and mp.rendezvous == "h"
    ray = node_layout("vllm", {"tensor-parallel-size": 8, "distributed-executor-backend": "ray"})
    assert ray is not None and ray.nodes is None and ray.local_gpus is None
    assert node_layout("vllm", {"tensor-parallel-size": 8}) is None  # one node
    assert node_layout("trtllm", {"tp_size": 8, "nnodes": 1}) is None
    # engine.gpus is checked against the head's share, and says it is the head's
    with pytest.raises(ValidationError, match="= 8 GPUs on the head node"):
        EngineSpec.model_validate({"kind": "vllm", "args": dp, "gpus": 16})
    assert EngineSpec.model_validate({"kind": "vllm", "args": dp, "gpus": 8}).gpu_count() == 8


def test_ray_places_its_workers_so_harness_gpus_refuses_it(tmp_path: Path) -> None:
    c = case("vllm", {"tensor-parallel-size": 8, "distributed-executor-backend": "ray"}, tmp_path)
    pool = GpuAllocator([Gpu(i, f"GPU-{i}") for i in range(8)])
    with pytest.raises(GpuError, match="Ray, not CUDA_VISIBLE_DEVICES, places its workers"):
        check_gpu_needs(pool, [c], None)
    check_gpu_needs(pool, [case("vllm", {"tensor-parallel-size": 8}, tmp_path)], None)  # one node: fine


def test_vllm_argv_for_the_head_of_a_data_parallel_deployment(tmp_path: Path) -> None:
    args = {"data-parallel-size": 4, "data-parallel-size-local": 2, "data-parallel-address": "10.0.0.1"}
    c = case("vllm", args, tmp_path, host="0.0.0.0")
    argv = VllmLauncher().build_argv(LaunchContext(case=c, run_dir=tmp_path), "0.0.0.0", 8000)
    assert argv[argv.index("--data-parallel-size-local") + 1] == "2"
    assert argv[argv.index("--data-parallel-address") + 1] == "10.0.0.1"
    assert "--headless" not in argv
