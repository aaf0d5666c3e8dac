"""The LoadGen child runs in its test folder (LoadGen reads audit.config from its working directory):
every file its spec names must be absolute, or a relative path would name a file there."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from harness_fixtures.client.httpconfig import HttpSettings
from harness_fixtures.client.spec import ClientSpec
from harness_fixtures.config import DatasetSpec, GenerationSpec
from harness_fixtures.loadgen.child import absolute_paths
from harness_fixtures.loadgen.spec import RunSpec


def run_spec(scenario: str = "Offline", http: HttpSettings | None = None, **changes: Any) -> RunSpec:
    return RunSpec(
        test_id="t",
        out_dir="out/t",
        user_conf="conf/user.conf",
        loadgen_model="m",
        loadgen_scenario=scenario,
        client=ClientSpec(
            base_url="http://127.0.0.1:1",
            served_model="m",
            generation=GenerationSpec(),
            dataset=DatasetSpec(path="data.json"),
            dataset_path="data/data.json",
            http=http or HttpSettings(),
        ),
        **changes,
    )


def test_relative_paths_become_absolute_from_the_invocation_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = run_spec(http=HttpSettings(ca_bundle="ca.pem", client_cert="/etc/cert.pem"))
    got = absolute_paths(spec)
    assert got.out_dir == str(tmp_path / "out" / "t")
    assert got.user_conf == str(tmp_path / "conf" / "user.conf")
    assert got.client.dataset_path == str(tmp_path / "data" / "data.json")
    assert got.client.http.ca_bundle == str(tmp_path / "ca.pem")
    assert got.client.http.client_cert == "/etc/cert.pem" and got.client.http.client_key is None
    assert all(os.path.isabs(p) for p in (got.out_dir, got.user_conf, got.client.dataset_path))
    assert absolute_paths(got) == got  # already absolute: unchanged


def test_overrides_reach_loadgen_settings() -> None:
    """The spec's overrides, set on LoadGen's own TestSettings (the binding's attribute names)."""
    import mlperf_loadgen as lg

    from harness_fixtures.loadgen.runner import _apply_overrides

    base = run_spec("Server", target_qps=12.5, min_query_count=100)
    settings = lg.TestSettings()
    _apply_overrides(settings, base)
    assert settings.server_target_qps == 12.5 and settings.min_query_count == 100
