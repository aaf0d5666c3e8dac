"""The NVML collector on a fake NVML (tests/fake_nvml.py): which GPUs, error isolation per field and
per GPU, MIG, the throttle-reasons fallback, and energy over LoadGen's window."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from fake_nvml import (
    FUNCTION_NOT_FOUND,
    GPU_IS_LOST,
    NO_PERMISSION,
    NOT_SUPPORTED,
    UNKNOWN,
    FakeGpu,
    FakeMig,
    FakeNvml,
    machine,
    uuid,
)

from harness_fixtures.metrics.nvml import (
    FIELDS,
    GpuDevice,
    NvmlCollector,
    counter_delta,
    integrate,
    select_gpus,
)
from harness_fixtures.metrics.plots import RunWindow
from harness_fixtures.metrics.telemetry import RunTelemetry


def _run(fake: FakeNvml, monkeypatch: pytest.MonkeyPatch, env: dict[str, str] | None = None) -> NvmlCollector:
    """Start and stop at once: the first tick and the final one, no sleeping."""
    monkeypatch.setitem(sys.modules, "pynvml", fake.module)
    col = NvmlCollector(interval_s=0.1, engine_env=env)
    col.start(time.monotonic_ns())
    col.stop()
    return col


def _fields(col: NvmlCollector, gpu: int) -> set[str]:
    return {s.series.split(".", 1)[1] for s in col.samples() if s.series.startswith(f"gpu{gpu}.")}


# -- which GPUs -------------------------------------------------------------------------------------
# NVML index order != PCI bus order here: NVML 0 sits on bus 0x3B, NVML 1 on 0x1A.
DEVICES = [
    GpuDevice(0, "GPU-aaaa1111", "00000000:3B:00.0", "NVIDIA H100"),
    GpuDevice(1, "GPU-bbbb2222", "00000000:1A:00.0", "NVIDIA H100"),
    GpuDevice(2, "GPU-cccc3333", "00000000:5C:00.0", "NVIDIA H100", ("MIG-dddd4444", "MIG-eeee5555")),
]


def _chosen(env: dict[str, str] | None) -> list[tuple[int, int | None]]:
    return [(g.nvml_index, g.cuda_index) for g in select_gpus(DEVICES, env).gpus]


def test_every_gpu_when_unknown_or_unset() -> None:
    unknown = select_gpus(DEVICES, None)
    assert [g.nvml_index for g in unknown.gpus] == [0, 1, 2] and "unknown" in unknown.basis
    # Unset: the engine sees all; CUDA ordinals are known only under PCI_BUS_ID (then in bus order).
    assert _chosen({}) == [(0, None), (1, None), (2, None)]
    assert _chosen({"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}) == [(1, 0), (0, 1), (2, 2)]


def test_uuids_match_in_the_engines_order_case_and_prefix() -> None:
    sel = select_gpus(DEVICES, {"CUDA_VISIBLE_DEVICES": "GPU-CCCC3333,gpu-aaaa"})
    assert [(g.nvml_index, g.cuda_index, g.uuid) for g in sel.gpus] == [
        (2, 0, "GPU-cccc3333"),
        (0, 1, "GPU-aaaa1111"),
    ]
    assert sel.warnings == () and sel.basis == "CUDA_VISIBLE_DEVICES='GPU-CCCC3333,gpu-aaaa'"


def test_indices_follow_pci_bus_order_not_nvml_order() -> None:
    pci = {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert _chosen(pci) == [(1, 0)]  # CUDA 0 is the lowest bus: NVML index 1
    assert select_gpus(DEVICES, pci).warnings == ()
    default = select_gpus(DEVICES, {"CUDA_VISIBLE_DEVICES": "0"})
    assert [g.nvml_index for g in default.gpus] == [1]
    assert len(default.warnings) == 1 and "assumed PCI bus order" in default.warnings[0]
    mixed = [DEVICES[0], GpuDevice(1, "GPU-x", "00000000:1A:00.0", "NVIDIA L4")]
    assert any("mixes GPU models" in w for w in select_gpus(mixed, {"CUDA_VISIBLE_DEVICES": "1"}).warnings)


def test_empty_list_and_invalid_entries_end_it_like_cuda() -> None:
    assert select_gpus(DEVICES, {"CUDA_VISIBLE_DEVICES": ""}).gpus == ()
    sel = select_gpus(
        DEVICES, {"CUDA_VISIBLE_DEVICES": "GPU-bbbb,GPU-ffff,GPU-aaaa", "CUDA_DEVICE_ORDER": ""}
    )
    assert [g.nvml_index for g in sel.gpus] == [1]
    assert "'GPU-ffff' (position 1) names no GPU" in sel.warnings[0]
    assert [g.nvml_index for g in select_gpus(DEVICES, {"CUDA_VISIBLE_DEVICES": "2,9,0"}).gpus] == [2]


def test_mig_instances_map_to_their_gpu() -> None:
    sel = select_gpus(DEVICES, {"CUDA_VISIBLE_DEVICES": "MIG-eeee5555"})
    assert [(g.nvml_index, g.mig_uuid) for g in sel.gpus] == [(2, "MIG-eeee5555")]
    assert "whole GPU" in sel.warnings[0]
    legacy = select_gpus(DEVICES, {"CUDA_VISIBLE_DEVICES": "MIG-GPU-aaaa1111/1/0"})
    assert [g.nvml_index for g in legacy.gpus] == [0]


def test_collector_watches_only_the_engines_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = machine(4)
    col = _run(fake, monkeypatch, {"CUDA_VISIBLE_DEVICES": uuid(2)})
    assert col.status == "ok"
    assert {s.series.split(".")[0] for s in col.samples()} == {"gpu2"}
    assert _fields(col, 2) == set(FIELDS)
    assert not any(u != uuid(2) for (fn, u) in fake.calls if fn == "nvmlDeviceGetPowerUsage")


def test_engines_gpus_absent_is_unavailable_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    col = _run(machine(2), monkeypatch, {"CUDA_VISIBLE_DEVICES": "GPU-ffffffff"})
    assert col.status.startswith("unavailable (CUDA_VISIBLE_DEVICES='GPU-ffffffff' leaves no GPU to watch")
    assert "names no GPU NVML can read" in col.status and col.samples() == []


# -- error isolation -----------------------------------------------------------------------------------
FIELD_CALLS = {
    "nvmlDeviceGetUtilizationRates": {"util_gpu_pct", "util_mem_pct"},
    "nvmlDeviceGetMemoryInfo": {"mem_used_mib"},
    "nvmlDeviceGetPowerUsage": {"power_w"},
    "nvmlDeviceGetTotalEnergyConsumption": {"energy_mj"},
    "nvmlDeviceGetClockInfo": {"sm_clock_mhz", "mem_clock_mhz"},  # one call per clock
    "nvmlDeviceGetTemperature": {"temp_c"},
    "nvmlDeviceGetCurrentClocksEventReasons": {"throttle_reasons"},
}


@pytest.mark.parametrize("code", [NOT_SUPPORTED, NO_PERMISSION, UNKNOWN, GPU_IS_LOST])
@pytest.mark.parametrize("call", sorted(FIELD_CALLS))
def test_an_error_on_one_field_of_one_gpu_spoils_nothing_else(
    monkeypatch: pytest.MonkeyPatch, call: str, code: int
) -> None:
    fake = machine(2)
    fake.gpus[1].fail(call, code)
    col = _run(fake, monkeypatch, {})
    assert col.status == "ok", col.status  # one GPU is fine, so the collector is
    assert _fields(col, 0) == set(FIELDS)  # the other GPU keeps every field, every tick
    assert len(col.series("gpu0.power_w")) == 2
    issues = col.issues()
    if code == GPU_IS_LOST:
        assert _fields(col, 1) == set() and "lost at" in issues["gpu1"] and "NVML error 15" in issues["gpu1"]
        return
    if call == "nvmlDeviceGetCurrentClocksEventReasons" and code == NOT_SUPPORTED:
        assert _fields(col, 1) == set(FIELDS) and issues == {}  # the older call answered instead
        return
    assert _fields(col, 1) == set(FIELDS) - FIELD_CALLS[call]  # the GPU keeps its other fields
    expected = {NOT_SUPPORTED: "not supported", NO_PERMISSION: "no permission", UNKNOWN: "2 read(s) failed"}
    mine = {k: v for k, v in issues.items() if k.startswith("gpu1.")}
    assert mine and all(v.startswith(expected[code]) for v in mine.values()), issues
    assert not any(k.startswith("gpu0") for k in issues)
    # A field that cannot work is not asked again; a transient error is, every tick.
    per_field = 2 if call == "nvmlDeviceGetClockInfo" else 1
    ticks = 1 if code in (NOT_SUPPORTED, NO_PERMISSION) else 2
    extra = 1 if call == "nvmlDeviceGetCurrentClocksEventReasons" else 0  # the first try, before dropping
    assert fake.calls[(call, uuid(1))] == per_field * ticks + extra


def test_a_gpu_without_permission_is_skipped_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = machine(3)
    fake.gpus[1].open_error = NO_PERMISSION  # device cgroups, Slurm
    col = _run(fake, monkeypatch, None)
    assert col.status == "ok"
    assert [g.nvml_index for g in col.watched] == [0, 2]
    assert "cannot open" in col.issues()["gpu1"] and "NVML error 4" in col.issues()["gpu1"]


def test_every_watched_gpu_lost_is_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = machine(2)
    for g in fake.gpus:
        g.fail("nvmlDeviceGetPowerUsage", GPU_IS_LOST)
    col = _run(fake, monkeypatch, {})
    assert col.status.startswith("failed (every watched GPU was lost") and "NVML error 15" in col.status


def test_throttle_reasons_fall_back_to_the_older_call(monkeypatch: pytest.MonkeyPatch) -> None:
    old_driver = machine(1)
    old_driver.gpus[0].fail("nvmlDeviceGetCurrentClocksEventReasons", FUNCTION_NOT_FOUND)
    col = _run(old_driver, monkeypatch, {})
    assert len(col.series("gpu0.throttle_reasons")) == 2 and col.issues() == {}
    assert old_driver.calls[("nvmlDeviceGetCurrentClocksEventReasons", uuid(0))] == 1
    assert old_driver.calls[("nvmlDeviceGetCurrentClocksThrottleReasons", uuid(0))] == 2
    old_binding = FakeNvml([FakeGpu(uuid(0), "00000000:1A:00.0")], throttle_new=False)
    assert len(_run(old_binding, monkeypatch, {}).series("gpu0.throttle_reasons")) == 2
    neither = _run(
        FakeNvml([FakeGpu(uuid(0), "0:1A:0")], throttle_new=False, throttle_old=False), monkeypatch
    )
    assert neither.status == "ok" and "throttle_reasons" not in _fields(neither, 0)


def test_mig_mode_and_instances_recorded_and_selected(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = machine(2)
    gpu = fake.gpus[1]
    gpu.mig_mode = (1, 1)
    gpu.migs = [FakeMig("MIG-1111", gpu), FakeMig("MIG-2222", gpu)]
    gpu.fail("nvmlDeviceGetUtilizationRates", NOT_SUPPORTED)  # as on a GPU in MIG mode
    monkeypatch.setitem(sys.modules, "pynvml", fake.module)
    info = NvmlCollector().gpu_info()
    assert info[0]["mig_mode"] == {"current": 0, "pending": 0} and "mig_devices" not in info[0]
    assert info[1]["mig_mode"] == {"current": 1, "pending": 1}
    assert info[1]["mig_devices"] == ["MIG-1111", "MIG-2222"]
    assert info[1]["pci_bus_id"] == "00000000:1A:00.0" and info[1]["power_limit_w"] == 700.0
    col = _run(fake, monkeypatch, {"CUDA_VISIBLE_DEVICES": "MIG-2222"})
    assert [(g.nvml_index, g.mig_uuid) for g in col.watched] == [(1, "MIG-2222")]
    assert "power_w" in _fields(col, 1) and "util_gpu_pct" not in _fields(col, 1)


def test_gpu_info_keeps_the_gpus_it_can_read(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = machine(2)
    fake.gpus[0].open_error = NO_PERMISSION
    fake.gpus[1].fail("nvmlDeviceGetEnforcedPowerLimit", NO_PERMISSION)
    monkeypatch.setitem(sys.modules, "pynvml", fake.module)
    info = NvmlCollector().gpu_info()
    assert info[0] == {"index": 0, "error": "NVMLError: NVML error 4 (NoPermission)"}
    assert info[1]["uuid"] == uuid(1) and "power_limit_w" not in info[1]
    assert info[1]["cuda_driver_version"] == "12.4" and info[1]["memory_total_mib"] == 81559.0


# -- energy over a window -------------------------------------------------------------------------------
@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about energy; drawing the figures would take most of their time."""
    import harness_fixtures.metrics.plots as plots

    monkeypatch.setattr(plots, "write_plots", lambda *a, **k: [])


def test_counter_delta_and_integral_interpolate_inside_the_samples() -> None:
    pts = [(0.0, 100.0), (1.0, 110.0), (2.0, 130.0)]
    assert counter_delta(pts, 0.5, 1.5) == pytest.approx(120.0 - 105.0)
    assert counter_delta(pts, -0.1, 1.0) is None and counter_delta(pts, 0.0, 2.5) is None
    assert counter_delta([(0.0, 5.0), (1.0, 1.0), (2.0, 3.0)], 0.0, 2.0) is None  # a reset
    power = [(0.0, 100.0), (2.0, 300.0)]
    assert integrate(power, 0.0, 2.0) == pytest.approx(400.0)
    assert integrate(power, 1.0, 2.0) == pytest.approx(250.0)
    assert integrate(power, 1.0, 3.0) is None


def test_j_per_token_counts_only_loadgens_window_and_the_engines_gpus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_plots: None
) -> None:
    """300 W on the engine's GPU during LoadGen's window, 100 W before and after; 250 W on a GPU the
    engine does not use. J/token must be 300 W x the window / tokens."""
    fake = machine(2, power_w=100.0)
    fake.gpus[0].set(power_w=250.0)
    monkeypatch.setitem(sys.modules, "pynvml", fake.module)
    tel = RunTelemetry("http://127.0.0.1:9", None, interval_s=0.1, gpu_env={"CUDA_VISIBLE_DEVICES": uuid(1)})
    t0 = time.monotonic_ns()
    tel.start(t0, os.getpid())
    time.sleep(0.25)
    fake.gpus[1].set(power_w=300.0)
    start = (time.monotonic_ns() - t0) / 1e9
    time.sleep(0.4)
    end = (time.monotonic_ns() - t0) / 1e9
    fake.gpus[1].set(power_w=100.0)
    time.sleep(0.25)
    tel.stop()
    out = tel.finish(tmp_path, [], 600, None, RunWindow(loadgen=(start, end)))
    expected = 300.0 * (end - start)
    # Linear interpolation between 0.1-s samples smears each power step over at most one interval:
    # within 200 W x 0.1 s. Counting the whole run (~170 J) or the other GPU (+~225 J) is far outside.
    assert out.gpu_energy_j is not None and abs(out.gpu_energy_j - expected) <= 20.0
    assert out.energy_j_per_output_token == pytest.approx(out.gpu_energy_j / 600, rel=1e-3)
    assert out.energy_window_s == [start, end] and out.energy_note is None
    assert out.gpu is not None and [w.uuid for w in out.gpu.watched] == [uuid(1)]
    assert out.gpu.watched[0].energy_source == "counter" and out.gpu.selection.startswith("CUDA_VISIBLE")


def test_energy_from_power_without_a_counter_and_none_without_a_window(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_plots: None
) -> None:
    fake = machine(1, power_w=200.0, energy_counter=False)
    monkeypatch.setitem(sys.modules, "pynvml", fake.module)
    tel = RunTelemetry("http://127.0.0.1:9", None, interval_s=0.1, gpu_env={})
    t0 = time.monotonic_ns()
    tel.start(t0, os.getpid())
    time.sleep(0.35)
    tel.stop()
    joined = tel.finish(tmp_path, [], 10, None, RunWindow(loadgen=(0.1, 0.3)))
    assert joined.gpu_energy_j == pytest.approx(200.0 * 0.2, rel=1e-6)
    assert joined.gpu is not None and joined.gpu.watched[0].energy_source == "power_integral"
    unknown = tel.finish(tmp_path, [], 10, None, None)
    assert unknown.gpu_energy_j is None and unknown.energy_j_per_output_token is None
    assert unknown.energy_note is not None and "window is unknown" in unknown.energy_note
    outside = tel.finish(tmp_path, [], 10, None, RunWindow(loadgen=(0.1, 99.0)))
    assert outside.gpu_energy_j is None and "do not cover the window" in (outside.energy_note or "")
