"""Unit tests of harness_fixtures.metrics: parsing, collectors' failure handling, timeline, plots."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# -- helpers -------------------------------------------------------------------------------------


ServeFn = Callable[[int, Callable[[int], str]], str]


def _nvml_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    pynvml.nvmlShutdown()
    return True


# -- Prometheus parsing ----------------------------------------------------------------------------


# -- Prometheus collector over HTTP ----------------------------------------------------------------


# -- base class failure handling -------------------------------------------------------------------


# -- NVML ------------------------------------------------------------------------------------------


class _FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


def _fake_pynvml() -> types.ModuleType:
    """Two GPUs; GPU 1 lacks the energy counter (NOT_SUPPORTED), like pre-Volta boards."""
    nv = types.ModuleType("pynvml")
    energy = {0: 5_000_000}
    calls = {"energy1": 0}
    state = {"load": False}  # tests flip this to emulate a busy GPU

    def total_energy(h: int) -> int:
        if h == 1:
            calls["energy1"] += 1
            raise _FakeNVMLError(3)
        energy[0] += 1000  # 1 J per sample
        return energy[0]

    attrs = {
        "NVMLError": _FakeNVMLError,
        "NVML_ERROR_NOT_SUPPORTED": 3,
        "NVML_ERROR_FUNCTION_NOT_FOUND": 13,
        "NVML_CLOCK_SM": 1,
        "NVML_CLOCK_MEM": 2,
        "NVML_TEMPERATURE_GPU": 0,
        "calls": calls,
        "state": state,
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": lambda: 2,
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetUtilizationRates": lambda h: types.SimpleNamespace(
            gpu=(90 if state["load"] else 3) + h, memory=40
        ),
        "nvmlDeviceGetMemoryInfo": lambda h: types.SimpleNamespace(used=2**30, total=80 * 2**30),
        "nvmlDeviceGetPowerUsage": lambda h: 350_000 if state["load"] else 80_000,
        "nvmlDeviceGetTotalEnergyConsumption": total_energy,
        "nvmlDeviceGetClockInfo": lambda h, c: 1980 if c == 1 else 2619,
        "nvmlDeviceGetTemperature": lambda h, s: 61,
        "nvmlDeviceGetCurrentClocksEventReasons": lambda h: 4,
        "nvmlSystemGetDriverVersion": lambda: "550.54.15",
        "nvmlSystemGetNVMLVersion": lambda: b"12.550.54.15",
        "nvmlSystemGetCudaDriverVersion": lambda: 12040,
        "nvmlDeviceGetName": lambda h: "NVIDIA H100 80GB HBM3",
        "nvmlDeviceGetUUID": lambda h: f"GPU-{h}",
        "nvmlDeviceGetEnforcedPowerLimit": lambda h: 700_000,
    }
    for k, v in attrs.items():
        setattr(nv, k, v)
    return nv


# -- host ------------------------------------------------------------------------------------------


# -- timeline --------------------------------------------------------------------------------------


# -- plots -----------------------------------------------------------------------------------------


# -- tools/gpu_check.py ----------------------------------------------------------------------------
@pytest.mark.skipif(_nvml_present(), reason="NVML works here; the no-GPU exit code is not reachable")
def test_gpu_check_exits_3_without_nvml() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_check.py"), "--duration-s", "8"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.startswith("NVML unavailable (")


def _import_gpu_check() -> types.ModuleType:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("load_moves_gpu, expected_rc", [(True, 0), (False, 1)])
def test_gpu_check_logic_with_fake_gpu(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    load_moves_gpu: bool,
    expected_rc: int,
) -> None:
    """The idle/load/idle analysis, on a fake NVML whose GPU gets busy while the fake load runs."""
    gpu_check = _import_gpu_check()
    fake = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)

    def fake_load(torch: object, seconds: float) -> int:
        fake.state["load"] = load_moves_gpu  # type: ignore[attr-defined]
        time.sleep(seconds)
        fake.state["load"] = False  # type: ignore[attr-defined]
        return 1

    monkeypatch.setattr(gpu_check, "_load_source", lambda: (object(), None))
    monkeypatch.setattr(gpu_check, "_gpu_load", fake_load)
    args = ["--duration-s", "2", "--interval-s", "0.1", "--settle-s", "0.15", "--out", str(tmp_path)]
    rc = gpu_check.main(args)
    out = capsys.readouterr().out
    assert rc == expected_rc, out
    assert (tmp_path / "timeline.csv").exists() and (tmp_path / "gpu.png").exists()
    if expected_rc == 0:
        assert out.rstrip().endswith("PASS")
    else:
        assert "no GPU showed utilization" in out
