"""--harness-submission-dir: a simulator session becomes an MLPerf submission tree with real TEST06 and
accuracy runs, which the structural check (written from MLCommons' checker rules) accepts; a simulator
whose streamed first token is not its answer's fails TEST06, in the test and in the tree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import EOS, HarnessProject, build_tokenizer, summaries, write_responses

from harness_fixtures.accuracy.rouge import score_texts
from harness_fixtures.exporters.submission_check import check_submission

SIM: dict[str, Any] = {"ttft_base_ms": 10, "itl_ms": 1, "max_batch": 16, "eos_token_id": EOS}


def answering_model(project: HarnessProject, name: str, scenarios: tuple[str, ...], **sim: Any) -> None:
    """A simulator case that answers every prompt with its reference summary (ROUGE 100), decodable
    by a word-level tokenizer, with an accuracy target: everything a submission needs."""
    root = project.path
    refs = summaries()
    vocab = build_tokenizer(root / "tok", refs)
    ids = [[vocab[w] for w in t.split()] for t in refs]
    # Distinct prompts (the simulator answers by prompt), made of ids the tokenizer knows: token ids
    # are checked against the model's vocabulary before any engine starts.
    assert len(refs) + 2 < len(vocab)
    prompts = [[i, i + 1, i + 2] for i in range(len(refs))]
    rows = [
        {"input": f"article {i}", "tok_input": p, "output": t}
        for i, (p, t) in enumerate(zip(prompts, refs, strict=True))
    ]
    (root / "data" / "summaries.json").write_text(json.dumps(rows))
    responses = write_responses(root / "answers.json", prompts, ids)
    target = {
        "rouge1": 100,
        "rouge2": 100,
        "rougeL": 100,
        "rougeLsum": 100,
        "gen_len": score_texts(refs, refs).gen_len,
    }
    project.model(
        name,
        scenarios,
        sim={**SIM, "responses_file": str(responses), **sim},
        dataset="../data/summaries.json",
        generation={"max_tokens": max(map(len, ids)) + 8, "eos_token_ids": [EOS]},
        tokenizer="../tok",
        accuracy={"target": target},
    )  # fmt: skip


def run_submission(project: HarnessProject, *extra: str) -> tuple[pytest.RunResult, Path, Path]:
    sub = project.path / "submission"
    result = project.run(
        "-k", "not accuracy", "--harness-submission-dir", str(sub), "--harness-submitter", "Acme",
        "--harness-system-name", "sim_box", *extra, timeout=300,
    )  # fmt: skip
    (session,) = project.session_dirs()
    return result, session, sub


@pytest.mark.slow
def test_simulator_session_exports_a_tree_that_passes_the_check(harness_project: HarnessProject) -> None:
    answering_model(harness_project, "exact", ("Offline", "Server"))
    result, session, sub = run_submission(harness_project)
    result.assert_outcomes(passed=2)

    for test_id, first_token in (("exact_offline", None), ("exact_server", True)):
        r = yaml.safe_load((session / test_id / "result.yaml").read_text())
        t06 = r["compliance"]["TEST06"]
        # a real TEST06 run: LoadGen applied the audit.config and logged 100 sampled answers
        assert (t06["passed"], t06["first_token"], t06["eos"], t06["sample_length"]) == (
            True,
            first_token,
            True,
            True,
        )
        assert t06["samples"] == 100 and t06["dir"] == f"{test_id}/TEST06"
        detail = (session / test_id / "TEST06" / "mlperf" / "mlperf_log_detail.txt").read_text()
        assert "Found Audit Config file (audit.config)" in detail
        assert not (session / test_id / "mlperf" / "mlperf_log_detail.txt").read_text().count("audit.config")
        # the scenario's own accuracy run, scored
        assert (
            r["accuracy"]["scores"]["rouge1"] == 100.0
            and r["accuracy"]["accuracy_txt"] == f"{test_id}/accuracy/accuracy.txt"
        )
        assert r["gate"] == []  # fmt: skip

    tree = sub / "open" / "Acme"
    server = tree / "results" / "sim_box" / "tiny" / "Server"
    expected = [
        "README.md", "TEST06/accuracy/mlperf_log_accuracy.json", "TEST06/verify_accuracy.txt",
        "accuracy/accuracy.txt", "accuracy/mlperf_log_accuracy.json", "accuracy/mlperf_log_detail.txt",
        "accuracy/mlperf_log_summary.txt", "measurements.json", "performance/run_1/mlperf_log_detail.txt",
        "performance/run_1/mlperf_log_summary.txt", "user.conf",
    ]  # fmt: skip
    assert sorted(str(p.relative_to(server)) for p in server.rglob("*") if p.is_file()) == expected
    assert (server / "TEST06" / "verify_accuracy.txt").read_text().splitlines() == [
        "First token check pass: True",
        "EOS check pass: True",
        "Sample length check pass: True",
        "TEST06 verification complete",
    ]
    assert (server / "user.conf").read_text() == (harness_project.path / "user.conf").read_text()
    system = json.loads((tree / "systems" / "sim_box.json").read_text())
    assert (system["division"], system["submitter"], system["system_type"]) == ("open", "Acme", "datacenter")
    assert system["host_processor_model_name"] and system["accelerators_per_node"] == 0

    report = check_submission(sub)
    assert report.errors == [] and len(report.checked) == 2, report.text()
    # what only a person can say is listed, not invented
    assert "sim_box.json: cooling" in report.todo and "sim_box.json: status" in report.todo
    assert any("min_duration" in n for n in report.notes)  # a 0.3 s run is not a closed submission
    result.stdout.fnmatch_lines(
        ["MLPerf submission tree: */submission/open/Acme", "checked 2 result folder(s): 0 error(s), *"]
    )
    # the same check as a command, exit status 0 on no errors
    cli = subprocess.run(
        [sys.executable, "-m", "harness_fixtures.exporters.submission_check", str(sub)],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr


@pytest.mark.slow
def test_a_streamed_first_token_that_is_not_the_answers_fails_test06(harness_project: HarnessProject) -> None:
    answering_model(harness_project, "liar", ("Server",), first_token_mismatch=True)
    result, session, sub = run_submission(harness_project)
    result.assert_outcomes(failed=1)

    r = yaml.safe_load((session / "liar_server" / "result.yaml").read_text())
    t06 = r["compliance"]["TEST06"]
    assert (t06["passed"], t06["first_token"], t06["eos"], t06["sample_length"]) == (False, False, True, True)
    assert "streamed first token" in t06["examples"]["first_token"]
    assert any(v["metric"] == "TEST06.first_token" and v["source"] == "compliance" for v in r["gate"])
    result.stdout.fnmatch_lines(["TEST06.first_token fail != required pass (must equal, compliance): *"])

    verify = (
        sub / "open" / "Acme" / "results" / "sim_box" / "tiny" / "Server" / "TEST06" / "verify_accuracy.txt"
    )
    assert verify.read_text().splitlines()[:4] == [
        "First token check pass: False",
        "EOS check pass: True",
        "Sample length check pass: True",
        "TEST06 verification failed",
    ]
    report = check_submission(sub)
    assert [e for e in report.errors if "TEST06 first token check did not pass" in e], report.text()
    assert not report.ok
