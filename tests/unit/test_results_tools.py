"""Unit tests of what turns results into things people use: the flat table, result.json, request
metrics, the comparison verdicts, TEST06's verification, the submission check, env-var expansion,
the SSE id and tokenizers from the Hugging Face cache."""

from __future__ import annotations

import array
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from harness_fixtures.accuracy.run import AccuracyRunError, tokenizer_dir
from harness_fixtures.client.requestlog import request_metrics
from harness_fixtures.client.streaming import _chunk_id
from harness_fixtures.compare import CompareError, _nest, compare, read_side, verdict
from harness_fixtures.config import BenchmarkCase, ConfigError, expand_env, load_case
from harness_fixtures.exporters.submission_check import check_submission
from harness_fixtures.exporters.vllm_json import vllm_result
from harness_fixtures.loadgen.compliance import AUDIT_FOUND, verify_test06
from harness_fixtures.results import LatencyLimits
from harness_fixtures.table import Spread, flat_row, group_metrics, metric_values, to_csv

ROOT = Path(__file__).resolve().parents[2]


# -- request metrics ------------------------------------------------------------------------------
def req(
    first: float, done: float, n: int, itl_us: list[int], status: str = "ok", inp: int | None = 8
) -> dict[str, Any]:
    return {"issued_s": 0.0, "sent_s": 0.001, "first_token_s": first, "done_s": done, "n_tokens": n,
            "status": status, "itl_us": itl_us, "input_tokens": inp}  # fmt: skip


def test_request_metrics_goodput_itl_and_tokens() -> None:
    rows = [
        req(0.1, 0.5, 5, [100_000] * 4),  # TTFT 100 ms, TPOT 100 ms: good
        req(0.3, 0.7, 5, [100_000] * 4),  # TTFT 300 ms: over the 200 ms limit
        req(0.1, 1.3, 5, [300_000] * 4),  # TPOT 300 ms: over the 250 ms limit
        req(0.0, 0.0, 0, [], status="error"),  # failed: not counted anywhere but here
    ]
    m = request_metrics(rows, LatencyLimits(ttft_ms=200, tpot_ms=250), tokens_per_s=30.0, samples_per_s=3.0)
    assert m.good_requests == 1 and m.request_goodput == 1.0  # 3 samples/s x 1 good of 3 completed
    assert m.itl_ms.n == 12 and m.itl_ms.min == 100.0 and m.itl_ms.max == 300.0
    assert m.ttft_ms.n == 3 and m.ttft_ms.p50 == 100.0 and m.ttft_ms.max == 300.0
    assert m.input_tokens_total == 24 and m.input_tokens_mean == 8.0 and m.output_tokens_mean == 5.0
    assert m.total_token_throughput == pytest.approx(30.0 * (24 + 15) / 15)
    # no limits (Offline): no goodput; an unknown prompt length: no total instead of a guess
    m = request_metrics([req(0.1, 0.5, 5, [1], inp=None), req(0.1, 0.5, 5, [1])], None, 10.0, 1.0)
    assert m.good_requests is None and m.request_goodput is None
    assert m.input_tokens_total is None and m.total_token_throughput is None


# -- table and result.json ------------------------------------------------------------------------
RESULT: dict[str, Any] = {
    "test_id": "m_server", "model": "m", "scenario": "Server", "mode": "performance", "loadgen_model": "m",
    "status": "VALID", "samples_per_s": 2.0, "tokens_per_s": 64.0,
    "ttft_ms": {"p50": 50.0, "p90": 60.0, "p99": 80.0, "mean": 52.0},
    "tpot_ms": {"p50": 5.0, "p90": 5.5, "p99": 6.0, "mean": 5.1},
    "latency_ms": {"p50": 210.0, "p90": 220.0, "p99": 230.0, "mean": 211.0},
    "queries": {"issued": 10, "completed": 10, "failed": 0, "output_tokens": 320},
    "requests": {"input_tokens_total": 80, "ttft_ms": {"std": 3.0, "p50": 49.0}, "tpot_ms": {"std": 0.2},
                 "itl_ms": {"mean": 5.0, "p50": 4.9, "p90": 6.0, "p99": 9.0, "std": 1.0},
                 "e2el_ms": {"std": 7.0}, "total_token_throughput": 80.0, "request_goodput": 1.8},
    "settings": {"target_qps": 2.0},
    "latency_limits": {"ttft_ms": 2000.0, "tpot_ms": 100.0, "percentile": 0.99},
    "accuracy": {"scores": {"rouge1": 40.0, "gen_len": 100}}, "gate": [],
}  # fmt: skip


def test_result_json_uses_vllm_names_and_result_yaml_values() -> None:
    doc = vllm_result(RESULT, {"engine": {"kind": "vllm", "served_model": "m"}, "finished_utc": "t"})
    assert doc["request_throughput"] == 2.0 and doc["output_throughput"] == 64.0
    assert (doc["mean_ttft_ms"], doc["median_ttft_ms"], doc["p99_ttft_ms"]) == (52.0, 50.0, 80.0)  # LoadGen's
    assert doc["std_ttft_ms"] == 3.0  # the client's: LoadGen reports no std
    assert (doc["median_itl_ms"], doc["p99_itl_ms"]) == (4.9, 9.0)  # ITL is the client's
    assert (doc["mean_e2el_ms"], doc["p99_e2el_ms"]) == (211.0, 230.0)
    assert doc["total_token_throughput"] == 80.0 and doc["request_goodput"] == 1.8
    assert doc["duration"] == 5.0 and doc["completed"] == 10 and doc["total_input_tokens"] == 80
    assert doc["goodput_slo_ms"] == {"ttft": 2000.0, "tpot": 100.0} and doc["request_rate"] == 2.0
    # Offline: LoadGen measures no TTFT, so the client's numbers stand in (the same result.yaml values)
    offline = {
        **RESULT,
        "scenario": "Offline",
        "ttft_ms": {},
        "requests": {"ttft_ms": {"p50": 7.0, "mean": 8.0}},
    }
    doc = vllm_result(offline)
    assert (doc["median_ttft_ms"], doc["mean_ttft_ms"], doc["request_rate"]) == (7.0, 8.0, "inf")


def test_flat_row_and_csv_hold_the_result_values() -> None:
    pd = pytest.importorskip("pandas")
    values = metric_values(RESULT)
    assert values["ttft_p99_ms"] == 80.0 and values["itl_p99_ms"] == 9.0 and values["rouge1"] == 40.0
    assert "rougeL" not in values  # not measured: no number made up
    row = flat_row(RESULT, "s1", {"engine": {"kind": "vllm", "version": "0.32"}})
    frame = pd.read_csv(__import__("io").StringIO(to_csv([row, {**row, "session": "s2"}])))
    assert frame["session"].tolist() == ["s1", "s2"] and frame["tokens_per_s"].tolist() == [64.0, 64.0]
    assert frame["engine"].tolist() == ["vllm 0.32"] * 2 and frame["rougeL"].isna().all()


# -- compare ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("metric", "a", "b", "expected"),
    [
        ("tokens_per_s", (100.0,), (103.0,), "unchanged"),  # within 5 %
        ("tokens_per_s", (100.0,), (80.0,), "regression"),  # throughput down
        ("tokens_per_s", (100.0,), (120.0,), "improvement"),
        ("ttft_p99_ms", (100.0,), (120.0,), "regression"),  # latency up
        ("ttft_p99_ms", (100.0,), (80.0,), "improvement"),
        ("tokens_per_s", (90.0, 100.0, 110.0), (80.0, 88.0, 95.0), "noisy"),  # the runs overlap
        ("tokens_per_s", (98.0, 100.0, 102.0), (80.0, 81.0, 82.0), "regression"),  # they do not
        ("gen_len", (100.0,), (150.0,), "changed"),  # no better direction
        ("failed_requests", (0.0,), (0.0,), "unchanged"),
        ("failed_requests", (0.0,), (3.0,), "regression"),
    ],
)
def test_verdicts(metric: str, a: tuple[float, ...], b: tuple[float, ...], expected: str) -> None:
    assert verdict(metric, Spread(a), Spread(b), 5.0)[1] == expected


def test_compare_groups_repeats_by_test_and_reads_baselines(tmp_path: Path) -> None:
    runs = [{**RESULT, "repeat": k, "tokens_per_s": v} for k, v in ((1, 60.0), (2, 64.0), (3, 70.0))]
    grouped = group_metrics(runs)
    assert grouped["m_server"]["tokens_per_s"].values == (60.0, 64.0, 70.0)
    assert grouped["m_server"]["tokens_per_s"].median == 64.0
    baseline = tmp_path / "base.yaml"
    baseline.write_text(
        yaml.safe_dump(
            {
                "created_utc": "2026-01-01T00:00:00",
                "results": {
                    "m_server": {"metrics": {"tokens_per_s": 80.0}, "values": {"tokens_per_s": [79, 80, 81]}}
                },
            }
        )
    )
    side = read_side(str(baseline))
    assert side.tests["m_server"]["tokens_per_s"].values == (79, 80, 81)
    result_file = tmp_path / "result.yaml"
    result_file.write_text(yaml.safe_dump(RESULT))
    (row,) = compare(side, read_side(str(result_file)), 5.0, ["tokens_per_s"])
    assert (row.verdict, round(row.change_pct or 0, 1)) == ("regression", -20.0)
    with pytest.raises(CompareError, match=r"not a session folder, result\.yaml, baseline file or mlflow"):
        read_side(str(tmp_path / "missing"))
    assert _nest({"ttft_ms.p99": 3.0, "tokens_per_s": 1.0}) == {"ttft_ms": {"p99": 3.0}, "tokens_per_s": 1.0}


# -- TEST06 -----------------------------------------------------------------------------------------
def hexids(ids: list[int]) -> str:
    return array.array("i", ids).tobytes().hex().upper()


def t06_dir(tmp_path: Path, entries: list[dict[str, Any]], audit: bool = True) -> Path:
    mlperf = tmp_path / "mlperf"
    mlperf.mkdir(parents=True)
    (mlperf / "mlperf_log_detail.txt").write_text(AUDIT_FOUND + "\n" if audit else "nothing\n")
    (mlperf / "mlperf_log_accuracy.json").write_text(json.dumps(entries))
    return tmp_path


def entry(
    data: list[int], first: int | None = None, count: int | None = None, idx: int = 0
) -> dict[str, Any]:
    e: dict[str, Any] = {
        "seq_id": idx,
        "qsl_idx": idx,
        "data": hexids(data),
        "token_count": len(data) if count is None else count,
    }
    if first is not None:
        e["token_data"] = hexids([first])
    return e  # fmt: skip


def test_test06_rules(tmp_path: Path) -> None:
    good = [entry([5, 6, 2], first=5), entry([7, 2], first=7, idx=1)]
    v = verify_test06(t06_dir(tmp_path / "good", good), "Server", [2])
    assert v.passed and v.text().splitlines()[:4] == [
        "First token check pass: True", "EOS check pass: True", "Sample length check pass: True",
        "TEST06 verification complete",
    ]  # fmt: skip
    bad = [
        entry([5, 6, 2, 2], first=5),
        entry([7, 8], first=9, idx=1),
        entry([1, 2], first=1, count=3, idx=2),
    ]
    v = verify_test06(t06_dir(tmp_path / "bad", bad), "Server", [2])
    assert (v.first_token, v.eos, v.sample_length, v.passed) == (False, False, False, False)
    assert "ends in 2 EOS" in v.examples["eos"] and "token_count 3 != 2" in v.examples["sample_length"]
    # Offline: no first token is reported, so that check is skipped, as MLCommons' script does
    v = verify_test06(t06_dir(tmp_path / "offline", [entry([5, 2])]), "Offline", [2])
    assert v.first_token is None and v.passed and "First token check pass: Skipped" in v.text()
    # the server's non-streamed answer disagreeing with the streamed first token fails the check
    v = verify_test06(t06_dir(tmp_path / "stream", good), "Server", [2], answer_first={0: 5, 1: 8})
    assert v.first_token is False and "non-streamed answer's 8" in v.examples["first_token"]
    # no audit.config found by LoadGen: not a TEST06 run at all
    v = verify_test06(t06_dir(tmp_path / "plain", good, audit=False), "Server", [2])
    assert not v.passed and "audit.config" in (v.error or "")


# -- submission check on hand-made trees ------------------------------------------------------------
FIELDS = (
    "input_data_types",
    "retraining",
    "starting_weights_filename",
    "weight_data_types",
    "weight_transformations",
)
MEASUREMENTS = json.dumps(dict.fromkeys(FIELDS, "x"))


def make_tree(root: Path, division: str = "open", rouge1: float = 38.8) -> Path:
    sub = root / division / "Acme"
    scen = sub / "results" / "box" / "llama3.1-8b" / "Offline"
    (sub / "src").mkdir(parents=True)
    from harness_fixtures.exporters.submission import SYSTEM_FIELDS

    system = dict.fromkeys(SYSTEM_FIELDS, "x")
    system.update(division=division, submitter="Acme", status="available", system_type="datacenter")
    (sub / "systems").mkdir()
    (sub / "systems" / "box.json").write_text(json.dumps(system))
    valid = ':::MLLOG {"key": "result_validity", "value": "VALID"}\n'
    for d, files in {
        scen / "performance" / "run_1": {"mlperf_log_summary.txt": "s", "mlperf_log_detail.txt": valid},
        scen / "accuracy": {
            "accuracy.txt": f"{{'rouge1': '{rouge1}', 'rouge2': '16', 'rougeL': '25', 'rougeLsum': '36', "
            "'gen_len': 8000000, 'gen_num': 13368}\nhash=abc123\n",
            "mlperf_log_accuracy.json": "[]", "mlperf_log_detail.txt": "d", "mlperf_log_summary.txt": "s",
        },
        scen / "TEST06": {"verify_accuracy.txt": "First token check pass: Skipped\nEOS check pass: True\n"
                          "Sample length check pass: True\nTEST06 verification complete\n"},
        scen / "TEST06" / "accuracy": {"mlperf_log_accuracy.json": json.dumps([entry([5, 2])])},
        scen: {"user.conf": "x", "README.md": "x", "measurements.json": MEASUREMENTS},
    }.items():  # fmt: skip
        d.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (d / name).write_text(text)
    return scen


def test_submission_check_accepts_a_complete_tree_and_names_what_is_wrong(tmp_path: Path) -> None:
    make_tree(tmp_path / "ok", "closed")
    report = check_submission(tmp_path / "ok")
    assert report.ok and report.errors == [] and report.todo == [], report.text()

    scen = make_tree(tmp_path / "broken", "closed", rouge1=30.0)
    (scen / "user.conf").unlink()
    (scen / "TEST06" / "verify_accuracy.txt").write_text("EOS check pass: False\n")
    report = check_submission(tmp_path / "broken")
    text = "\n".join(report.errors)
    assert "needs user.conf" in text and "TEST06 EOS check did not pass" in text
    assert "accuracy rouge1 30.0 < 38.3914" in text  # 99 % of 38.7792, closed division: an error
    assert not report.ok

    make_tree(tmp_path / "open", "open", rouge1=30.0)
    report = check_submission(tmp_path / "open")
    assert report.ok and any("rouge1 30.0" in n for n in report.notes)  # open: a note, not an error


# -- config: env vars in paths, the Llama case ------------------------------------------------------
def test_expand_env_names_an_unset_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLPERF_DATA_DIR", raising=False)
    with pytest.raises(ConfigError, match=r"^MLPERF_DATA_DIR is not set \(used in dataset.path: "):
        expand_env("${MLPERF_DATA_DIR}/cnn_eval.json", "dataset.path")
    assert expand_env("${MLPERF_DATA_DIR:-/data}/cnn_eval.json") == "/data/cnn_eval.json"
    monkeypatch.setenv("MLPERF_DATA_DIR", "/mnt/x")
    assert expand_env("${MLPERF_DATA_DIR}/a") == expand_env("$MLPERF_DATA_DIR/a") == "/mnt/x/a"


@given(st.text(alphabet=st.characters(blacklist_characters="$~"), max_size=40))
def test_expand_env_leaves_text_without_references_alone(text: str) -> None:
    assert expand_env(text) == text


@given(st.from_regex(r"[A-Z][A-Z0-9_]{0,10}", fullmatch=True), st.text(alphabet="abc/._-", max_size=12))
def test_expand_env_default_applies_only_when_unset(name: str, default: str) -> None:
    saved = os.environ.pop(name, None)
    try:
        assert expand_env(f"${{{name}:-{default}}}") == default
        os.environ[name] = "set"
        assert expand_env(f"${{{name}:-{default}}}") == "set"
    finally:
        os.environ.pop(name, None)
        if saved is not None:
            os.environ[name] = saved


def test_llama_case_reads_its_model_variable_and_has_the_mlperf_accuracy_target(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from harness_fixtures.accuracy.run import resolve_target

    case = load_case(ROOT / "benchmarks" / "models" / "llama31_8b.yaml")
    monkeypatch.delenv("LLAMA31_8B_MODEL", raising=False)
    assert case.engine_model() == "meta-llama/Llama-3.1-8B-Instruct"
    monkeypatch.setenv("LLAMA31_8B_MODEL", str(tmp_path))
    assert case.engine_model() == str(tmp_path)
    assert resolve_target(case) == {
        "rouge1": 38.7792, "rouge2": 15.9075, "rougeL": 24.4957, "rougeLsum": 35.793, "gen_len": 8167644.0,
    }  # fmt: skip


def test_tokenizer_from_the_hugging_face_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--org--model"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "tokenizer.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    case = BenchmarkCase.model_validate(
        {"name": "c", "engine": {"kind": "vllm", "model": "org/model"}, "dataset": {"path": "d.json"},
         "loadgen_model": {"Offline": "c"}, "scenarios": ["Offline"]}
    )  # fmt: skip
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert tokenizer_dir(case) == snap
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    with pytest.raises(
        AccuracyRunError, match=r"no tokenizer.json for engine.model 'org/model'.*models--org--model"
    ):
        tokenizer_dir(case)


# -- the stream's own request id --------------------------------------------------------------------
@given(st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True), st.text(max_size=30))
def test_chunk_id_is_the_chunks_id_whatever_text_follows(rid: str, text: str) -> None:
    chunk = json.dumps({"id": rid, "choices": [{"text": text, "token_ids": [1]}]}, separators=(",", ":"))
    assert _chunk_id(chunk.encode()) == rid
    assert _chunk_id(json.dumps({"choices": [{"text": text}]}, separators=(",", ":")).encode()) is None


def test_sse_stream_records_the_id_line_and_each_chunks_arrival() -> None:
    from harness_fixtures.client.streaming import RequestRecord, _SseStream

    rec = RequestRecord(query_id=1, sample_index=0, issued_ns=0)
    stream = _SseStream(None, rec, report=False, usage_mode=False)  # type: ignore[arg-type]
    chunk = b'data: {"id":"cmpl-9","choices":[{"index":0,"text":"a","token_ids":[%d]}]}\n\n'
    stream.feed(b"id: evt-1\n" + chunk % 5)
    stream.feed(chunk % 6 + chunk % 7 + b"data: [DONE]\n\n")
    assert rec.server_request_id == "evt-1"  # the SSE id field came first and wins
    assert rec.token_ids == [5, 6, 7] and len(rec.chunk_ns) == 3 and rec.chunk_ns == sorted(rec.chunk_ns)
    rec2 = RequestRecord(query_id=2, sample_index=0, issued_ns=0)
    _SseStream(None, rec2, report=False, usage_mode=False).feed(chunk % 5)  # type: ignore[arg-type]
    assert rec2.server_request_id == "cmpl-9"  # else the chunk's own id
