"""What a session leaves for other tools, on the simulator: result.json in vLLM's names, session.csv
and timeline.csv read by plain pandas, the per-request metrics behind them; repeated runs with their
median and spread; compare and report on the sessions; a clear error for an unset env var."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import TINY_USER_CONF, HarnessProject

from harness_fixtures.client.requestlog import read_requests
from harness_fixtures.gating import Baseline

pd = pytest.importorskip("pandas")


def tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_session_files_other_tools_read(harness_project: HarnessProject) -> None:
    # LoadGen reads ttft_latency / tpot_latency only when the same file turns token latencies on
    # (docs/loadgen.md): without this line the limits would silently stay at LoadGen's 100 ms.
    harness_project.user_conf(TINY_USER_CONF + "tiny.*.use_token_latencies = 1\n")
    harness_project.model("a", ("Offline", "Server"))
    harness_project.run().assert_outcomes(passed=2)
    (session,) = harness_project.session_dirs()

    csv = pd.read_csv(session / "session.csv")
    assert (
        csv["test_id"].tolist() == ["a_offline", "a_server"] and csv["session"].tolist() == [session.name] * 2
    )
    for test_id in ("a_offline", "a_server"):
        folder = session / test_id
        r = yaml.safe_load((folder / "result.yaml").read_text())
        row = csv[csv["test_id"] == test_id].iloc[0]
        assert row["tokens_per_s"] == r["tokens_per_s"] and row["status"] == r["status"]

        # every request: its prompt length, the stream's id, and chunk gaps that add up to its answer
        reqs = read_requests(folder / "requests.jsonl")
        assert {q["input_tokens"] for q in reqs} == {8}  # the dataset's prompts are 8 tokens
        ids = [q["server_request_id"] for q in reqs]
        assert len(set(ids)) == len(ids) and all(i.startswith("cmpl-") for i in ids)
        for q in reqs:
            assert len(q["itl_us"]) == q["n_tokens"] - 1  # one gap per chunk after the first (1 token each)
            streamed_ms = (q["done_s"] - q["first_token_s"]) * 1e3
            assert sum(q["itl_us"]) / 1e3 <= streamed_ms + 0.01
        m = r["requests"]
        assert m["input_tokens_total"] == 8 * r["queries"]["completed"]
        assert m["itl_ms"]["n"] == sum(len(q["itl_us"]) for q in reqs)
        assert m["itl_ms"]["min"] <= m["itl_ms"]["p50"] <= m["itl_ms"]["p99"] <= m["itl_ms"]["max"]
        out_tokens = r["queries"]["output_tokens"]
        total = r["tokens_per_s"] * (m["input_tokens_total"] + out_tokens) / out_tokens
        assert m["total_token_throughput"] == pytest.approx(total, rel=1e-3)
        assert (folder / "user.conf").read_text() == (harness_project.path / "user.conf").read_text()

        # result.json: the same numbers under `vllm bench serve`'s names
        doc = json.loads((folder / "result.json").read_text())
        assert (
            doc["request_throughput"] == r["samples_per_s"] and doc["output_throughput"] == r["tokens_per_s"]
        )
        assert doc["p99_itl_ms"] == m["itl_ms"]["p99"] and doc["std_ttft_ms"] == m["ttft_ms"]["std"]
        assert (
            doc["completed"] == r["queries"]["completed"]
            and doc["total_input_tokens"] == m["input_tokens_total"]
        )

        timeline = pd.read_csv(folder / "timeline.csv")  # no comment line to skip
        assert (
            list(timeline.columns) == ["t_s", "source", "series", "value", "t_unix_s"] and len(timeline) > 0
        )

    server = yaml.safe_load((session / "a_server" / "result.yaml").read_text())
    # the limits LoadGen checked (tiny user.conf: TTFT 2000 ms, TPOT 200 ms at p50), and goodput against them
    assert server["latency_limits"] == {"ttft_ms": 2000.0, "tpot_ms": 200.0, "percentile": 0.5}
    assert server["requests"]["good_requests"] == server["queries"]["completed"]  # far under the limits
    assert server["requests"]["request_goodput"] == pytest.approx(server["samples_per_s"], rel=1e-3)
    assert (
        json.loads((session / "a_server" / "result.json").read_text())["mean_ttft_ms"]
        == server["ttft_ms"]["mean"]
    )
    assert server["ttft_ms"]["min"] <= server["ttft_ms"]["p50"]  # LoadGen's min beside its percentiles


@pytest.mark.slow
def test_repeats_report_the_median_and_compare_and_report_read_sessions(
    harness_project: HarnessProject, tmp_path: Path
) -> None:
    harness_project.model("a", ("Offline",))
    result = harness_project.run("--harness-repeat", "3")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*a_offline-r1*", "*a_offline-r2*", "*a_offline-r3*"])
    result.stdout.fnmatch_lines(
        ["repeated runs: median *", "  a_offline * output tok/s * [[]* - *[]]  spread *  (n=3)"]
    )
    (s1,) = harness_project.session_dirs()
    runs = [yaml.safe_load((s1 / f"a_offline-r{k}" / "result.yaml").read_text()) for k in (1, 2, 3)]
    assert [r["repeat"] for r in runs] == [1, 2, 3] and {r["test_id"] for r in runs} == {"a_offline"}
    summary = yaml.safe_load((s1 / "session.yaml").read_text())["repeats"]["a_offline"]["tokens_per_s"]
    values = [r["tokens_per_s"] for r in runs]
    assert summary["median"] == statistics.median(values) and summary["n"] == 3
    spread = (max(values) - min(values)) / statistics.median(values) * 100
    assert summary["spread_pct"] == pytest.approx(spread, abs=1e-3)

    # an even count cannot have a run's value as its median
    bad = harness_project.run("--harness-repeat", "2")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR and "pass an odd count" in bad.stderr.str()

    harness_project.run().assert_outcomes(passed=1)  # a second session, one run
    s2 = harness_project.session_dirs()[-1]

    cmp = tool("harness_fixtures.compare", str(s1), str(s2), "--metrics", "tokens_per_s,failed_requests")
    assert cmp.returncode == 0, cmp.stderr
    lines = cmp.stdout.splitlines()
    assert lines[0].split() == ["test", "metric", "A:", s1.name, "B:", s2.name, "change", "verdict"]
    row = next(line for line in lines if "tokens_per_s" in line).split()
    assert row[0] == "a_offline" and row[-1] in ("unchanged", "noisy", "regression", "improvement")
    assert "n=3" in " ".join(row)  # A's three runs: median [min-max] n=3
    assert next(line for line in lines if "failed_requests" in line).split()[-1] == "unchanged"

    # any old session as a baseline: the file, and the folder itself for --harness-baseline
    base = tmp_path / "baseline.yaml"
    saved = tool("harness_fixtures.compare", "--save-baseline", str(base), str(s1))
    assert saved.returncode == 0, saved.stderr
    entry = Baseline.load(base).results["a_offline"]
    assert (
        entry["metrics"]["tokens_per_s"] == statistics.median(values)
        and entry["values"]["tokens_per_s"] == values
    )
    assert Baseline.load(s1).results["a_offline"]["metrics"] == entry["metrics"]
    again = harness_project.run("--harness-baseline", str(s1), "--harness-max-regression", "95")
    again.assert_outcomes(passed=1)
    again.stdout.fnmatch_lines([f"baseline comparison ({s1}):", "  a_offline * tokens_per_s * ok"])

    report = tool("harness_fixtures.report", str(s1), str(s2), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    table = pd.read_csv(tmp_path / "report" / "report.csv")
    assert sorted(table["session"].tolist()) == sorted([s1.name] * 3 + [s2.name])
    page = (tmp_path / "report" / "report.html").read_text()
    assert s1.name in page and s2.name in page and page.count("<img") >= 1 + 4  # summary + a plot per run
    assert (tmp_path / "report" / "summary.png").stat().st_size > 10_000


def test_unset_variable_in_a_dataset_path_is_named(harness_project: HarnessProject) -> None:
    harness_project.model("a", ("Offline",), dataset="${HARNESS_TEST_UNSET_DIR}/cnn_eval.json")
    result = harness_project.run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*HARNESS_TEST_UNSET_DIR is not set (used in dataset.path of *a.yaml*"])
    assert "${HARNESS_TEST_UNSET_DIR}/cnn_eval.json'" in result.stdout.str()  # quoted, not used as a path
    assert not list(harness_project.session_dirs()[0].glob("engine-*"))  # no engine started
    harness_project.run("--harness-skip-missing").assert_outcomes(skipped=1)
