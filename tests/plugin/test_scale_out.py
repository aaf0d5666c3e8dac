"""--harness-shard and --harness-gpus through pytest: usage errors before any engine starts, the shard
split of a collection, and one sharded run on fake GPUs whose files and simulators say which GPUs
each engine got."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from support import HarnessProject

from harness_fixtures.metrics.nvml import FAKE_GPUS_ENV
from harness_fixtures.servers.gpus import LOCK_DIR_ENV, Gpu, acquire


@pytest.fixture(autouse=True)
def _fake_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Eight fake GPUs and a lock folder of this test's own (the machine is shared)."""
    monkeypatch.setenv(FAKE_GPUS_ENV, "8")
    locks = tmp_path / "gpu-locks"
    monkeypatch.setenv(LOCK_DIR_ENV, str(locks))
    return locks


def collected(result: pytest.RunResult) -> list[str]:
    return sorted(re.findall(r"\[([a-z0-9_]+)\]", "\n".join(result.outlines)))


def test_shards_together_select_the_unsharded_set_with_models_whole(harness_project: HarnessProject) -> None:
    harness_project.model("alpha", ("Offline", "Server"))
    harness_project.model("bravo", ("Offline", "Server", "SingleStream"))
    harness_project.model("charlie", ("Offline",))
    harness_project.model("delta", ("Offline",))
    args = ("--collect-only", "-q", "-k", "not delta")  # the shards split what -k left
    whole = collected(harness_project.run(*args))
    assert len(whole) == 6 and not any(t.startswith("delta") for t in whole)
    one = harness_project.run(*args, "--harness-shard", "1/2")
    two = harness_project.run(*args, "--harness-shard", "2/2")
    assert one.ret == two.ret == pytest.ExitCode.OK
    first, second = collected(one), collected(two)
    assert sorted(first + second) == whole and not set(first) & set(second)
    for model in ("alpha", "bravo", "charlie"):  # each model's tests in one shard: one engine start
        assert {t for t in whole if t.startswith(model)} <= set(first) or not any(
            t.startswith(model) for t in first
        )
    # bravo (3 tests) first onto shard 1, then alpha (2) onto the emptier shard 2, then charlie (1)
    one.stdout.fnmatch_lines(["shard 1/2: 3 of 6 tests (models bravo)"])
    two.stdout.fnmatch_lines(["shard 2/2: 3 of 6 tests (models alpha, charlie)"])


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--harness-shard", "3/2"), "--harness-shard / ini harness_shard: '3/2' is out of range; pass I/N*"),
        (("--harness-shard", "x"), "*'x' is not I/N*"),
        (
            ("--harness-gpus", "0,x"),
            "*'x' in '0,x' is neither an index nor a GPU UUID*--harness-gpus 0,1,2,3*",
        ),
        (("--harness-gpus", "0,9"), "*--harness-gpus: '9' names no GPU on this machine (NVML sees 0: GPU-*"),
    ],
)
def test_bad_values_are_usage_errors(
    harness_project: HarnessProject, args: tuple[str, ...], says: str
) -> None:
    harness_project.model("alpha", ("Offline",))
    result = harness_project.run(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{says}"])
    assert "Traceback" not in result.stderr.str()
    assert harness_project.session_dirs() == []


def test_gpus_against_tensor_parallel_size_is_a_usage_error(harness_project: HarnessProject) -> None:
    path = harness_project.model("alpha", ("Offline",))
    case = yaml.safe_load(path.read_text())
    case["engine"].update(gpus=2, args={"tensor-parallel-size": 4})
    path.write_text(yaml.safe_dump(case))
    result = harness_project.run("--harness-gpus", "auto")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            f"*{path}: invalid benchmark case",
            "*engine.gpus is 2 but engine.args ask for --tensor-parallel-size 4*",
        ]
    )
    assert harness_project.session_dirs() == []  # no engine, no session folder


def test_a_case_needing_more_gpus_than_given_is_a_usage_error(harness_project: HarnessProject) -> None:
    path = harness_project.model("alpha", ("Offline",))
    case = yaml.safe_load(path.read_text())
    case["engine"]["gpus"] = 4
    path.write_text(yaml.safe_dump(case))
    result = harness_project.run("--harness-gpus", "0,1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*the engine of alpha needs 4 GPUs*--harness-gpus gives 2*"])
    assert not list(harness_project.path.glob("harness_output/*/engine-alpha"))


def test_no_free_gpus_fails_after_the_deadline_without_starting_the_engine(
    harness_project: HarnessProject, _fake_gpus: Path
) -> None:
    path = harness_project.model("alpha", ("Offline",))
    case = yaml.safe_load(path.read_text())
    case["engine"]["gpus"] = 2
    path.write_text(yaml.safe_dump(case))
    pool = [Gpu(i, f"GPU-fa4e0000-0000-4000-8000-{i:012d}") for i in range(8)]
    # another session holds seven of the eight GPUs; alpha needs two
    other = acquire(pool, 7, owner="engine for someone_else", wait_s=1, folder=_fake_gpus)
    try:
        result = harness_project.run("--harness-gpus", "auto", "--harness-gpu-wait-s", "1")
    finally:
        other.release()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*engine for alpha: waiting for 2 free GPU(s) (up to 1 s); held by: "
            "GPU 0: engine for someone_else*",
            "*engine for alpha: no 2 free GPUs of 8 within 1 s (--harness-gpu-wait-s)*",
        ]
    )
    session = harness_project.session_dirs()[-1]
    assert not (session / "engine-alpha" / "engine.log").exists()  # never started


def test_sharded_run_on_fake_gpus_records_and_gives_each_engine_its_gpus(
    harness_project: HarnessProject,
) -> None:
    for name in ("alpha", "bravo", "gamma"):
        path = harness_project.model(name, ("Offline",))
        if name == "alpha":
            case = yaml.safe_load(path.read_text())
            case["engine"]["gpus"] = 2
            path.write_text(yaml.safe_dump(case))
    # one test per model: alpha → shard 1, bravo → 2, gamma → 1 (ties by name, emptier shard first)
    result = harness_project.run("--harness-gpus", "auto", "--harness-shard", "1/2", timeout=240)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()[-3000:]
    result.stdout.fnmatch_lines(["shard 1/2: 2 of 3 tests (models alpha, gamma)"])
    (session,) = harness_project.session_dirs()
    doc = yaml.safe_load((session / "session.yaml").read_text())
    assert doc["shard"] == {"index": 1, "count": 2, "tests": 2, "of": 3, "models": ["alpha", "gamma"]}
    assert sorted(r["test_id"] for r in doc["results"]) == ["alpha_offline", "gamma_offline"]
    for name, want in (("alpha", [0, 1]), ("gamma", [0])):  # alpha's engine stopped before gamma's
        meta = yaml.safe_load((session / f"{name}_offline" / "metadata.yaml").read_text())
        gpus = meta["engine"]["gpus"]
        assert [g["index"] for g in gpus] == want
        visible = ",".join(g["uuid"] for g in gpus)
        assert meta["engine"]["cuda_visible_devices"] == visible
        # the engine really got it: the simulator prints the CUDA_VISIBLE_DEVICES it saw
        log = (session / f"engine-{name}" / "engine.log").read_text()
        assert f"CUDA_VISIBLE_DEVICES={visible!r}" in log
        # and the NVML collector watched exactly those GPUs
        res = yaml.safe_load((session / f"{name}_offline" / "result.yaml").read_text())
        assert [w["nvml_index"] for w in res["telemetry"]["gpu"]["watched"]] == want


@pytest.mark.slow
def test_four_xdist_workers_on_eight_fake_gpus_never_share_one(harness_project: HarnessProject) -> None:
    """``-n 4 --harness-gpus auto`` with four models of ``gpus: 2``: every engine gets two GPUs, and
    two tests whose engines ran at the same time always had disjoint GPUs (the engines' logs say
    what CUDA_VISIBLE_DEVICES they saw)."""
    import datetime as dt
    import itertools

    names = ("alpha", "bravo", "charlie", "delta")
    for name in names:
        harness_project.model(name, ("Offline", "Server"), engine={**_engine(), "gpus": 2})
    result = harness_project.run("-n", "4", "--harness-gpus", "auto", timeout=420)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()[-3000:]
    result.stdout.fnmatch_lines(["*4 workers [[]8 items[]]*"])
    (session,) = harness_project.session_dirs()
    runs: list[tuple[str, frozenset[str], float, float]] = []
    for name in names:
        log = (session / f"engine-{name}" / "engine.log").read_text()
        for scenario in ("offline", "server"):
            meta = yaml.safe_load((session / f"{name}_{scenario}" / "metadata.yaml").read_text())
            uuids = [g["uuid"] for g in meta["engine"]["gpus"]]
            assert len(uuids) == 2
            assert f"CUDA_VISIBLE_DEVICES={','.join(uuids)!r}" in log  # what the engine really saw
            start, end = (
                dt.datetime.fromisoformat(meta[k]).timestamp() for k in ("started_utc", "finished_utc")
            )
            runs.append((name, frozenset(uuids), start, end))
    together = 0
    for (m1, g1, s1, e1), (m2, g2, s2, e2) in itertools.combinations(runs, 2):
        if m1 != m2 and s1 < e2 and s2 < e1:  # two engines up at the same time
            together += 1
            assert not g1 & g2, (m1, sorted(g1), m2, sorted(g2))
    assert together > 0  # the workers did run side by side, so the check above had something to check


def _engine() -> dict[str, object]:
    from support import TINY_SIM

    return {"kind": "sim", "start_timeout_s": 60, "stop_timeout_s": 5, "sim": TINY_SIM}
