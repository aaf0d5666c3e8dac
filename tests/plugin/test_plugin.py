"""The plugin seen from outside: pytester builds a project (pytest.ini, model YAMLs, user.conf, test module),
runs pytest on it in a subprocess and checks ids, hooks, written files, JUnit XML, summary and errors."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

import pytest
import yaml

from harness_fixtures.results import SCHEMA_VERSION, BenchmarkResult

if TYPE_CHECKING:
    from support import HarnessProject

# Prints the hook calls and also appends them to a file: xdist workers' stdout never reaches the
# terminal, so only the file shows whether a worker called the hook too.
HOOK_CONFTEST = """
import os
from pathlib import Path


def pytest_harness_result(config, item_id, result, metadata):
    line = (
        f"HOOK: {item_id} {result['status']} worker={os.environ.get('PYTEST_XDIST_WORKER', 'none')} "
        f"ci_job={metadata.get('ci_job')}"
    )
    print(line)
    with (Path(config.rootpath) / "hook_calls.txt").open("a") as fh:
        fh.write(line + "\\n")


def pytest_harness_update_metadata(config, case, metadata):
    metadata["ci_job"] = "job-42"
"""


def hook_lines(project: HarnessProject) -> list[str]:
    path = project.path / "hook_calls.txt"
    return path.read_text().splitlines() if path.is_file() else []


def test_ids_are_model_scenario_and_k_selects_one(harness_project: HarnessProject) -> None:
    harness_project.model("a", ("Offline", "Server"))
    # A dataset that does not exist: collection must not need it.
    harness_project.model("b", ("Offline",), dataset="../data/missing.json")

    result = harness_project.run("--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "test_benchmarks.py::test_benchmark[[]a_offline[]]",
            "test_benchmarks.py::test_benchmark[[]a_server[]]",
            "test_benchmarks.py::test_benchmark[[]b_offline[]]",
            "3 tests collected*",
        ]
    )

    result = harness_project.run("--collect-only", "-q", "-k", "a_server")
    collected = [line for line in result.outlines if "::test_benchmark[" in line]
    assert collected == ["test_benchmarks.py::test_benchmark[a_server]"]
    assert harness_project.session_dirs() == []  # collecting writes nothing


@pytest.mark.slow
def test_run_writes_results_calls_hooks_once_and_reports(harness_project: HarnessProject) -> None:
    harness_project.model("a", ("Offline", "Server"))
    harness_project.pytester.makeconftest(HOOK_CONFTEST)

    result = harness_project.run("-s", "--junitxml=junit.xml")
    result.assert_outcomes(passed=2)

    # The hook: once per test, after the metadata hook added its field.
    result.stdout.fnmatch_lines(
        ["*HOOK: test_benchmarks.py::test_benchmark[[]a_offline[]] VALID worker=none ci_job=job-42"]
    )
    result.stdout.fnmatch_lines(
        ["*HOOK: test_benchmarks.py::test_benchmark[[]a_server[]] VALID worker=none ci_job=job-42"]
    )
    assert len(hook_lines(harness_project)) == 2, hook_lines(harness_project)

    # The terminal summary table.
    result.stdout.fnmatch_lines(
        [
            "*harness benchmark results*",
            "test*status*tok/s*samples/s*TTFT p99 ms*TPOT p99 ms*failed",
            "a_offline*VALID*0",
            "a_server*VALID*0",
            "session results: */harness_output/*/session.yaml",
            "session summary figure: */harness_output/*/summary.png",
        ]
    )

    (session,) = harness_project.session_dirs()
    for test_id, scenario in (("a_offline", "Offline"), ("a_server", "Server")):
        raw = yaml.safe_load((session / test_id / "result.yaml").read_text())
        for key in ("schema_version", "test_id", "status", "queries", "tokens_per_s", "ttft_ms", "tpot_ms"):
            assert key in raw, f"{test_id}/result.yaml lacks {key!r}"
        r = BenchmarkResult.load(session / test_id / "result.yaml")
        assert (r.schema_version, r.test_id, r.scenario, r.status) == (
            SCHEMA_VERSION,
            test_id,
            scenario,
            "VALID",
        )
        assert r.queries.issued > 0
        assert r.queries.completed == r.queries.issued and r.queries.failed == 0
        assert r.queries.output_tokens == 8 * r.queries.completed  # max_tokens 8, ignore_eos
        assert r.tokens_per_s is not None and r.tokens_per_s > 0
        md = yaml.safe_load((session / test_id / "metadata.yaml").read_text())
        assert md["schema_version"] == SCHEMA_VERSION
        assert md["test_id"] == test_id
        assert md["ci_job"] == "job-42"  # added by pytest_harness_update_metadata
        assert md["engine"]["kind"] == "sim"
        # paths relative to the session folder: the session reads the same wherever it is copied
        assert md["outputs"]["result"] == f"{test_id}/result.yaml" and md["session"] == session.name
    server = BenchmarkResult.load(session / "a_server" / "result.yaml")
    assert server.ttft_ms.p50 is not None and server.ttft_ms.p50 >= 50  # the simulator's TTFT is 50 ms
    listed = yaml.safe_load((session / "session.yaml").read_text())["results"]
    assert [r["test_id"] for r in listed] == ["a_offline", "a_server"]
    assert (session / "summary.png").stat().st_size > 20_000
    assert "a_server/plots/latency_cdf.png" in server.telemetry.plots

    # JUnit XML: the compact harness_* properties, not the internal JSON payload.
    junit_text = (harness_project.path / "junit.xml").read_text()
    assert "harness_result_json" not in junit_text
    assert '"metadata"' not in junit_text
    for case in ET.fromstring(junit_text).iter("testcase"):
        props = {p.get("name"): p.get("value", "") for p in case.iter("property")}
        assert props["harness_status"] == "VALID", props
        assert float(props["harness_tokens_per_s"]) > 0
        assert props["harness_failed_requests"] == "0"
        assert props["harness_result_path"].endswith("/result.yaml")
        assert set(props) == {
            "harness_status",
            "harness_tokens_per_s",
            "harness_samples_per_s",
            "harness_ttft_p99_ms",
            "harness_tpot_p99_ms",
            "harness_failed_requests",
            "harness_result_path",
        }


@pytest.mark.slow
def test_xdist_writes_each_file_once_on_the_controller(harness_project: HarnessProject) -> None:
    harness_project.model("a", ("Offline",))
    harness_project.model("b", ("Offline",))
    harness_project.pytester.makeconftest(HOOK_CONFTEST)

    result = harness_project.run("-n", "2")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*2 workers [[]2 items[]]*"])

    lines = hook_lines(harness_project)
    assert sorted(lines) == [
        "HOOK: test_benchmarks.py::test_benchmark[a_offline] VALID worker=none ci_job=job-42",
        "HOOK: test_benchmarks.py::test_benchmark[b_offline] VALID worker=none ci_job=job-42",
    ]
    (session,) = harness_project.session_dirs()  # workers write into the controller's folder
    assert sorted(p.relative_to(session).as_posix() for p in session.rglob("*.yaml")) == [
        "a_offline/metadata.yaml",
        "a_offline/result.yaml",
        "b_offline/metadata.yaml",
        "b_offline/result.yaml",
        "session.yaml",
    ]
    assert not list(session.rglob(".*.tmp"))
    for test_id in ("a_offline", "b_offline"):
        assert BenchmarkResult.load(session / test_id / "result.yaml").status == "VALID"


def test_second_session_never_overwrites_the_first(harness_project: HarnessProject) -> None:
    # A missing dataset still writes result.yaml (status ERROR) and starts no engine: a cheap session.
    harness_project.model("a", ("Offline",), dataset="../data/missing.json")
    harness_project.run().assert_outcomes(failed=1)
    (first,) = harness_project.session_dirs()
    first_result = (first / "a_offline" / "result.yaml").read_text()
    assert (first / "summary.png").is_file()  # an ERROR-only session (no metrics) still gets its figure

    harness_project.run().assert_outcomes(failed=1)
    dirs = harness_project.session_dirs()
    assert len(dirs) == 2 and first in dirs
    assert (first / "a_offline" / "result.yaml").read_text() == first_result
    (second,) = (d for d in dirs if d != first)
    assert (second / "a_offline" / "result.yaml").is_file()


def test_bad_user_conf_line_is_a_usage_error(harness_project: HarnessProject) -> None:
    harness_project.model("a", ("Offline",))
    conf = harness_project.user_conf(
        """\
        # comment
        tiny.Offline.target_qps = 100
        tiny.Offline.min_durration = 200
        tiny.offline.min_query_count = 1
        """
    )
    result = harness_project.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            f"*{conf}:3: unknown key 'min_durration'; did you mean 'min_duration'?*",
            f"{conf}:4: unknown scenario 'offline'; did you mean 'Offline'?*",
        ]
    )
    assert "Traceback" not in result.stderr.str()
    assert harness_project.session_dirs() == []


def test_unknown_model_yaml_key_is_a_usage_error(harness_project: HarnessProject) -> None:
    path = harness_project.model("a", ("Offline",), thresholdz={"require_valid": True})
    result = harness_project.run("--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{path}: invalid benchmark case", "  thresholdz: unknown key*"])
    assert "Traceback" not in result.stderr.str()


def test_missing_dataset_fails_clearly_and_starts_no_engine(harness_project: HarnessProject) -> None:
    harness_project.model("a", ("Offline",), dataset="../data/missing.json")
    result = harness_project.run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*dataset file '*/data/missing.json' does not exist; set dataset.path*"])
    (session,) = harness_project.session_dirs()
    assert not list(session.glob("engine-*"))
    assert not list(session.rglob("engine.log"))
    r = BenchmarkResult.load(session / "a_offline" / "result.yaml")
    assert r.status == "ERROR" and "does not exist" in (r.reason or "")


def test_unknown_engine_kind_fails_clearly(harness_project: HarnessProject) -> None:
    harness_project.model("a", ("Offline", "Server"), kind="nope")
    result = harness_project.run()
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        ["*a.yaml: engine.kind 'nope' is unknown; known: [[]'external', *'sim', *[]]*"] * 2,
        consecutive=False,
    )
    (session,) = harness_project.session_dirs()
    assert not list(session.rglob("engine.log"))
