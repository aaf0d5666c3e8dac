"""Scaling out, without processes: shard assignment, the --harness-shard/--harness-gpus option syntax,
engine.gpus against the parallel sizes, the fake GPU inventory, GPU locks within one process and the
engine manager's use of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from harness_fixtures.config import BenchmarkCase, EngineSpec, parallel_sizes, shard_of
from harness_fixtures.metrics.nvml import FAKE_GPUS_ENV, NvmlCollector, inventory
from harness_fixtures.options import OPTIONS, HarnessOptions, Option, OptionError
from harness_fixtures.servers.base import Endpoint, EngineError, LaunchContext
from harness_fixtures.servers.gpus import LOCK_DIR_ENV, Gpu, GpuAllocator, GpuError, acquire, resolve_pool
from harness_fixtures.servers.manager import EngineManager


@pytest.fixture(autouse=True)
def _private_locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lock files of these tests never meet another session's (this machine is shared)."""
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "locks"))


def build(**raw: str) -> HarnessOptions:
    def get(opt: Option) -> tuple[Any, Any]:
        value = raw.get(opt.dest[len("harness_") :])
        return (value, "cli") if value is not None else (None, None)

    return HarnessOptions.build(get, Path.cwd(), Path.cwd())


# -- sharding --------------------------------------------------------------------------------------
def test_shards_keep_groups_whole_balanced_and_deterministic() -> None:
    groups = {"delta": 1, "alpha": 5, "charlie": 3, "bravo": 3}
    shards = shard_of(groups, 2)
    # largest first onto the emptier shard: alpha→1 (5), bravo→2 (3), charlie→2 (6), delta→1 (6)
    assert shards == {"alpha": 1, "bravo": 2, "charlie": 2, "delta": 1}
    assert shard_of(dict(reversed(list(groups.items()))), 2) == shards  # input order does not matter
    loads = [sum(n for g, n in groups.items() if shards[g] == k) for k in (1, 2)]
    assert loads == [6, 6]


def test_more_shards_than_models_leaves_shards_empty_not_split() -> None:
    shards = shard_of({"a": 4, "b": 1}, 3)
    assert shards == {"a": 1, "b": 2}


@pytest.mark.parametrize("value", ["0/2", "3/2", "x", "1/0", "2", "1/2/3"])
def test_bad_shard_is_an_option_error_naming_value_and_fix(value: str) -> None:
    with pytest.raises(OptionError) as exc:
        build(shard=value)
    assert "--harness-shard" in str(exc.value)
    assert repr(value) in str(exc.value)
    assert "I/N" in str(exc.value)


def test_shard_parses() -> None:
    assert build(shard="2/4").shard == (2, 4)
    assert build().shard is None


# -- --harness-gpus syntax ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("0,,1", "empty entry"),
        ("0,gpu3", "'gpu3'"),
        ("1,1", "'1' appears twice"),
        ("-1", "'-1'"),
    ],
)
def test_bad_gpus_is_an_option_error(value: str, says: str) -> None:
    with pytest.raises(OptionError) as exc:
        build(gpus=value)
    text = str(exc.value)
    assert "--harness-gpus" in text and says in text
    assert "--harness-gpus 0,1,2,3" in text or "name each GPU once" in text


def test_gpus_option_parses() -> None:
    assert build(gpus="auto").gpus == ("auto",)
    assert build(gpus="0, 2,GPU-abc").gpus == ("0", "2", "GPU-abc")
    assert build().gpus is None and build().gpu_wait_s == 600.0
    assert {"gpus", "gpu-wait-s", "shard"} <= {o.name for o in OPTIONS}


# -- engine.gpus and the parallel sizes -----------------------------------------------------------
def test_parallel_sizes_from_mapping_and_argv() -> None:
    assert parallel_sizes({"tensor_parallel_size": 2, "max-model-len": 4096}) == {"--tensor_parallel_size": 2}
    assert parallel_sizes(["--tensor-parallel-size=2", "-pp", "2", "--dtype", "bf16"]) == {
        "--tensor-parallel-size": 2,
        "-pp": 2,
    }
    assert parallel_sizes({"tp_size": 4}) == {"--tp_size": 4}  # trtllm-serve's spelling


def test_engine_gpus_must_equal_the_parallel_product() -> None:
    with pytest.raises(ValidationError) as exc:
        EngineSpec(kind="vllm", gpus=2, args={"tensor-parallel-size": 4})
    text = str(exc.value)
    assert "engine.gpus is 2" in text and "--tensor-parallel-size 4 = 4" in text
    assert "set engine.gpus: 4" in text
    ok = EngineSpec(
        kind="vllm", gpus=4, args=["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"]
    )
    assert ok.gpu_count() == 4
    assert EngineSpec(kind="vllm", args={"tp": 2}).gpu_count() == 2  # from the args when not given
    assert EngineSpec(kind="vllm").gpu_count() == 1
    with pytest.raises(ValidationError, match="--tensor-parallel-size is 'two'"):
        EngineSpec(kind="vllm", args={"tensor-parallel-size": "two"})


# -- fake inventory and NVML selection ------------------------------------------------------------
def test_fake_inventory_and_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAKE_GPUS_ENV, "8")
    devices, why = inventory()
    assert why is None and [d.nvml_index for d in devices] == list(range(8))
    assert len({d.uuid for d in devices}) == 8
    assert [g.index for g in resolve_pool(("auto",))] == list(range(8))
    pool = resolve_pool(("3", str(devices[5].uuid)))
    assert [(g.index, g.uuid) for g in pool] == [(3, devices[3].uuid), (5, devices[5].uuid)]
    with pytest.raises(GpuError, match=r"'9' names no GPU on this machine \(NVML sees 0: GPU-"):
        resolve_pool(("0", "9"))
    with pytest.raises(GpuError, match="already in the list"):
        resolve_pool(("2", str(devices[2].uuid)))  # one GPU by index and by UUID
    monkeypatch.setenv(FAKE_GPUS_ENV, "0")
    with pytest.raises(GpuError, match="--harness-gpus auto: no GPU found"):
        resolve_pool(("auto",))
    monkeypatch.setenv(FAKE_GPUS_ENV, "many")
    with pytest.raises(GpuError, match="HARNESS_FAKE_GPUS='many' is not a whole number"):
        resolve_pool(("auto",))


def test_collector_watches_only_the_assigned_fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAKE_GPUS_ENV, "8")
    devices, _ = inventory()
    visible = f"{devices[6].uuid},{devices[2].uuid}"
    collector = NvmlCollector(engine_env={"CUDA_VISIBLE_DEVICES": visible})
    collector.start(0)
    collector.stop()
    assert collector.selection is not None
    assert [g.nvml_index for g in collector.selection.gpus] == [6, 2]
    assert "fake GPUs" in collector.status


# -- locks within one process ---------------------------------------------------------------------
def fake_pool(n: int) -> list[Gpu]:
    return [Gpu(i, f"GPU-test-{i}") for i in range(n)]


def test_leases_are_disjoint_and_released(tmp_path: Path) -> None:
    pool = fake_pool(4)
    first = acquire(pool, 2, owner="a", wait_s=1, folder=tmp_path)
    second = acquire(pool, 2, owner="b", wait_s=1, folder=tmp_path)
    assert {g.index for g in first.gpus} == {0, 1} and {g.index for g in second.gpus} == {2, 3}
    assert first.env() == {"CUDA_VISIBLE_DEVICES": "GPU-test-0,GPU-test-1"}
    second.release()
    second.release()  # idempotent
    third = acquire(pool, 2, owner="c", wait_s=1, folder=tmp_path)
    assert {g.index for g in third.gpus} == {2, 3}
    first.release()
    third.release()


def test_indices_without_uuids_ask_for_pci_bus_order(tmp_path: Path) -> None:
    lease = acquire([Gpu(5, None), Gpu(7, None)], 2, owner="x", wait_s=1, folder=tmp_path)
    assert lease.env() == {"CUDA_VISIBLE_DEVICES": "5,7", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    lease.release()


def test_no_free_gpus_waits_visibly_then_fails_naming_the_holder(tmp_path: Path) -> None:
    pool = fake_pool(2)
    holder = acquire(pool, 2, owner="engine for big", wait_s=1, folder=tmp_path)
    said: list[str] = []
    with pytest.raises(GpuError) as exc:
        acquire(pool, 1, owner="engine for small", wait_s=0.5, on_wait=said.append, folder=tmp_path)
    assert said and "engine for small: waiting for 1 free GPU(s)" in said[0]
    text = str(exc.value)
    assert "no 1 free GPUs of 2 within 0.5 s (--harness-gpu-wait-s)" in text
    assert "GPU 0: engine for big (pid" in text
    assert holder.held
    holder.release()
    assert not holder.held


def test_more_gpus_than_the_pool_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(GpuError, match="needs 3 GPUs but --harness-gpus gives 2"):
        acquire(fake_pool(2), 3, owner="engine for x", wait_s=600, folder=tmp_path)


def test_mig_instances_share_their_gpu_but_exclude_the_whole_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sessions on two MIG instances of one GPU run side by side; a session given the whole GPU
    waits for both (and they for it), whichever came first."""
    from harness_fixtures.metrics.nvml import GpuDevice
    from harness_fixtures.servers import gpus

    device = GpuDevice(0, "GPU-parent", None, "H100", ("MIG-a", "MIG-b"))
    monkeypatch.setattr(gpus, "inventory", lambda: ([device], None))
    mig_a, mig_b = resolve_pool(["MIG-a"]), resolve_pool(["MIG-b"])
    whole = resolve_pool(["0"])
    assert mig_a[0].parent_uuid == "GPU-parent" and whole[0].parent_uuid is None
    a = acquire(mig_a, 1, owner="a", wait_s=0, folder=tmp_path)
    b = acquire(mig_b, 1, owner="b", wait_s=0, folder=tmp_path)  # another instance: no wait
    assert a.env() == {"CUDA_VISIBLE_DEVICES": "MIG-a"}
    with pytest.raises(GpuError, match="no 1 free GPUs"):
        acquire(whole, 1, owner="whole", wait_s=0, folder=tmp_path)
    a.release()
    with pytest.raises(GpuError):
        acquire(whole, 1, owner="whole", wait_s=0, folder=tmp_path)  # b still runs on it
    b.release()
    held = acquire(whole, 1, owner="whole", wait_s=0, folder=tmp_path)
    with pytest.raises(GpuError, match="GPU 0: whole"):
        acquire(mig_a, 1, owner="a again", wait_s=0, folder=tmp_path)
    held.release()
    again = acquire(mig_a, 1, owner="a again", wait_s=0, folder=tmp_path)
    assert again.held
    again.release()


def test_a_pool_naming_a_gpu_and_its_mig_instance_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness_fixtures.metrics.nvml import GpuDevice
    from harness_fixtures.servers import gpus

    device = GpuDevice(0, "GPU-parent", None, "H100", ("MIG-a",))
    monkeypatch.setattr(gpus, "inventory", lambda: ([device], None))
    with pytest.raises(GpuError, match="are a GPU and a MIG instance on it"):
        resolve_pool(["0", "MIG-a"])
    with pytest.raises(GpuError, match="are a GPU and a MIG instance on it"):
        resolve_pool(["MIG-a", "GPU-parent"])


# -- the engine manager ---------------------------------------------------------------------------
class RecordingLauncher:
    kind = "sim"

    def __init__(self) -> None:
        self.envs: list[dict[str, str]] = []
        self.stopped = 0

    def start(self, ctx: LaunchContext) -> Endpoint:
        self.envs.append(dict(ctx.gpu_env))
        return Endpoint("sim", "http://127.0.0.1:1", ctx.case.served_name, gpu_env=dict(ctx.gpu_env))

    def stop(self, endpoint: Endpoint) -> None:
        self.stopped += 1


def case(name: str, **engine: Any) -> BenchmarkCase:
    return BenchmarkCase.model_validate(
        {
            "name": name,
            "engine": {"kind": "sim", **engine},
            "dataset": {"path": "x.json"},
            "loadgen_model": {"Offline": "tiny"},
            "scenarios": ["Offline"],
        }
    )


def test_manager_gives_each_engine_its_gpus_and_frees_them_at_stop(tmp_path: Path) -> None:
    launcher = RecordingLauncher()
    allocator = GpuAllocator(fake_pool(4), wait_s=1, folder=tmp_path / "locks")
    manager = EngineManager(make_launcher=lambda kind: launcher, gpus=allocator, on_message=lambda s: None)
    ep = manager.get(case("a", gpus=2), tmp_path / "a")
    assert launcher.envs[-1] == {"CUDA_VISIBLE_DEVICES": "GPU-test-0,GPU-test-1"}
    assert ep.gpus == [{"index": 0, "uuid": "GPU-test-0"}, {"index": 1, "uuid": "GPU-test-1"}]
    # while a's engine runs, another holder gets only the other two GPUs
    other = allocator.acquire("other", 2)
    assert [g.index for g in other.gpus] == [2, 3]
    other.release()
    ep_b = manager.get(case("b", args={"tensor-parallel-size": 4}), tmp_path / "b")  # a stopped first
    assert launcher.stopped == 1
    assert ep_b.gpu_env["CUDA_VISIBLE_DEVICES"].count("GPU-test-") == 4
    manager.stop()
    assert manager.leases == []
    after = allocator.acquire("after", 4)
    assert len(after.gpus) == 4  # all free again
    after.release()


def test_each_replica_gets_its_own_gpus_and_a_failed_sibling_frees_them(tmp_path: Path) -> None:
    launcher = RecordingLauncher()
    allocator = GpuAllocator(fake_pool(4), wait_s=1, folder=tmp_path / "locks")
    manager = EngineManager(make_launcher=lambda kind: launcher, gpus=allocator, on_message=lambda s: None)
    eps = manager.get_all(case("a", gpus=2, replicas=2), tmp_path / "a")
    sets = [set(ep.gpu_env["CUDA_VISIBLE_DEVICES"].split(",")) for ep in eps]
    assert len(eps) == 2 and all(len(x) == 2 for x in sets) and not sets[0] & sets[1]
    manager.stop()
    # three replicas of two GPUs do not fit in four: the third waits out its deadline, and the two
    # started are stopped and their GPUs freed
    with pytest.raises(EngineError, match="GPU"):
        manager.get_all(case("b", gpus=2, replicas=3), tmp_path / "b")
    assert launcher.stopped == 2 + 2 and manager.leases == []
    after = allocator.acquire("after", 4)
    assert len(after.gpus) == 4
    after.release()


def test_manager_without_gpus_option_changes_nothing(tmp_path: Path) -> None:
    launcher = RecordingLauncher()
    manager = EngineManager(make_launcher=lambda kind: launcher, on_message=lambda s: None)
    ep = manager.get(case("a", gpus=2), tmp_path / "a")
    assert launcher.envs == [{}] and ep.gpus == []
    manager.stop()
