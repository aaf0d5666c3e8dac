"""Gates: thresholds, accuracy targets, TEST06-style consistency and baselines, direction by direction.

Unit tests call ``harness_fixtures.gating`` on hand-made result dicts; the pytester tests run the
simulator (reference answers, garbled answers, double EOS, a Llama case reported GPT-OSS style) and
check the failure text, ``result.yaml``'s ``gate:`` entries and the baseline table.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness_fixtures.config import Thresholds
from harness_fixtures.gating import (
    BASELINE_METRICS,
    Baseline,
    GateError,
    Violation,
    apply_overrides,
    baseline_entry,
    check_accuracy,
    check_consistency,
    check_thresholds,
    compare_baseline,
    hardware_of,
    load_threshold_overrides,
    save_baseline,
)

if TYPE_CHECKING:
    pass


def result_dict(**changes: Any) -> dict[str, Any]:
    """A VALID performance result as ``BenchmarkResult.model_dump()`` has it; ``changes`` replace keys."""
    base: dict[str, Any] = {
        "test_id": "m_offline",
        "mode": "performance",
        "scenario": "Offline",
        "status": "VALID",
        "reason": None,
        "tokens_per_s": 1000.0,
        "samples_per_s": 10.0,
        "ttft_ms": {"p50": 50.0, "p90": 80.0, "p99": 100.0},
        "tpot_ms": {"p50": 5.0, "p90": 6.0, "p99": 8.0},
        "latency_ms": {"p50": 500.0, "p90": 700.0, "p99": 900.0},
        "queries": {"issued": 100, "completed": 100, "failed": 0, "first_error": None},
        "client": {"cpu_bound_fraction": 0.1},
        "settings": {
            "target_qps": 10.0,
            "min_duration_ms": 1000,
            "min_query_count": 10,
            "scenario": "Offline",
        },
    }
    base.update(changes)
    return base


def assert_complete(v: Violation) -> None:
    """Every violation says what, how much, against what, which way, in one readable line."""
    assert v.metric and v.direction in ("higher_is_better", "lower_is_better", "must_equal")
    assert "\n" not in v.message
    assert v.message.startswith(f"{v.metric} ")
    assert v.direction.replace("_", " ") in v.message


# --------------------------------------------------------------------------- thresholds

# (threshold field, limit, metric, better, result change that breaks it, its value, one that meets it)
THRESHOLD_CASES: list[tuple[str, float, str, str, dict[str, Any], float, dict[str, Any]]] = [
    (
        "min_tokens_per_s",
        500,
        "tokens_per_s",
        "higher",
        {"tokens_per_s": 499.9},
        499.9,
        {"tokens_per_s": 500.0},
    ),
    ("min_samples_per_s", 5, "samples_per_s", "higher", {"samples_per_s": 4.0}, 4.0, {"samples_per_s": 6.0}),
    (
        "max_ttft_p99_ms",
        200,
        "ttft_p99_ms",
        "lower",
        {"ttft_ms": {"p99": 250.0}},
        250.0,
        {"ttft_ms": {"p99": 200.0}},
    ),
    (
        "max_tpot_p99_ms",
        10,
        "tpot_p99_ms",
        "lower",
        {"tpot_ms": {"p99": 12.5}},
        12.5,
        {"tpot_ms": {"p99": 9.0}},
    ),
    (
        "max_client_cpu_bound_fraction",
        0.5,
        "client_cpu_bound_fraction",
        "lower",
        {"client": {"cpu_bound_fraction": 0.8}},
        0.8,
        {"client": {"cpu_bound_fraction": 0.5}},
    ),
]


@pytest.mark.parametrize(
    ("field", "limit", "metric", "better", "bad", "observed", "good"),
    THRESHOLD_CASES,
    ids=[c[0] for c in THRESHOLD_CASES],
)
def test_threshold_each_kind_and_direction(
    field: str,
    limit: float,
    metric: str,
    better: str,
    bad: dict[str, Any],
    observed: float,
    good: dict[str, Any],
) -> None:
    t = Thresholds(**{field: limit})
    assert check_thresholds(result_dict(**good), t) == []  # at or better than the limit passes

    (v,) = check_thresholds(result_dict(**bad), t)
    assert_complete(v)
    assert (v.metric, v.observed, v.threshold, v.source) == (metric, observed, limit, "threshold")
    assert v.direction == f"{better}_is_better"
    op, word = ("<", "min") if better == "higher" else (">", "max")
    assert v.message == f"{metric} {observed:.4g} {op} {word} {limit:.4g} ({better} is better, threshold)"


def test_threshold_set_but_not_measured_is_a_violation() -> None:
    (v,) = check_thresholds(result_dict(ttft_ms={}), Thresholds(max_ttft_p99_ms=100))
    assert (v.metric, v.observed, v.threshold) == ("ttft_p99_ms", None, 100)
    assert v.message.endswith(": not measured")
    # No CPU samples (a short run) is not a failure: the collector had nothing to say.
    assert check_thresholds(result_dict(client={}), Thresholds(max_client_cpu_bound_fraction=0.5)) == []


def test_max_failed_requests_names_the_count_and_first_error() -> None:
    queries = {"issued": 100, "completed": 97, "failed": 3, "first_error": "HTTP 500: boom"}
    assert check_thresholds(result_dict(queries=queries), Thresholds(max_failed_requests=3)) == []
    (v,) = check_thresholds(result_dict(queries=queries), Thresholds(max_failed_requests=2))
    assert_complete(v)
    assert (v.metric, v.observed, v.threshold, v.direction) == ("failed_requests", 3, 2, "lower_is_better")
    assert v.message == (
        "failed_requests 3 > max 2 (lower is better, threshold): 3 of 100 failed; first error: HTTP 500: boom"
    )
    # The default allows none.
    assert [v.metric for v in check_thresholds(result_dict(queries=queries), Thresholds())] == [
        "failed_requests"
    ]


def test_valid_is_required_unless_require_valid_is_false() -> None:
    invalid = result_dict(status="INVALID", reason="min_duration not met")
    (v,) = check_thresholds(invalid, Thresholds())
    assert_complete(v)
    assert (v.metric, v.observed, v.threshold, v.direction, v.source) == (
        "validity",
        "INVALID",
        "VALID",
        "must_equal",
        "validity",
    )
    assert v.message == "validity INVALID != required VALID (must equal, validity): min_duration not met"
    assert check_thresholds(invalid, Thresholds(require_valid=False)) == []


@pytest.mark.parametrize("status", ["ERROR", "TIMEOUT", "INTERRUPTED"])
def test_a_run_that_did_not_complete_fails_even_without_require_valid(status: str) -> None:
    r = result_dict(status=status, reason="engine died\nlog tail ...", tokens_per_s=None)
    (v,) = check_thresholds(r, Thresholds(require_valid=False, min_tokens_per_s=1))
    assert_complete(v)
    assert (v.metric, v.observed, v.threshold) == ("status", status, "completed")
    assert v.message.endswith(": engine died")  # first line only; the plugin appends the rest


# --------------------------------------------------------------------------- accuracy

TARGET = {"rouge1": 40.0, "rouge2": 16.0, "rougeL": 25.0, "rougeLsum": 36.0, "gen_len": 10_000}
AT_TARGET = {"rouge1": 39.6, "rouge2": 15.84, "rougeL": 24.75, "rougeLsum": 35.64, "gen_len": 10_000}


def test_accuracy_passes_at_exactly_the_min_ratio() -> None:
    assert check_accuracy(AT_TARGET, TARGET, 0.99, (0.9, 1.1)) == []


@pytest.mark.parametrize("key", ["rouge1", "rouge2", "rougeL", "rougeLsum"])
def test_accuracy_min_ratio_per_rouge_key(key: str) -> None:
    scores = {**AT_TARGET, key: AT_TARGET[key] - 0.01}
    (v,) = check_accuracy(scores, TARGET, 0.99, (0.9, 1.1))
    assert_complete(v)
    need = round(TARGET[key] * 0.99, 4)
    assert (v.metric, v.observed, v.threshold, v.direction, v.source) == (
        key,
        scores[key],
        need,
        "higher_is_better",
        "accuracy",
    )
    how = "(higher is better, accuracy): 99% of target"
    assert v.message == f"{key} {scores[key]:.4g} < min {need:.4g} {how} {TARGET[key]}"


def test_accuracy_gen_len_band_both_sides() -> None:
    band = (0.9, 1.1)
    for inside in (9_000, 11_000):
        assert check_accuracy({**AT_TARGET, "gen_len": inside}, TARGET, 0.99, band) == []
    (low,) = check_accuracy({**AT_TARGET, "gen_len": 8_999}, TARGET, 0.99, band)
    assert_complete(low)
    assert (low.metric, low.observed, low.threshold, low.direction) == (
        "gen_len",
        8_999,
        9_000,
        "higher_is_better",
    )
    assert low.message == "gen_len 8999 < min 9000 (higher is better, accuracy): 90% of target 10000"
    (high,) = check_accuracy({**AT_TARGET, "gen_len": 11_001}, TARGET, 0.99, band)
    assert_complete(high)
    assert (high.metric, high.observed, high.threshold, high.direction) == (
        "gen_len",
        11_001,
        11_000,
        "lower_is_better",
    )
    assert high.message == "gen_len 11001 > max 11000 (lower is better, accuracy): 110% of target 10000"


def test_accuracy_missing_scores_fail_and_absent_targets_are_not_checked() -> None:
    violations = check_accuracy({}, TARGET, 0.99, (0.9, 1.1))
    assert [(v.metric, v.observed) for v in violations] == [
        ("rouge1", None),
        ("rouge2", None),
        ("rougeL", None),
        ("rougeLsum", None),
        ("gen_len", None),
    ]
    # Only the keys a target names are gated; gen_len 0 means "no gen_len target".
    only = check_accuracy({"rouge1": 10.0, "gen_len": 5}, {"rouge2": 50.0, "gen_len": 0}, 0.99, (0.9, 1.1))
    assert [(v.metric, v.observed, v.threshold) for v in only] == [("rouge2", None, 49.5)]
    assert check_accuracy({"rouge1": 10.0}, {"rouge1": 10.0}, 0.99, (0.9, 1.1)) == []


# --------------------------------------------------------------------------- consistency


def test_consistency_counters_each_fail_with_an_example() -> None:
    assert check_consistency({"checked": 16, "first_token_mismatch": 0, "multiple_eos": 0}) == []
    assert check_consistency({}) == []
    counters = {
        "checked": 16,
        "first_token_mismatch": 2,
        "multiple_eos": 16,
        "n_tokens_mismatch": 1,
        "examples": {"multiple_eos": "query 7: first=5 data[:3]=[5, 2, 2]"},
    }
    violations = check_consistency(counters)
    assert [(v.metric, v.observed, v.threshold) for v in violations] == [
        ("first_token_mismatch", 2, 0),
        ("multiple_eos", 16, 0),
        ("n_tokens_mismatch", 1, 0),
    ]
    for v in violations:
        assert_complete(v)
        assert (v.direction, v.source) == ("lower_is_better", "consistency")
    assert violations[1].message == (
        "multiple_eos 16 > max 0 (lower is better, consistency): response with more than one EOS token; "
        "e.g. query 7: first=5 data[:3]=[5, 2, 2]"
    )


# --------------------------------------------------------------------------- overrides file


def test_threshold_overrides_case_name_then_test_id(tmp_path: Path) -> None:
    path = tmp_path / "thresholds.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "m": {"min_tokens_per_s": 100, "max_ttft_p99_ms": 500},
                "m_server": {"min_tokens_per_s": 200},
                "other": {"require_valid": False},
            }
        )
    )
    overrides = load_threshold_overrides(path, set(Thresholds.model_fields))
    base = Thresholds(min_tokens_per_s=1, max_tpot_p99_ms=9)
    server = apply_overrides(base, overrides, "m", "m_server")
    assert (server.min_tokens_per_s, server.max_ttft_p99_ms, server.max_tpot_p99_ms) == (200, 500, 9)
    offline = apply_overrides(base, overrides, "m", "m_offline")
    assert (offline.min_tokens_per_s, offline.max_ttft_p99_ms, offline.require_valid) == (100, 500, True)
    assert apply_overrides(base, overrides, "x", "x_offline") == base


def test_threshold_overrides_unknown_key_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "thresholds.yaml"
    path.write_text("m_offline:\n  min_tokens_per_sec: 100\n")
    with pytest.raises(GateError) as exc:
        load_threshold_overrides(path, set(Thresholds.model_fields))
    message = str(exc.value)
    assert str(path) in message and "m_offline" in message and "'min_tokens_per_sec'" in message
    assert "min_tokens_per_s" in message  # the known keys, to spot the typo


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("- a\n- b\n", "expected a mapping of case name or test id"),
        ("m: 5\n", "m: expected a mapping of threshold names"),
        ("m: [unclosed\n", "cannot read"),
    ],
)
def test_threshold_overrides_bad_shapes(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "thresholds.yaml"
    path.write_text(text)
    with pytest.raises(GateError, match=re.escape(match)) as exc:
        load_threshold_overrides(path, set(Thresholds.model_fields))
    assert str(path) in str(exc.value)


def test_threshold_override_bad_value_names_the_test_and_field() -> None:
    with pytest.raises(GateError, match=r"thresholds for m_offline: \('max_failed_requests',\)"):
        apply_overrides(Thresholds(), {"m": {"max_failed_requests": -1}}, "m", "m_offline")


# --------------------------------------------------------------------------- baselines


def metadata(version: str = "0.9", cpu: str = "Xeon", args: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "engine": {"version": version, "argv": ["vllm", "serve", "--port", "8001", *args]},
        "environment": {"cpu": {"model": cpu}, "gpus": [{"name": "H100"}]},
        "outputs": {"test_dir": "/out/20250101-000000/m_offline"},
    }


def baseline_of(result: dict[str, Any], md: dict[str, Any], test_id: str = "m_offline") -> Baseline:
    return Baseline(
        created_utc="2025-01-01T00:00:00+00:00",
        hardware=hardware_of(md),
        results={test_id: baseline_entry(result, md)},
    )


def test_baseline_round_trips_through_its_file(tmp_path: Path) -> None:
    md = metadata()
    path = tmp_path / "sub" / "baseline.yaml"
    save_baseline(path, {"m_offline": baseline_entry(result_dict(), md)}, hardware_of(md))
    b = Baseline.load(path)
    assert b.hardware == {"cpu": "Xeon", "gpus": ["H100"]}
    entry = b.results["m_offline"]
    assert set(entry["metrics"]) <= set(BASELINE_METRICS)
    assert entry["metrics"]["tokens_per_s"] == 1000.0 and entry["metrics"]["ttft_p99_ms"] == 100.0
    assert entry["engine_args"] == ["serve"]  # no executable, no per-run port
    # The same run compares clean: no violations, no warnings, every metric "ok".
    violations, warnings, rows = compare_baseline("m_offline", result_dict(), md, b, 5.0, {})
    assert (violations, warnings) == ([], [])
    assert rows and not any(r["regressed"] for r in rows)


def test_baseline_unusable_file_says_how_to_fix(tmp_path: Path) -> None:
    path = tmp_path / "baseline.yaml"
    path.write_text("results: 5\n")
    with pytest.raises(GateError, match="re-create it with --harness-save-baseline") as exc:
        Baseline.load(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize(
    ("metric", "change", "worse", "direction"),
    [
        ("tokens_per_s", {"tokens_per_s": 940.0}, True, "higher_is_better"),  # -6 %
        ("tokens_per_s", {"tokens_per_s": 960.0}, False, "higher_is_better"),  # -4 %
        ("tokens_per_s", {"tokens_per_s": 5000.0}, False, "higher_is_better"),  # better
        ("ttft_p99_ms", {"ttft_ms": {"p50": 50.0, "p99": 106.0}}, True, "lower_is_better"),  # +6 %
        ("ttft_p99_ms", {"ttft_ms": {"p50": 50.0, "p99": 104.0}}, False, "lower_is_better"),
        ("ttft_p99_ms", {"ttft_ms": {"p50": 50.0, "p99": 10.0}}, False, "lower_is_better"),  # better
    ],
)
def test_baseline_regression_by_direction(
    metric: str, change: dict[str, Any], worse: bool, direction: str
) -> None:
    md = metadata()
    b = baseline_of(result_dict(), md)
    violations, warnings, rows = compare_baseline("m_offline", result_dict(**change), md, b, 5.0, {})
    assert warnings == []
    row = next(r for r in rows if r["metric"] == metric)
    assert row["regressed"] is worse and row["allowed_regression_pct"] == 5.0
    assert [v.metric for v in violations] == ([metric] if worse else [])
    if worse:
        (v,) = violations
        assert_complete(v)
        assert (v.direction, v.source) == (direction, "baseline")
        base = 1000.0 if metric == "tokens_per_s" else 100.0
        assert v.threshold == pytest.approx(base * (0.95 if direction == "higher_is_better" else 1.05))
        assert "6.0% worse than baseline" in v.message and "(allowed 5.0%)" in v.message


def test_baseline_per_metric_override_wins_over_the_global_allowance() -> None:
    md = metadata()
    b = baseline_of(result_dict(), md)
    slower = result_dict(tokens_per_s=900.0, ttft_ms={"p99": 150.0})  # -10 %, +50 %
    violations, _, rows = compare_baseline("m_offline", slower, md, b, 5.0, {"ttft_p99_ms": 60.0})
    assert [v.metric for v in violations] == ["tokens_per_s"]
    allowed = {r["metric"]: r["allowed_regression_pct"] for r in rows}
    assert allowed["ttft_p99_ms"] == 60.0 and allowed["tokens_per_s"] == 5.0
    # The same 10 % allowed globally: tokens_per_s passes, ttft keeps its own 60 %.
    violations, _, _ = compare_baseline("m_offline", slower, md, b, 10.0, {"ttft_p99_ms": 60.0})
    assert violations == []


@pytest.mark.parametrize(
    ("now", "warning"),
    [
        (metadata(cpu="EPYC"), "baseline hardware"),
        (metadata(version="0.10"), "engine version 0.10 vs baseline 0.9"),
        (metadata(args=("--max-num-seqs", "8")), "LoadGen settings or engine args differ"),
    ],
    ids=["hardware", "engine", "engine-args"],
)
def test_baseline_warns_when_the_setup_differs(now: dict[str, Any], warning: str) -> None:
    b = baseline_of(result_dict(), metadata())
    violations, warnings, _ = compare_baseline("m_offline", result_dict(), now, b, 5.0, {})
    assert violations == []
    assert len(warnings) == 1 and warning in warnings[0] and warnings[0].startswith("m_offline: ")


def test_baseline_warns_when_loadgen_settings_differ() -> None:
    b = baseline_of(result_dict(), metadata())
    other = result_dict(settings={**result_dict()["settings"], "target_qps": 20.0})
    _, warnings, _ = compare_baseline("m_offline", other, metadata(), b, 5.0, {})
    assert warnings == ["m_offline: LoadGen settings or engine args differ from the baseline's"]


def test_baseline_ignores_the_per_session_output_folder_in_engine_args() -> None:
    # The simulator's argv names a settings file inside the session folder: a new path every session.
    def md(session: str) -> dict[str, Any]:
        m = metadata(args=("--config", f"/out/{session}/engine-m/sim_settings.json"))
        m["outputs"]["test_dir"] = f"/out/{session}/m_offline"
        return m

    b = baseline_of(result_dict(), md("20250101-000000"))
    _, warnings, _ = compare_baseline("m_offline", result_dict(), md("20250102-000000"), b, 5.0, {})
    assert warnings == []


def test_baseline_test_missing_is_a_warning_not_a_failure() -> None:
    b = baseline_of(result_dict(), metadata())
    violations, warnings, rows = compare_baseline("m_server", result_dict(), metadata(), b, 5.0, {})
    assert (violations, rows) == ([], [])
    assert warnings == ["m_server: not in the baseline (saved 2025-01-01T00:00:00+00:00)"]


# --------------------------------------------------------------------------- end to end (simulator)


FAST_SIM: dict[str, Any] = {"ttft_base_ms": 10, "itl_ms": 1, "max_batch": 16}


# --------------------------------------------------------------------------- checked before any run
def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    keys = st.sampled_from(["m", "m_offline", "results", "metrics", "created_utc", "max_ttft_p99_ms", "x"])
    return st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=4)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"max_ttft_p99_ms": "fast"}, r"m: max_ttft_p99_ms: Input should be a valid number.*\(got 'fast'\)"),
        ({"max_failed_requests": -1}, r"m: max_failed_requests: Input should be greater than or equal to 0"),
        ({"max_regression_pct_per_metric": 5}, r"m: max_regression_pct_per_metric: .*valid dictionary"),
    ],
)
def test_threshold_values_are_checked_when_the_file_is_read(
    tmp_path: Path, values: dict[str, Any], match: str
) -> None:
    """A bad value used to pass configure and crash after the whole run."""
    path = tmp_path / "thresholds.yaml"
    path.write_text(yaml.safe_dump({"m": values}))
    with pytest.raises(GateError, match=match) as exc:
        load_threshold_overrides(path, set(Thresholds.model_fields))
    assert str(path) in str(exc.value) and "fix the value" in str(exc.value)


def test_threshold_names_that_match_no_case_or_test_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "thresholds.yaml"
    path.write_text("m_ofline:\n  min_tokens_per_s: 1\nm:\n  min_tokens_per_s: 1\n")
    names = {"m", "m_offline", "m_server"}
    with pytest.raises(GateError, match=r"'m_ofline' is neither a case name nor a test id.*'m_offline'"):
        load_threshold_overrides(path, set(Thresholds.model_fields), names)
    path.write_text("m_server:\n  min_tokens_per_s: 1\n")
    assert load_threshold_overrides(path, set(Thresholds.model_fields), names) == {
        "m_server": {"min_tokens_per_s": 1}
    }


@pytest.mark.parametrize("bad", ["fast", True, None, float("nan"), [1]])
def test_baseline_metrics_must_be_finite_numbers(tmp_path: Path, bad: Any) -> None:
    """A non-numeric metric used to crash the comparison after the run."""
    path = tmp_path / "baseline.yaml"
    doc = {"created_utc": "2025", "results": {"m_offline": {"metrics": {"tokens_per_s": bad}}}}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(GateError) as exc:
        Baseline.load(path)
    message = str(exc.value)
    assert str(path) in message and "results.m_offline.metrics.tokens_per_s" in message
    assert "not a finite number" in message and "--harness-save-baseline" in message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.recursive(st.none() | st.booleans() | st.floats() | st.text(max_size=8), _containers))
def test_any_thresholds_or_baseline_file_is_read_or_named_never_a_crash(tmp_path: Path, doc: Any) -> None:
    """Whatever YAML a user hands in, reading it gives the data or a GateError: never a traceback.
    (One file, rewritten for each example.)"""
    path = tmp_path / "file.yaml"
    path.write_text(yaml.safe_dump(doc))
    for read in (
        lambda: load_threshold_overrides(path, set(Thresholds.model_fields), {"m"}),
        lambda: Baseline.load(path),
    ):
        try:
            read()
        except GateError as exc:
            assert str(path) in str(exc)
