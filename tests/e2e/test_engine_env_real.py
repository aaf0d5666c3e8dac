"""Tests of harness_fixtures.servers.engine_env: the engine venv's fast path and repairs, the model folder's
build-once and atomic publish, and the error messages.

The unmarked tests run on fakes under tmp_path in well under a second each (no torch, no pip). The
``engine`` tests use the real cache (``$HARNESS_CACHE_DIR`` or ``~/.cache/harness-fixtures``) and
build it on first use, which takes minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from harness_fixtures.servers import engine_env as ee
from harness_fixtures.servers.engine_env import EngineEnv

# -- fakes ------------------------------------------------------------------------------------


_FAKE_PREPARE = textwrap.dedent(
    """
    import argparse, os, pathlib, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--gguf"); p.add_argument("--out")
    a = p.parse_args()
    with open(os.environ["FAKE_PREPARE_COUNTER"], "a") as f:
        f.write("run\\n")
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors").write_bytes(b"weights")
    time.sleep(float(os.environ.get("FAKE_PREPARE_SLEEP", "0")))
    if os.environ.get("HARNESS_PREPARE_FAIL_AFTER_SAVE") == "1":
        print("simulated failure after save", file=sys.stderr)
        sys.exit(3)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (out / name).write_text("{}")
    print("prepared fake")
    """
)


@pytest.fixture
def fake_prepare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Swap prepare_model.py for a torch-free stand-in; returns its run counter file."""
    script = tmp_path / "fake_prepare.py"
    script.write_text(_FAKE_PREPARE)
    counter = tmp_path / "prepare-runs.txt"
    counter.touch()
    monkeypatch.setattr(ee, "PREPARE_SCRIPT", script)
    monkeypatch.setenv("FAKE_PREPARE_COUNTER", str(counter))
    return counter


# -- engine venv ------------------------------------------------------------------------------


def test_cli_check_reports_not_ready(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness_fixtures.servers.engine_env",
            "--cache-dir",
            str(tmp_path),
            "--check",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "NOT READY" in proc.stdout and ee.FIX_HINT in proc.stdout
    assert not (tmp_path / "engines" / ee.ENV_DIRNAME / "bin").exists()  # --check changes nothing


# -- model folder -----------------------------------------------------------------------------


# -- the real engine env (slow; builds into the real cache on first use) ----------------------


@pytest.fixture(scope="module")
def real_env() -> EngineEnv:
    return ee.ensure_engine_env()


@pytest.mark.engine
def test_real_env_second_call_is_fast(real_env: EngineEnv) -> None:
    t0 = time.monotonic()
    logs: list[str] = []
    assert ee.ensure_engine_env(log=logs.append) == real_env
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0, f"no-op ensure_engine_env took {elapsed:.2f} s"
    assert logs == []


@pytest.mark.engine
def test_real_env_imports_vllm_as_cpu(real_env: EngineEnv) -> None:
    code = (
        "import importlib.metadata as m, transformers, vllm, torch; "
        "print(m.version('vllm'), torch.__version__, transformers.__version__)"
    )
    proc = subprocess.run(
        [str(real_env.python), "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **ee.engine_runtime_env()},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    vllm_version, torch_version, _ = proc.stdout.split()[-3:]
    assert vllm_version == f"{ee.VLLM_VERSION}+cpu"
    assert torch_version.startswith(ee.TORCH_VERSION) and "+cpu" in torch_version


@pytest.mark.engine
def test_real_model_folder(real_env: EngineEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = ee.ensure_model(real_env)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert "quantization_config" not in config
    assert (
        "chat_template" in (folder / "tokenizer_config.json").read_text()
        or (folder / "chat_template.jinja").is_file()
    )
    # float32: 135M params x 4 bytes, tied embeddings stored once.
    assert 500e6 < (folder / "model.safetensors").stat().st_size < 600e6

    def no_subprocess(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("ensure_model re-ran the conversion")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert ee.ensure_model(real_env) == folder
