"""GPU utilization, memory, power, energy, clocks and temperature via NVML (package nvidia-ml-py).

`pynvml` is imported lazily. Without NVML (package missing, no driver, no GPU) the collector reports
"unavailable (<why>)", logs one line and starts no thread. Series are per GPU index i:
`gpu{i}.util_gpu_pct`, `gpu{i}.util_mem_pct`, `gpu{i}.mem_used_mib`, `gpu{i}.power_w`,
`gpu{i}.energy_mj` (driver's cumulative counter), `gpu{i}.sm_clock_mhz`, `gpu{i}.mem_clock_mhz`,
`gpu{i}.temp_c`, `gpu{i}.throttle_reasons` (NVML clock-event bitmask).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from .base import BaseCollector

__all__ = ["MIN_INTERVAL_S", "NvmlCollector", "gpu_series"]

logger = logging.getLogger(__name__)

MIN_INTERVAL_S = 0.1


def gpu_series(series: str) -> tuple[int, str] | None:
    """Split "gpu3.power_w" into (3, "power_w"); None for other series."""
    head, dot, field = series.partition(".")
    if not dot or not head.startswith("gpu") or not head[3:].isdigit():
        return None
    return int(head[3:]), field


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlCollector(BaseCollector):
    """Samples every GPU NVML sees every `interval_s` seconds (at least `MIN_INTERVAL_S`).

    A field a GPU does not support (NVML_ERROR_NOT_SUPPORTED, e.g. energy on older boards) is
    dropped for that GPU after the first try and is not counted as an error.

    :param interval_s: seconds between samples; NVML's utilization counters update every ~1/6 s
        to 1 s depending on the board, so shorter intervals only repeat values.
    :param name: source name in the timeline.
    :raises ValueError: when `interval_s` is below `MIN_INTERVAL_S`.
    """

    def __init__(self, interval_s: float = 1.0, *, name: str = "gpu") -> None:
        if interval_s < MIN_INTERVAL_S:
            raise ValueError(f"NvmlCollector interval_s must be >= {MIN_INTERVAL_S} s, got {interval_s!r}")
        super().__init__(name, interval_s=interval_s, stop_timeout_s=2.0)
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._unsupported: set[tuple[int, str]] = set()
        self._energy_first: dict[int, float] = {}
        self._energy_last: dict[int, float] = {}

    # -- NVML lifetime -----------------------------------------------------------------------
    def _init_nvml(self) -> str | None:
        """Import and initialise NVML; return why not, or None."""
        try:
            import pynvml
        except ImportError as exc:
            return f"pynvml not importable ({exc}); install nvidia-ml-py"
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded ...
            return f"{type(exc).__name__}: {exc}"
        self._nvml = pynvml
        return None

    def probe(self) -> str | None:
        """Why NVML is unusable here (e.g. no driver), or None when it works. Leaves it shut down."""
        if self._nvml is not None:
            return None
        reason = self._init_nvml()
        if reason is None:
            self._shutdown()
        return reason

    def _setup(self) -> str | None:
        reason = self._init_nvml()
        if reason is not None:
            return reason
        nv = self._nvml
        try:
            count = nv.nvmlDeviceGetCount()
            self._handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception as exc:
            self._shutdown()
            return f"{type(exc).__name__}: {exc}"
        if not self._handles:
            self._shutdown()
            return "NVML reports no GPUs"
        return None

    def _shutdown(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None

    def _teardown(self) -> None:
        self._shutdown()

    # -- sampling ----------------------------------------------------------------------------
    def _call(self, i: int, key: str, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args), or None when GPU i does not support it (remembered, not an error)."""
        if (i, key) in self._unsupported:
            return None
        try:
            return fn(*args)
        except self._nvml.NVMLError as exc:
            if getattr(exc, "value", None) in (
                self._nvml.NVML_ERROR_NOT_SUPPORTED,
                self._nvml.NVML_ERROR_FUNCTION_NOT_FOUND,
            ):
                self._unsupported.add((i, key))
                return None
            raise

    def _sample(self) -> Iterable[tuple[str, float]]:
        nv = self._nvml
        # Renamed "clocks event reasons" in newer drivers; the old name still exists in most.
        throttle_fn = (
            getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
            or nv.nvmlDeviceGetCurrentClocksThrottleReasons
        )
        out: list[tuple[str, float]] = []
        for i, h in enumerate(self._handles):
            values: dict[str, float] = {}
            util = self._call(i, "util", nv.nvmlDeviceGetUtilizationRates, h)
            if util is not None:
                values["util_gpu_pct"] = util.gpu
                values["util_mem_pct"] = util.memory
            mem = self._call(i, "mem", nv.nvmlDeviceGetMemoryInfo, h)
            if mem is not None:
                values["mem_used_mib"] = mem.used / 2**20
            power_mw = self._call(i, "power", nv.nvmlDeviceGetPowerUsage, h)
            if power_mw is not None:
                values["power_w"] = power_mw / 1000.0
            energy = self._call(i, "energy", nv.nvmlDeviceGetTotalEnergyConsumption, h)
            if energy is not None:
                values["energy_mj"] = energy
                self._energy_first.setdefault(i, float(energy))
                self._energy_last[i] = float(energy)
            for key, fn, args in (
                ("sm_clock_mhz", nv.nvmlDeviceGetClockInfo, (h, nv.NVML_CLOCK_SM)),
                ("mem_clock_mhz", nv.nvmlDeviceGetClockInfo, (h, nv.NVML_CLOCK_MEM)),
                ("temp_c", nv.nvmlDeviceGetTemperature, (h, nv.NVML_TEMPERATURE_GPU)),
                ("throttle_reasons", throttle_fn, (h,)),
            ):
                v = self._call(i, key, fn, *args)
                if v is not None:
                    values[key] = v
            out += [(f"gpu{i}.{k}", float(v)) for k, v in values.items()]
        return out

    # -- results -----------------------------------------------------------------------------
    def energy_j_total(self) -> float | None:
        """Joules used by all GPUs between the first and last sample, from the driver's energy
        counter; None when no GPU supports it (Volta and newer do)."""
        if not self._energy_last:
            return None
        return sum(self._energy_last[i] - self._energy_first[i] for i in self._energy_last) / 1000.0

    def summary(self) -> dict[str, dict[str, float]]:
        """Per-series stats; `gpu{i}.energy_mj` also carries `delta_j` (energy used in the run)."""
        out = super().summary()
        for i, last in self._energy_last.items():
            key = f"gpu{i}.energy_mj"
            if key in out:
                out[key]["delta_j"] = (last - self._energy_first[i]) / 1000.0
        return out

    def gpu_info(self) -> list[dict[str, Any]]:
        """Static facts per GPU for run metadata: index, name, uuid, driver/CUDA/NVML versions,
        memory total, power limit. [] without NVML. Works before `start()` and after `stop()`."""
        own_init = self._nvml is None
        if own_init and self._init_nvml() is not None:
            return []
        nv = self._nvml
        try:
            driver = _text(nv.nvmlSystemGetDriverVersion())
            nvml_version = _text(nv.nvmlSystemGetNVMLVersion())
            cuda_int = int(nv.nvmlSystemGetCudaDriverVersion())
            cuda = f"{cuda_int // 1000}.{cuda_int % 1000 // 10}"
            info = []
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                entry: dict[str, Any] = {
                    "index": i,
                    "name": _text(nv.nvmlDeviceGetName(h)),
                    "uuid": _text(nv.nvmlDeviceGetUUID(h)),
                    "driver_version": driver,
                    "cuda_driver_version": cuda,
                    "nvml_version": nvml_version,
                    "memory_total_mib": nv.nvmlDeviceGetMemoryInfo(h).total / 2**20,
                }
                with contextlib.suppress(nv.NVMLError):
                    entry["power_limit_w"] = nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0
                info.append(entry)
            return info
        except Exception as exc:  # metadata must not break a run
            logger.warning("NVML gpu_info failed: %s: %s", type(exc).__name__, exc)
            return []
        finally:
            if own_init:
                self._shutdown()
