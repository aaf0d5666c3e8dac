"""tools/gpu_check.py: its no-NVML exit, and its checks on a fake GPU (tests/fake_nvml.py) whose
readings follow a fake load, both when the telemetry is right and when it is wrong in each way the
checks are there to catch. No GPU is lent to this suite, so the real run is documented, not tested."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
from fake_nvml import FakeGpu, FakeNvml, machine, uuid

REPO = Path(__file__).resolve().parents[2]
# Short phases; the interval and settle time scale them down from the real defaults.
FAST = ["--idle-s", "0.7", "--hold-s", "0.6", "--load-s", "0.9", "--tail-s", "0.3"]
FAST += ["--interval-s", "0.1", "--settle-s", "0.25", "--alloc-mib", "2048", "--no-plots"]


def _nvml_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    pynvml.nvmlShutdown()
    return True


def _gpu_check() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(_nvml_present(), reason="NVML works here; the no-GPU exit code is not reachable")
def test_gpu_check_exits_3_without_nvml() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_check.py"), *FAST],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [proc.stdout.strip()]  # one line, the verdict
    assert proc.stdout.startswith("SKIP: NVML unavailable (")


def test_gpu_check_bad_command_line_is_64(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        _gpu_check().main(["--interval-s", "0.01"])
    assert exit_.value.code == 64 and "--interval-s must be >= 0.1" in capsys.readouterr().err


class FakeLoad:
    """A torch stand-in: the fake GPU's readings do what a real GPU's would under each step."""

    def __init__(self, gpu: FakeGpu, *, util_under_load: int = 100, memory_moves: bool = True) -> None:
        self.gpu = gpu
        self.util_under_load = util_under_load
        self.memory_moves = memory_moves
        self.identity_reported: tuple[str | None, str | None] = (gpu.uuid[len("GPU-") :], gpu.pci_bus_id)
        self.block_mib = 0

    def identity(self) -> tuple[str | None, str | None]:
        return self.identity_reported  # torch's UUID has no "GPU-" prefix

    def prepare(self) -> None:
        self.gpu.set(mem_used_mib=self.gpu.mem_used_mib + 1536)  # context + operands

    def allocate(self, mib: int) -> int:
        self.block_mib = mib
        if self.memory_moves:
            self.gpu.set(mem_used_mib=self.gpu.mem_used_mib + mib + 2)  # + the driver's page tables
        return mib * 2**20

    def release(self) -> None:
        if self.memory_moves:
            self.gpu.set(mem_used_mib=self.gpu.mem_used_mib - self.block_mib - 2)

    def run(self, seconds: float) -> dict[str, Any]:
        idle_power = self.gpu.power_w
        self.gpu.set(util_pct=self.util_under_load, power_w=610.0, temp_c=62)
        time.sleep(seconds)
        self.gpu.set(util_pct=0, power_w=idle_power, temp_c=40)
        return {"dtype": "torch.bfloat16", "iterations": 1000, "output_finite_and_nonzero": True}


def _run(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fake: FakeNvml,
    load: FakeLoad,
    env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
) -> tuple[int, str, dict[str, str]]:
    monkeypatch.setitem(sys.modules, "pynvml", fake.module)
    for k in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        monkeypatch.delenv(k, raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    rc = _gpu_check().main([*FAST, *extra], load_source=lambda n: (load, None))
    out = capsys.readouterr().out
    verdicts = {
        line[5:].split()[0]: line[:4].strip()
        for line in out.splitlines()
        if line.startswith(("ok  ", "FAIL "))
    }
    return rc, out, verdicts


ALL = {"match", "fields", "util", "memory", "power", "energy", "clocks", "sampling"}


def test_gpu_check_passes_when_telemetry_tracks_the_load(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fake = machine(2)  # NVML index order is not PCI order here; cuda:0 is pinned by PCI_BUS_ID
    cuda0 = fake.gpus[1]  # the lower PCI bus
    rc, out, verdicts = _run(
        monkeypatch,
        capsys,
        fake,
        FakeLoad(cuda0),
        {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
        ("--out", str(tmp_path)),
    )
    assert rc == 0, out
    assert verdicts == dict.fromkeys(ALL, "ok"), out
    assert out.rstrip().splitlines()[-1] == "PASS"
    assert f"cuda:0 = NVML 1 {uuid(1)} by UUID" in out
    assert (tmp_path / "timeline.csv").exists()
    # The other GPU was watched too (no CUDA_VISIBLE_DEVICES), but never judged.
    assert fake.calls[("nvmlDeviceGetPowerUsage", uuid(0))] > 0


def test_gpu_check_fails_each_broken_reading(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Utilization stuck low, memory not moving, power above the cap, energy in the wrong unit:
    four checks fail, and the ones whose readings are right still pass."""
    gpu = FakeGpu(uuid(0), "00000000:1A:00.0", power_limit_w=450.0, energy_scale=1000.0)
    rc, out, verdicts = _run(
        monkeypatch, capsys, FakeNvml([gpu]), FakeLoad(gpu, util_under_load=55, memory_moves=False)
    )
    assert rc == 1
    failed = {"util", "memory", "power", "energy"}
    assert verdicts == {name: "FAIL" if name in failed else "ok" for name in ALL}, out
    assert out.rstrip().splitlines()[-1] == "FAIL: util, memory, power, energy"
    ratio = re.search(r"ratio ([0-9.]+)", out)
    assert ratio is not None and 900 < float(ratio.group(1)) < 1100  # wrong unit: off by the factor


def test_gpu_check_fails_when_cuda0_is_not_the_gpu_the_collector_maps(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = machine(2)
    load = FakeLoad(fake.gpus[0])  # torch's cuda:0 is NVML 0 (bus 0x3A) ...
    rc, out, verdicts = _run(monkeypatch, capsys, fake, load, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    # ... but under PCI_BUS_ID, CUDA index 0 is the lower bus: NVML 1 (0x1A). The readings of
    # cuda:0's own GPU are still judged, and are fine.
    assert rc == 1 and verdicts == {name: "FAIL" if name == "match" else "ok" for name in ALL}, out
    assert f"takes CUDA index 0 for {uuid(1)}" in out and out.rstrip().endswith("FAIL: match")
