"""Result files are written atomically and read guarded: a write that fails leaves the old file and no
temporary one; a client.json that is missing or torn makes the run ERROR (its output checks cannot be
gated) while every number LoadGen measured is kept. A real LoadGen run on the simulator."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import TINY_SIM, TINY_USER_CONF, run_pipeline

from harness_fixtures import redaction
from harness_fixtures.config import plan_runs
from harness_fixtures.loadgen.child import ChildOutcome
from harness_fixtures.loadgen.spec import RunSpec
from harness_fixtures.options import HarnessOptions
from harness_fixtures.pipeline import Events, Suite, _TestRun
from harness_fixtures.results import write_json, write_yaml
from harness_fixtures.servers.process import OWNED


@pytest.mark.parametrize("write", [write_yaml, write_json])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: Callable[[Path, Any], None]
) -> None:
    path = tmp_path / "result.yaml"
    write(path, {"status": "VALID"})
    before = path.read_bytes()

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write(path, {"status": "ERROR"})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.yaml"]


def test_written_files_hold_no_registered_secret(tmp_path: Path) -> None:
    redaction.add_secrets(["sekrit-in-a-result-7"])
    try:
        write_json(tmp_path / "client.json", {"first_error": "401 for key sekrit-in-a-result-7"})
    finally:
        redaction.clear_secrets()
    assert json.loads((tmp_path / "client.json").read_text()) == {"first_error": "401 for key ***"}


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["torn", "missing"])
def test_client_json_torn_or_missing_is_an_error_that_keeps_loadgens_numbers(
    start_sim: Callable[..., Any], tmp_path: Path, damage: str
) -> None:
    endpoint, case = start_sim(**TINY_SIM)
    conf = tmp_path / "user.conf"
    conf.write_text(TINY_USER_CONF)
    test_dir = tmp_path / "offline"
    first = run_pipeline(case, "Offline", endpoint, test_dir, conf).result
    assert first.status == "VALID" and first.consistency.checked > 0
    assert OWNED.pids() == [endpoint.pid]  # the runner that exited by itself is off the books

    client_json = test_dir / "client.json"
    if damage == "torn":
        client_json.write_text(client_json.read_text()[:40])
    else:
        client_json.unlink()
    # Read the same run's files again, as the pipeline does when the runner has exited.
    (planned,) = [r for r in plan_runs(case) if r.scenario == "Offline"]
    run = _TestRun(planned, Suite(HarnessOptions(user_conf=conf)), test_dir, Events(), None)
    run.endpoint = endpoint
    spec = RunSpec.model_validate_json((test_dir / "run_spec.json").read_text())
    again = run._measure(spec, ChildOutcome(None, None, 0, first.duration_s or 1.0, True))
    assert again.status == "ERROR"
    assert ("is unreadable" if damage == "torn" else "left no client.json") in (again.reason or "")
    assert "LoadGen's verdict was VALID" in (again.reason or "")
    assert again.tokens_per_s == first.tokens_per_s and again.ttft_ms == first.ttft_ms
    assert again.queries.issued == first.queries.issued  # counted from requests.jsonl instead
