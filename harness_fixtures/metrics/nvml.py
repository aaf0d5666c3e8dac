"""GPU telemetry through NVML (package nvidia-ml-py): the engine's GPUs only, each field and each GPU
isolated from the others' errors, and the energy over a given window.

`pynvml` is imported lazily. Without NVML (package missing, no driver, no GPU) the collector reports
"unavailable (<why>)", logs one line and starts no thread. Series are per watched GPU, named by its
NVML index i (the index nvidia-smi shows): `gpu{i}.util_gpu_pct`, `gpu{i}.util_mem_pct`,
`gpu{i}.mem_used_mib`, `gpu{i}.power_w`, `gpu{i}.energy_mj` (the driver's cumulative counter),
`gpu{i}.sm_clock_mhz`, `gpu{i}.mem_clock_mhz`, `gpu{i}.temp_c`, `gpu{i}.throttle_reasons` (NVML
clock-event bitmask).

Which GPUs (:func:`select_gpus`): the engine's ``CUDA_VISIBLE_DEVICES`` names them by UUID, MIG
UUID or CUDA index. UUIDs are matched against NVML's. A CUDA index is the position in CUDA's device
order, which is PCI bus order only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; by default CUDA puts the
fastest GPU first, which NVML cannot reproduce, so indices without PCI_BUS_ID are mapped in PCI bus
order and the selection says it assumed so (docs/engines.md, "Which GPUs are measured").

Errors: a field a GPU does not support (NOT_SUPPORTED, FUNCTION_NOT_FOUND, a binding missing from
the installed nvidia-ml-py) or may not read (NO_PERMISSION) is dropped for that GPU; any other error
on one field (UNKNOWN ...) loses that one value; GPU_IS_LOST stops sampling that GPU. None of them
drops the other fields or GPUs of the tick. What happened is in :meth:`NvmlCollector.issues`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .base import BaseCollector

__all__ = [
    "FAKE_GPUS_ENV",
    "FIELDS",
    "MIN_INTERVAL_S",
    "GpuDevice",
    "GpuEnergy",
    "NvmlCollector",
    "Selection",
    "WatchedGpu",
    "counter_delta",
    "fake_devices",
    "gpu_series",
    "integrate",
    "inventory",
    "select_gpus",
]

logger = logging.getLogger(__name__)

MIN_INTERVAL_S = 0.1
FIELDS = (
    "util_gpu_pct",
    "util_mem_pct",
    "mem_used_mib",
    "power_w",
    "energy_mj",
    "sm_clock_mhz",
    "mem_clock_mhz",
    "temp_c",
    "throttle_reasons",
)

# nvml.h return codes; pynvml exports them as NVML_ERROR_*, these are the fallbacks for a module that
# lacks one.
_NOT_SUPPORTED, _NO_PERMISSION, _NOT_FOUND, _FUNCTION_NOT_FOUND, _GPU_IS_LOST = 3, 4, 6, 13, 15


def gpu_series(series: str) -> tuple[int, str] | None:
    """Split "gpu3.power_w" into (3, "power_w"); None for other series."""
    head, dot, fld = series.partition(".")
    if not dot or not head.startswith("gpu") or not head[3:].isdigit():
        return None
    return int(head[3:]), fld


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- which GPUs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuDevice:
    """One GPU NVML can read: what selection matches against."""

    nvml_index: int
    uuid: str | None
    pci_bus_id: str | None = None
    name: str | None = None
    mig_uuids: tuple[str, ...] = ()


# Test hook: HARNESS_FAKE_GPUS=N makes the inventory N fake GPUs (nothing is sampled), so GPU
# allocation and selection can be tested on machines without GPUs.
FAKE_GPUS_ENV = "HARNESS_FAKE_GPUS"


def fake_devices(env: Mapping[str, str] | None = None) -> list[GpuDevice] | None:
    """The fake inventory ``HARNESS_FAKE_GPUS=N`` asks for (N GPUs with fixed fake UUIDs in PCI bus
    order), or None when it is unset.

    :raises ValueError: the variable is not a whole number >= 0.
    """
    text = (os.environ if env is None else env).get(FAKE_GPUS_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise ValueError(f"{FAKE_GPUS_ENV}={text!r} is not a whole number of fake GPUs; unset it or give one")
    return [
        GpuDevice(i, f"GPU-fa4e0000-0000-4000-8000-{i:012d}", f"00000000:{0x10 + i:02X}:00.0", "Fake GPU")
        for i in range(int(text))
    ]


def inventory() -> tuple[list[GpuDevice], str | None]:
    """Every GPU NVML can open (or the fake ones of ``HARNESS_FAKE_GPUS``), and why there are none.

    :raises ValueError: ``HARNESS_FAKE_GPUS`` is not a number.
    """
    fake = fake_devices()
    if fake is not None:
        return fake, None if fake else f"{FAKE_GPUS_ENV}=0"
    collector = NvmlCollector()
    reason = collector._init_nvml()
    if reason is not None:
        return [], reason
    try:
        devices, _ = collector._devices()
    except Exception as exc:  # NVML answered the init but not the listing
        return [], _describe(exc)
    finally:
        collector._shutdown()
    return devices, None if devices else "NVML lists no GPU"


@dataclass(frozen=True)
class WatchedGpu:
    """A GPU the collector samples, and how it relates to the engine."""

    nvml_index: int
    uuid: str | None
    name: str | None
    cuda_index: int | None = None  # the engine's CUDA device ordinal, when known
    mig_uuid: str | None = None  # the MIG instance the engine was given on this GPU


@dataclass(frozen=True)
class Selection:
    """The GPUs to watch, what chose them, and what could make that choice wrong."""

    gpus: tuple[WatchedGpu, ...]
    basis: str
    warnings: tuple[str, ...] = ()


def _pci_key(bus_id: str) -> str:
    # NVML writes "00000000:3B:00.0": fixed-width hex, so the upper-cased text sorts in bus order.
    return bus_id.strip().upper()


def _by_uuid(devices: Sequence[GpuDevice], want: str) -> GpuDevice | None:
    """The device whose UUID equals `want` or, failing that, is the only one starting with it."""
    w = want.lower()
    exact = [d for d in devices if d.uuid and d.uuid.lower() == w]
    if exact:
        return exact[0]
    prefix = [d for d in devices if d.uuid and d.uuid.lower().startswith(w)]
    return prefix[0] if len(prefix) == 1 else None


def select_gpus(devices: Sequence[GpuDevice], env: Mapping[str, str] | None) -> Selection:
    """The engine's GPUs among `devices`, from its environment (None: unknown, watch them all).

    ``CUDA_VISIBLE_DEVICES`` unset: every GPU. Empty: none. Otherwise its comma-separated entries in
    order: ``GPU-<uuid>`` (or a unique prefix), ``MIG-<uuid>`` / ``MIG-GPU-<uuid>/<gi>/<ci>`` (the
    parent GPU is watched: NVML has no per-instance power or energy), or a CUDA index. Like CUDA,
    the first entry that names no device ends the list.
    """
    by_index = sorted(devices, key=lambda d: d.nvml_index)
    if env is None:
        return Selection(
            tuple(WatchedGpu(d.nvml_index, d.uuid, d.name) for d in by_index),
            "every GPU NVML can read (which GPUs the engine uses is unknown; for an external server "
            "set CUDA_VISIBLE_DEVICES in engine.env to say)",
        )
    visible = env.get("CUDA_VISIBLE_DEVICES")
    pci_order = env.get("CUDA_DEVICE_ORDER", "").strip().upper() == "PCI_BUS_ID"
    warnings: list[str] = []
    pci_known = all(d.pci_bus_id for d in devices)
    # CUDA's order with PCI_BUS_ID; without it, the closest NVML can offer (see the warnings below).
    cuda_order = sorted(devices, key=lambda d: _pci_key(d.pci_bus_id or "")) if pci_known else by_index
    if visible is None:
        if pci_order:
            gpus = tuple(WatchedGpu(d.nvml_index, d.uuid, d.name, k) for k, d in enumerate(cuda_order))
        else:
            gpus = tuple(WatchedGpu(d.nvml_index, d.uuid, d.name) for d in by_index)
        return Selection(gpus, "CUDA_VISIBLE_DEVICES unset: the engine sees every GPU", tuple(warnings))
    basis = f"CUDA_VISIBLE_DEVICES={visible!r}"
    entries = [e.strip() for e in visible.split(",")] if visible.strip() else []
    chosen: list[WatchedGpu] = []
    used_index = False
    for pos, entry in enumerate(entries):
        found: GpuDevice | None = None
        mig: str | None = None
        if entry.upper().startswith("MIG-GPU-"):  # the pre-R470 MIG form: MIG-GPU-<uuid>/<gi>/<ci>
            found, mig = _by_uuid(devices, entry[4:].split("/")[0]), entry
        elif entry.upper().startswith("MIG-"):
            mig = entry
            found = next((d for d in devices if entry.lower() in (m.lower() for m in d.mig_uuids)), None)
        elif entry.upper().startswith("GPU-"):
            found = _by_uuid(devices, entry)
        elif entry.isdigit() and int(entry) < len(cuda_order):
            found, used_index = cuda_order[int(entry)], True
        if found is None:
            warnings.append(
                f"CUDA_VISIBLE_DEVICES entry {entry!r} (position {pos}) names no GPU NVML can read; CUDA "
                "ignores it and every entry after it"
            )
            break
        if any(g.nvml_index == found.nvml_index for g in chosen):
            continue  # two MIG instances of one GPU, or a repeated entry: the GPU is watched once
        chosen.append(WatchedGpu(found.nvml_index, found.uuid, found.name, pos, mig))
        if mig is not None:
            warnings.append(
                f"the engine runs on MIG instance {mig} of GPU {found.nvml_index}: NVML reports power, "
                "energy, clocks and temperature for the whole GPU, shared by all its instances"
            )
    if used_index and not pci_known:
        warnings.append("NVML gave no PCI bus id for some GPUs: CUDA indices mapped in NVML index order")
    if used_index and not pci_order:
        warnings.append(
            "CUDA indices without CUDA_DEVICE_ORDER=PCI_BUS_ID: CUDA numbers the fastest GPU first, "
            "which NVML cannot reproduce; assumed PCI bus order. Set CUDA_DEVICE_ORDER=PCI_BUS_ID or "
            "give GPU UUIDs to be sure"
        )
        if len({d.name for d in devices}) > 1:
            warnings.append("this machine mixes GPU models, so the assumed order is likely wrong")
    return Selection(tuple(chosen), basis, tuple(warnings))


# -- energy over a window ----------------------------------------------------------------------------
def _at(points: Sequence[tuple[float, float]], t: float) -> float | None:
    """The value at time t, linear between the samples around it; None outside the samples."""
    if not points or t < points[0][0] or t > points[-1][0]:
        return None
    for (t0, v0), (t1, v1) in itertools.pairwise(points):
        if t0 <= t <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
    return points[-1][1] if t == points[-1][0] else None


def counter_delta(points: Sequence[tuple[float, float]], start: float, end: float) -> float | None:
    """Increase of a cumulative counter over [start, end], interpolated between its samples; None
    when the samples do not cover the window or the counter went backwards inside it (a reset)."""
    a, b = _at(points, start), _at(points, end)
    if a is None or b is None or end < start:
        return None
    inside = [v for t, v in points if start <= t <= end]
    series = [a, *inside, b]
    if any(y < x for x, y in itertools.pairwise(series)):
        return None
    return b - a


def integrate(points: Sequence[tuple[float, float]], start: float, end: float) -> float | None:
    """∫ value dt over [start, end] (trapezoids between samples); None when they do not cover it."""
    a, b = _at(points, start), _at(points, end)
    if a is None or b is None or end < start:
        return None
    knots = [(start, a), *((t, v) for t, v in points if start < t < end), (end, b)]
    return sum((t1 - t0) * (v0 + v1) / 2 for (t0, v0), (t1, v1) in itertools.pairwise(knots))


@dataclass(frozen=True)
class GpuEnergy:
    """Energy one watched GPU used over a window, and how it was measured."""

    nvml_index: int
    joules: float | None
    source: Literal["counter", "power_integral"] | None
    note: str | None = None


# -- the collector -----------------------------------------------------------------------------------
def _call_with_constant(nv: Any, fn_name: str, h: Any, constant: str) -> Any:
    """nv.<fn_name>(h, nv.<constant>); a constant missing from the module is an AttributeError."""
    return getattr(nv, fn_name)(h, getattr(nv, constant))


# Renamed "clocks event reasons" in newer NVML; drivers without the new symbol answer FUNCTION_NOT_FOUND.
_THROTTLE_CALLS = ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons")


class _GpuLost(Exception):
    pass


@dataclass
class _Gpu:
    watch: WatchedGpu
    handle: Any
    dropped: set[str] = field(default_factory=set)
    lost: str | None = None
    throttle: Callable[..., Any] | None = None


class NvmlCollector(BaseCollector):
    """Samples the engine's GPUs every `interval_s` seconds (at least `MIN_INTERVAL_S`).

    :param interval_s: seconds between samples; NVML's utilization counters update every ~1/6 s
        to 1 s depending on the board, so shorter intervals only repeat values.
    :param name: source name in the timeline.
    :param engine_env: the engine's environment (its ``CUDA_VISIBLE_DEVICES`` and
        ``CUDA_DEVICE_ORDER`` choose the GPUs, :func:`select_gpus`); None watches every GPU.
    :raises ValueError: when `interval_s` is below `MIN_INTERVAL_S`.
    """

    def __init__(
        self, interval_s: float = 1.0, *, name: str = "gpu", engine_env: Mapping[str, str] | None = None
    ) -> None:
        if interval_s < MIN_INTERVAL_S:
            raise ValueError(f"NvmlCollector interval_s must be >= {MIN_INTERVAL_S} s, got {interval_s!r}")
        super().__init__(name, interval_s=interval_s, stop_timeout_s=2.0)
        self.engine_env = None if engine_env is None else dict(engine_env)
        self._nvml: Any = None
        self._gpus: list[_Gpu] = []
        self._selection: Selection | None = None
        self._issues: dict[str, str] = {}
        self._transient: dict[str, tuple[int, str]] = {}  # key -> (count, first error)
        self._ticks_with_samples = 0
        self.sample_durations_s: list[float] = []

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

    def _code(self, name: str, default: int) -> int:
        value = getattr(self._nvml, name, default)
        return value if isinstance(value, int) else default

    def _error_kind(self, exc: BaseException) -> str:
        """unsupported | no_permission | lost | other, for one failed NVML call."""
        if isinstance(exc, AttributeError):
            return "unsupported"  # the installed nvidia-ml-py has no such binding
        value = getattr(exc, "value", None)
        if value in (
            self._code("NVML_ERROR_NOT_SUPPORTED", _NOT_SUPPORTED),
            self._code("NVML_ERROR_FUNCTION_NOT_FOUND", _FUNCTION_NOT_FOUND),
        ):
            return "unsupported"
        if value == self._code("NVML_ERROR_NO_PERMISSION", _NO_PERMISSION):
            return "no_permission"
        if value == self._code("NVML_ERROR_GPU_IS_LOST", _GPU_IS_LOST):
            return "lost"
        return "other"

    def _try(self, nv: Any, fn_name: str, *args: Any) -> Any:
        """nv.<fn_name>(*args), or None when NVML (or the binding) refuses; for facts that are only
        nice to have."""
        try:
            return getattr(nv, fn_name)(*args)
        except (AttributeError, nv.NVMLError):
            return None

    def _text(self, nv: Any, fn_name: str, *args: Any) -> str | None:
        value = self._try(nv, fn_name, *args)
        return None if value is None else _text(value)

    def _pci_bus_id(self, h: Any) -> str | None:
        pci = self._try(self._nvml, "nvmlDeviceGetPciInfo", h)
        bus_id = getattr(pci, "busId", None)
        return None if bus_id is None else _text(bus_id)

    def _devices(self) -> tuple[list[GpuDevice], dict[int, Any]]:
        """Every GPU NVML can open; those it cannot are noted in issues, not fatal."""
        nv = self._nvml
        devices: list[GpuDevice] = []
        handles: dict[int, Any] = {}
        for i in range(int(nv.nvmlDeviceGetCount())):
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
            except nv.NVMLError as exc:  # NO_PERMISSION under device cgroups or Slurm, GPU_IS_LOST ...
                self._issues[f"gpu{i}"] = f"cannot open ({_describe(exc)}); not watched"
                continue
            handles[i] = h
            uuid = self._text(nv, "nvmlDeviceGetUUID", h)
            pci = self._pci_bus_id(h)
            name = self._text(nv, "nvmlDeviceGetName", h)
            devices.append(GpuDevice(i, uuid, pci, name, tuple(self._mig_uuids(h))))
        return devices, handles

    def _mig_uuids(self, h: Any) -> list[str]:
        """UUIDs of the MIG instances on a GPU in MIG mode; [] otherwise or where NVML cannot say."""
        nv = self._nvml
        mode = self._try(nv, "nvmlDeviceGetMigMode", h)
        if not mode or int(mode[0]) != self._code("NVML_DEVICE_MIG_ENABLE", 1):
            return []
        out = []
        for k in range(int(self._try(nv, "nvmlDeviceGetMaxMigDeviceCount", h) or 0)):
            mig = self._try(nv, "nvmlDeviceGetMigDeviceHandleByIndex", h, k)  # empty slot: None
            uuid = None if mig is None else self._text(nv, "nvmlDeviceGetUUID", mig)
            if uuid:
                out.append(uuid)
        return out

    def _setup(self) -> str | None:
        try:
            fake = fake_devices()
        except ValueError as exc:
            return str(exc)
        if fake is not None:
            # The selection is made as on real GPUs (metadata says which were watched); there is
            # nothing to sample.
            self._selection = select_gpus(fake, self.engine_env)
            watched = ", ".join(str(g.nvml_index) for g in self._selection.gpus) or "none"
            return f"fake GPUs ({FAKE_GPUS_ENV}={len(fake)}): nothing to sample; selected: {watched}"
        reason = self._init_nvml()
        if reason is not None:
            return reason
        try:
            devices, handles = self._devices()
        except Exception as exc:
            self._shutdown()
            return _describe(exc)
        sel = select_gpus(devices, self.engine_env)
        self._selection = sel
        for w in sel.warnings:
            logger.warning("GPU selection: %s", w)
        if not sel.gpus:
            self._shutdown()
            unreadable = "; ".join(f"{k}: {v}" for k, v in self._issues.items())
            why = f"{sel.basis} leaves no GPU to watch"
            return (
                why
                + (f" ({'; '.join(sel.warnings)})" if sel.warnings else "")
                + (f"; unreadable: {unreadable}" if unreadable else "")
            )
        self._gpus = [_Gpu(w, handles[w.nvml_index]) for w in sel.gpus]
        return None

    def _shutdown(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None

    def _teardown(self) -> None:
        self._shutdown()

    # -- sampling ----------------------------------------------------------------------------
    def _read(self, gpu: _Gpu, key: str, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) for one field of one GPU, or None; never lets one field spoil the others."""
        if key in gpu.dropped:
            return None
        try:
            return fn(*args)
        except (AttributeError, self._nvml.NVMLError) as exc:
            where = f"gpu{gpu.watch.nvml_index}.{key}"
            kind = self._error_kind(exc)
            if kind == "lost":
                raise _GpuLost(_describe(exc)) from None
            if kind in ("unsupported", "no_permission"):
                gpu.dropped.add(key)
                word = "not supported" if kind == "unsupported" else "no permission"
                self._issues[where] = f"{word} ({_describe(exc)}); not sampled"
                return None
            count, first = self._transient.get(where, (0, f"{_describe(exc)} at {self._now_s():.1f} s"))
            self._transient[where] = (count + 1, first)
            return None

    def _throttle(self, gpu: _Gpu) -> Any:
        """Clock-event reasons: the current call, else the one it replaced (older drivers)."""
        nv = self._nvml
        if gpu.throttle is None:
            for fn_name in _THROTTLE_CALLS:
                fn = getattr(nv, fn_name, None)
                if fn is None:
                    continue
                try:
                    value = fn(gpu.handle)
                except nv.NVMLError as exc:
                    if self._error_kind(exc) == "unsupported":
                        continue
                    gpu.throttle = fn  # it exists; this error is the GPU's, handled like any field's
                    return self._read(gpu, "throttle_reasons", fn, gpu.handle)
                gpu.throttle = fn
                return value
            gpu.dropped.add("throttle_reasons")
            self._issues[f"gpu{gpu.watch.nvml_index}.throttle_reasons"] = "not supported; not sampled"
            return None
        return self._read(gpu, "throttle_reasons", gpu.throttle, gpu.handle)

    def _sample_gpu(self, gpu: _Gpu) -> dict[str, float]:
        nv, h = self._nvml, gpu.handle
        values: dict[str, float] = {}
        util = self._read(gpu, "util_gpu_pct", nv.nvmlDeviceGetUtilizationRates, h)
        if util is not None:
            values["util_gpu_pct"] = util.gpu
            values["util_mem_pct"] = util.memory
        mem = self._read(gpu, "mem_used_mib", nv.nvmlDeviceGetMemoryInfo, h)
        if mem is not None:
            values["mem_used_mib"] = mem.used / 2**20
        power_mw = self._read(gpu, "power_w", nv.nvmlDeviceGetPowerUsage, h)
        if power_mw is not None:
            values["power_w"] = power_mw / 1000.0  # NVML: milliwatts
        energy = self._read(gpu, "energy_mj", nv.nvmlDeviceGetTotalEnergyConsumption, h)
        if energy is not None:
            values["energy_mj"] = energy  # NVML: millijoules since the driver loaded
        for key, name, arg in (
            ("sm_clock_mhz", "nvmlDeviceGetClockInfo", "NVML_CLOCK_SM"),
            ("mem_clock_mhz", "nvmlDeviceGetClockInfo", "NVML_CLOCK_MEM"),
            ("temp_c", "nvmlDeviceGetTemperature", "NVML_TEMPERATURE_GPU"),
        ):
            v = self._read(gpu, key, _call_with_constant, nv, name, h, arg)
            if v is not None:
                values[key] = v
        reasons = self._throttle(gpu)
        if reasons is not None:
            values["throttle_reasons"] = reasons
        return values

    def _sample(self) -> Iterable[tuple[str, float]]:
        began = time.perf_counter()
        out: list[tuple[str, float]] = []
        for gpu in self._gpus:
            if gpu.lost is not None:
                continue
            i = gpu.watch.nvml_index
            try:
                values = self._sample_gpu(gpu)
            except _GpuLost as exc:
                gpu.lost = f"lost at {self._now_s():.1f} s ({exc}); not sampled after"
                self._issues[f"gpu{i}"] = gpu.lost
                logger.warning("metrics collector %r: GPU %d %s", self.name, i, gpu.lost)
                continue
            out += [(f"gpu{i}.{k}", float(v)) for k, v in values.items()]
        self.sample_durations_s.append(time.perf_counter() - began)
        if out:
            self._ticks_with_samples += 1
        return out

    # -- results -----------------------------------------------------------------------------
    @property
    def status(self) -> str:
        base = super().status
        if base != "ok" or not self._gpus:
            return base
        if all(g.lost is not None for g in self._gpus):
            return (
                "failed (every watched GPU was lost: "
                + "; ".join(f"gpu{g.watch.nvml_index} {g.lost}" for g in self._gpus)
                + ")"
            )
        if self._n_ticks > 0 and self._ticks_with_samples == 0:
            return f"failed (no field could be read; {'; '.join(self.issues().values()) or 'no values'})"
        return "ok"

    @property
    def selection(self) -> Selection | None:
        """The GPUs chosen at start and why; None before start or without NVML."""
        return self._selection

    @property
    def watched(self) -> tuple[WatchedGpu, ...]:
        return () if self._selection is None else self._selection.gpus

    def issues(self) -> dict[str, str]:
        """What went wrong where ("gpu1.power_w", "gpu3"), in words; {} when nothing did."""
        out = dict(self._issues)
        for where, (count, first) in list(self._transient.items()):  # the thread may add one
            out.setdefault(where, f"{count} read(s) failed, first: {first}")
        return out

    def window_energy(self, start_s: float, end_s: float) -> tuple[list[GpuEnergy], float | None]:
        """Per watched GPU, the energy between `start_s` and `end_s` (seconds since t0), and the
        total in joules: None unless every watched GPU has a figure (a partial sum would understate).

        From the driver's energy counter (mJ) where the GPU has one, else from the power samples
        (mW) integrated over the window.
        """
        per_gpu: list[GpuEnergy] = []
        for w in self.watched:
            i = w.nvml_index
            lost = next((g.lost for g in self._gpus if g.watch.nvml_index == i), None)
            energy = self.series(f"gpu{i}.energy_mj")
            if energy:
                mj = counter_delta(energy, start_s, end_s)
                note = None if mj is not None else "the energy samples do not cover the window, or reset"
                per_gpu.append(GpuEnergy(i, None if mj is None else mj / 1000.0, "counter", lost or note))
                continue
            joules = integrate(self.series(f"gpu{i}.power_w"), start_s, end_s)
            note = "no energy counter; power samples integrated"
            if joules is None:
                note = "no energy counter, and the power samples do not cover the window"
            source: Literal["power_integral"] | None = "power_integral" if joules is not None else None
            per_gpu.append(GpuEnergy(i, joules, source, lost or note))
        ok = bool(per_gpu) and all(e.joules is not None for e in per_gpu)
        return per_gpu, (sum(e.joules or 0.0 for e in per_gpu) if ok else None)

    def gpu_info(self) -> list[dict[str, Any]]:
        """Static facts per GPU for run metadata: index, name, uuid, PCI bus id, driver/CUDA/NVML
        versions, memory total, enforced power limit, maximum clocks, MIG mode and instances.

        [] without NVML; a GPU or fact NVML refuses is left out (a GPU that cannot be opened is
        listed with its error). Works before `start()` and after `stop()`."""
        own_init = self._nvml is None
        if own_init and self._init_nvml() is not None:
            return []
        nv = self._nvml
        try:
            driver = self._text(nv, "nvmlSystemGetDriverVersion")
            nvml_version = self._text(nv, "nvmlSystemGetNVMLVersion")
            cuda_int = self._try(nv, "nvmlSystemGetCudaDriverVersion")
            cuda = None if cuda_int is None else f"{int(cuda_int) // 1000}.{int(cuda_int) % 1000 // 10}"
            info: list[dict[str, Any]] = []
            for i in range(int(nv.nvmlDeviceGetCount())):
                try:
                    h = nv.nvmlDeviceGetHandleByIndex(i)
                except nv.NVMLError as exc:
                    info.append({"index": i, "error": _describe(exc)})
                    continue
                entry: dict[str, Any] = {
                    "index": i,
                    "name": self._text(nv, "nvmlDeviceGetName", h),
                    "uuid": self._text(nv, "nvmlDeviceGetUUID", h),
                    "pci_bus_id": self._pci_bus_id(h),
                    "driver_version": driver,
                    "cuda_driver_version": cuda,
                    "nvml_version": nvml_version,
                }
                mem = self._try(nv, "nvmlDeviceGetMemoryInfo", h)
                if mem is not None:
                    entry["memory_total_mib"] = mem.total / 2**20
                limit = self._try(nv, "nvmlDeviceGetEnforcedPowerLimit", h)
                if limit is not None:
                    entry["power_limit_w"] = limit / 1000.0
                max_clocks = {
                    key: self._try(nv, "nvmlDeviceGetMaxClockInfo", h, getattr(nv, const, None))
                    for key, const in (("sm", "NVML_CLOCK_SM"), ("mem", "NVML_CLOCK_MEM"))
                }
                if all(v is not None for v in max_clocks.values()):
                    entry["max_clocks_mhz"] = max_clocks
                mode = self._try(nv, "nvmlDeviceGetMigMode", h)
                if mode:
                    entry["mig_mode"] = {"current": int(mode[0]), "pending": int(mode[1])}
                    migs = self._mig_uuids(h)
                    if migs:
                        entry["mig_devices"] = migs
                info.append({k: v for k, v in entry.items() if v is not None})
            return info
        except Exception as exc:  # metadata must not break a run
            logger.warning("NVML gpu_info failed: %s", _describe(exc))
            return []
        finally:
            if own_init:
                self._shutdown()
