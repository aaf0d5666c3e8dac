"""A fake `pynvml` module for tests: GPUs with UUIDs, PCI bus ids, MIG instances, an energy counter
that integrates the power the test sets, and NVML errors injected per function and per GPU.

Install it with ``monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(...).module)``.
"""

from __future__ import annotations

import threading
import time
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# nvml.h return codes
NOT_SUPPORTED, NO_PERMISSION, NOT_FOUND, FUNCTION_NOT_FOUND, GPU_IS_LOST, UNKNOWN = 3, 4, 6, 13, 15, 999
ERROR_NAMES = {
    NOT_SUPPORTED: "NotSupported",
    NO_PERMISSION: "NoPermission",
    NOT_FOUND: "NotFound",
    FUNCTION_NOT_FOUND: "FunctionNotFound",
    GPU_IS_LOST: "GpuIsLost",
    UNKNOWN: "Unknown",
}


class NVMLError(Exception):
    """Like pynvml's: the code in `.value`."""

    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value} ({ERROR_NAMES.get(value, '?')})")
        self.value = value


@dataclass
class FakeMig:
    uuid: str
    parent: FakeGpu


@dataclass
class FakeGpu:
    """One GPU. Change its state through `set()` so the energy counter stays the integral of power."""

    uuid: str
    pci_bus_id: str
    name: str = "NVIDIA H100 80GB HBM3"
    power_w: float = 70.0
    util_pct: int = 0
    mem_used_mib: float = 600.0
    mem_total_mib: float = 81559.0
    sm_clock_mhz: int = 1980
    mem_clock_mhz: int = 2619
    max_sm_clock_mhz: int = 1980
    max_mem_clock_mhz: int = 2619
    temp_c: int = 35
    power_limit_w: float = 700.0
    energy_counter: bool = True
    # What the counter reports per true millijoule (1000: a counter in microjoules, a units bug).
    energy_scale: float = 1.0
    mig_mode: tuple[int, int] = (0, 0)
    migs: list[FakeMig] = field(default_factory=list)
    open_error: int | None = None
    # function name -> [code, calls left] (calls left None: every call fails)
    errors: dict[str, list[Any]] = field(default_factory=dict)
    energy_mj: float = 5_000_000.0
    _t: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _accrue(self) -> None:
        now = time.monotonic()
        self.energy_mj += self.power_w * (now - self._t) * 1000.0
        self._t = now

    def set(self, **state: Any) -> None:
        with self._lock:
            self._accrue()
            for k, v in state.items():
                setattr(self, k, v)

    def fail(self, fn_name: str, code: int, times: int | None = None) -> None:
        """Make `fn_name` raise NVMLError(code) on this GPU (`times` calls, or always)."""
        self.errors[fn_name] = [code, times]

    def energy(self) -> int:
        with self._lock:
            self._accrue()
            return int(self.energy_mj * self.energy_scale)


class FakeNvml:
    """The GPUs of one fake machine and the `pynvml` module that exposes them."""

    def __init__(self, gpus: list[FakeGpu], *, throttle_new: bool = True, throttle_old: bool = True) -> None:
        self.gpus = gpus
        self.calls: Counter[tuple[str, str]] = Counter()  # (function, uuid) -> calls
        self.module = self._build(throttle_new, throttle_old)

    def _device_fn(self, name: str, body: Any) -> Any:
        def fn(h: FakeGpu | FakeMig, *args: Any) -> Any:
            gpu = h if isinstance(h, FakeGpu) else h.parent
            self.calls[(name, h.uuid)] += 1
            err = gpu.errors.get(name)
            if err is not None and (err[1] is None or err[1] > 0):
                if err[1] is not None:
                    err[1] -= 1
                raise NVMLError(err[0])
            return body(h, *args)

        return fn

    def _build(self, throttle_new: bool, throttle_old: bool) -> types.ModuleType:
        nv = types.ModuleType("pynvml")

        def handle(i: int) -> FakeGpu:
            if not 0 <= i < len(self.gpus):
                raise NVMLError(2)  # INVALID_ARGUMENT
            g = self.gpus[i]
            if g.open_error is not None:
                raise NVMLError(g.open_error)
            return g

        def mig_handle(g: FakeGpu, k: int) -> FakeMig:
            if k >= len(g.migs):
                raise NVMLError(NOT_FOUND)  # an empty slot
            return g.migs[k]

        def energy(g: FakeGpu) -> int:
            if not g.energy_counter:
                raise NVMLError(NOT_SUPPORTED)
            return g.energy()

        def clock(g: FakeGpu, which: int, kind: str) -> int:
            sm = which == nv.NVML_CLOCK_SM
            if kind == "max":
                return g.max_sm_clock_mhz if sm else g.max_mem_clock_mhz
            return g.sm_clock_mhz if sm else g.mem_clock_mhz

        device = {
            "nvmlDeviceGetUUID": lambda h: h.uuid.encode(),
            "nvmlDeviceGetPciInfo": lambda g: types.SimpleNamespace(busId=g.pci_bus_id.encode()),
            "nvmlDeviceGetName": lambda g: g.name,
            "nvmlDeviceGetUtilizationRates": lambda g: types.SimpleNamespace(
                gpu=g.util_pct, memory=g.util_pct // 2
            ),
            "nvmlDeviceGetMemoryInfo": lambda g: types.SimpleNamespace(
                used=int(g.mem_used_mib * 2**20), total=int(g.mem_total_mib * 2**20)
            ),
            "nvmlDeviceGetPowerUsage": lambda g: int(g.power_w * 1000),
            "nvmlDeviceGetTotalEnergyConsumption": energy,
            "nvmlDeviceGetClockInfo": lambda g, c: clock(g, c, "now"),
            "nvmlDeviceGetMaxClockInfo": lambda g, c: clock(g, c, "max"),
            "nvmlDeviceGetTemperature": lambda g, s: g.temp_c,
            "nvmlDeviceGetEnforcedPowerLimit": lambda g: int(g.power_limit_w * 1000),
            "nvmlDeviceGetMigMode": lambda g: list(g.mig_mode),
            "nvmlDeviceGetMaxMigDeviceCount": lambda g: 7 if g.mig_mode[0] else 0,
            "nvmlDeviceGetMigDeviceHandleByIndex": mig_handle,
        }
        if throttle_new:
            device["nvmlDeviceGetCurrentClocksEventReasons"] = lambda g: 1
        if throttle_old:
            device["nvmlDeviceGetCurrentClocksThrottleReasons"] = lambda g: 1
        for name, body in device.items():
            setattr(nv, name, self._device_fn(name, body))
        attrs: dict[str, Any] = {
            "NVMLError": NVMLError,
            "NVML_ERROR_NOT_SUPPORTED": NOT_SUPPORTED,
            "NVML_ERROR_NO_PERMISSION": NO_PERMISSION,
            "NVML_ERROR_NOT_FOUND": NOT_FOUND,
            "NVML_ERROR_FUNCTION_NOT_FOUND": FUNCTION_NOT_FOUND,
            "NVML_ERROR_GPU_IS_LOST": GPU_IS_LOST,
            "NVML_ERROR_UNKNOWN": UNKNOWN,
            "NVML_CLOCK_SM": 1,
            "NVML_CLOCK_MEM": 2,
            "NVML_TEMPERATURE_GPU": 0,
            "NVML_DEVICE_MIG_ENABLE": 1,
            "nvmlInit": lambda: None,
            "nvmlShutdown": lambda: None,
            "nvmlDeviceGetCount": lambda: len(self.gpus),
            "nvmlDeviceGetHandleByIndex": handle,
            "nvmlSystemGetDriverVersion": lambda: "550.54.15",
            "nvmlSystemGetNVMLVersion": lambda: b"12.550.54.15",
            "nvmlSystemGetCudaDriverVersion": lambda: 12040,
        }
        for k, v in attrs.items():
            setattr(nv, k, v)
        return nv


def machine(n: int = 2, **gpu: Any) -> FakeNvml:
    """n identical GPUs whose NVML index order is NOT PCI bus order (index 0 has the highest bus)."""
    buses = [f"00000000:{0x1A + 0x20 * k:02X}:00.0" for k in range(n)][::-1]
    gpus = [FakeGpu(uuid=uuid(k), pci_bus_id=buses[k], **gpu) for k in range(n)]
    return FakeNvml(gpus)


def uuid(k: int) -> str:
    """The UUID `machine()` gives GPU k."""
    return f"GPU-{k:04x}aaaa-0000-0000-0000-{k:012x}"
