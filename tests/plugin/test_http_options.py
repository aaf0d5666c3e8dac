"""The HTTP options through pytest: --harness-header (command line, repeatable, or one per ini line),
--harness-api-key-env; the same headers on every path of a launched engine (health check, stream,
/metrics), which the simulator checks on each (401 otherwise)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from support import TINY_SIM

from harness_fixtures.results import BenchmarkResult

if TYPE_CHECKING:
    from support import HarnessProject

DEADLINES = ("--harness-request-timeout-s=5", "--harness-test-timeout-s=30")


@pytest.mark.parametrize("where", ["api_key", "header_cli", "header_ini"])
def test_credentials_reach_every_path(
    harness_project: HarnessProject, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    monkeypatch.setenv("HARNESS_TEST_TOKEN", "tok-123")
    wanted = "Bearer tok-123" if where == "api_key" else "Token tok-123"
    harness_project.model("a", ("Offline",), sim={**TINY_SIM, "require_authorization": wanted})
    monkeypatch.setenv("HARNESS_TEST_AUTH", "Token tok-123")
    args: list[str] = []
    if where == "api_key":
        args.append("--harness-api-key-env=HARNESS_TEST_TOKEN")
    elif where == "header_cli":
        args += ["--harness-header", "Authorization=env:HARNESS_TEST_AUTH", "--harness-header", "X-Tenant=a"]
    else:
        ini = (harness_project.path / "pytest.ini").read_text()
        ini = (
            ini.rstrip("\n") + "\nharness_header =\n    Authorization=env:HARNESS_TEST_AUTH\n    X-Tenant=a\n"
        )
        (harness_project.path / "pytest.ini").write_text(ini)
    result = harness_project.run(*args, *DEADLINES)
    result.assert_outcomes(passed=1)
    (session,) = harness_project.session_dirs()
    r = BenchmarkResult.load(session / "a_offline" / "result.yaml")
    assert r.status == "VALID" and r.queries.failed == 0
    assert r.telemetry.collectors["engine"] == "ok"  # /metrics answered 200: it got the header too
    spec = (session / "a_offline" / "run_spec.json").read_text()
    assert "tok-123" not in spec  # header sources (env:VAR) are written, never their values


@pytest.mark.parametrize(
    "args, fragment",
    [
        (
            ["--harness-header=X-Api-Key=literal-secret"],
            "*X-Api-Key: a credential must come from the environment*",
        ),
        (["--harness-header=Host=evil"], "*header 'Host' cannot be set*"),
        (["--harness-header=X-A"], "*--harness-header 'X-A' is not NAME=VALUE*"),
        (["--harness-server-url=http://h/v1/completions"], "*names an endpoint; give the server's base URL*"),
        (
            ["--harness-ca-bundle=missing.pem"],
            "*CA bundle '*missing.pem' (from --harness-ca-bundle) cannot be*",
        ),
    ],
)
def test_bad_http_options_are_usage_errors(
    harness_project: HarnessProject, args: list[str], fragment: str
) -> None:
    harness_project.model("a", ("Offline",))
    result = harness_project.run(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    result.stderr.fnmatch_lines([fragment])
    assert "Traceback" not in result.stderr.str() and "literal-secret" not in result.stderr.str().replace(
        "X-Api-Key=literal-secret", ""
    )
    assert not list(harness_project.path.rglob("engine.log"))


def test_a_broken_proxy_variable_does_not_touch_other_pytest_runs(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plugin loads into every pytest run of the environment: it must stay inert there."""
    monkeypatch.setenv("HTTPS_PROXY", "socks5://proxy.example:1080")
    monkeypatch.setenv("SSL_CERT_FILE", "/no/such/ca.pem")
    pytester.makepyfile(test_plain="def test_plain():\n    assert True\n")
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
