"""Replicas and several server URLs through pytest: ``engine.replicas`` starts that many engines, a
repeated ``--harness-server-url`` benchmarks servers someone else runs as one SUT, and bad input is a
usage error before any engine starts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import yaml
from support import TINY_SIM, HarnessProject

from harness_fixtures.results import BenchmarkResult


def test_replicas_start_that_many_engines_and_one_loadgen_uses_all(harness_project: HarnessProject) -> None:
    harness_project.model("a", ("Offline",), sim=TINY_SIM)
    path = harness_project.path / "models" / "a.yaml"
    case = yaml.safe_load(path.read_text())
    case["engine"]["replicas"] = 3
    path.write_text(yaml.safe_dump(case))

    result = harness_project.run("--harness-dispatch=round-robin")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.stdout.fnmatch_lines(["*starting sim engine 1/3 for a*", "*starting sim engine 3/3 for a*"])
    (session,) = harness_project.session_dirs()
    for i in range(3):  # a folder and log per replica
        assert (session / "engine-a" / f"replica-{i}" / "engine.log").is_file()
    r = BenchmarkResult.load(session / "a_offline" / "result.yaml")
    assert len(r.endpoints) == 3 and len({e.url for e in r.endpoints}) == 3
    assert sum(e.queries for e in r.endpoints) == r.queries.issued
    assert all(e.queries > 0 and e.failures == 0 for e in r.endpoints)
    md = yaml.safe_load((session / "a_offline" / "metadata.yaml").read_text())
    assert md["endpoints"] == [e.url for e in r.endpoints]
    assert md["sut"].startswith("3 sim replicas started by the suite")
    assert "dispatch round-robin" in md["sut"]


def test_repeated_server_url_benchmarks_every_server(
    harness_project: HarnessProject, start_sim: Callable[..., Any]
) -> None:
    one, _ = start_sim(name="a", **TINY_SIM)
    two, _ = start_sim(name="a", **TINY_SIM)
    harness_project.model("a", ("Offline",))
    result = harness_project.run(
        f"--harness-server-url={one.base_url}/v1", f"--harness-server-url={two.base_url}"
    )
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    (session,) = harness_project.session_dirs()
    r = BenchmarkResult.load(session / "a_offline" / "result.yaml")
    assert [e.url for e in r.endpoints] == [one.base_url, two.base_url]
    assert all(e.queries > 0 for e in r.endpoints)


@pytest.mark.parametrize(
    ("engine", "args", "message"),
    [
        ({"replicas": 0}, [], "*engine.replicas must be a whole number >= 1 (got 0)*"),
        (
            {"replicas": 2},
            ["--harness-server-url=http://127.0.0.1:9"],
            "*engine.replicas is 2, but --harness-server-url*",
        ),
        (
            {},
            ["--harness-server-url=http://127.0.0.1:9", "--harness-server-url=http//nohost"],
            "*--harness-server-url*'http//nohost' must look like http://host*",
        ),
        (
            {"kind": "external", "urls": ["http://127.0.0.1:9", "http://127.0.0.1:notaport"]},
            [],
            "*engine.urls entry 'http://127.0.0.1:notaport' is not a valid URL*",
        ),
    ],
)
def test_bad_replicas_or_urls_are_usage_errors_before_any_engine(
    harness_project: HarnessProject, engine: dict[str, Any], args: list[str], message: str
) -> None:
    path = harness_project.model("a", ("Offline",))
    case = yaml.safe_load(path.read_text())
    case["engine"].update(engine)
    path.write_text(yaml.safe_dump(case))
    result = harness_project.run(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    result.stderr.fnmatch_lines([message])
    assert "Traceback" not in result.stderr.str()
    assert harness_project.session_dirs() == []  # nothing started, nothing written
