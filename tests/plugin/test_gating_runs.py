"""Gates: thresholds, accuracy targets, TEST06-style consistency and baselines, direction by direction.

Unit tests call ``harness_fixtures.gating`` on hand-made result dicts; the pytester tests run the
simulator (reference answers, garbled answers, double EOS, a Llama case reported GPT-OSS style) and
check the failure text, ``result.yaml``'s ``gate:`` entries and the baseline table.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from support import EOS, TINY_SIM, build_tokenizer, summaries, write_responses

from harness_fixtures.accuracy.rouge import score_texts
from harness_fixtures.gating import (
    BASELINE_METRICS,
)

if TYPE_CHECKING:
    from support import HarnessProject


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


# --------------------------------------------------------------------------- accuracy


# --------------------------------------------------------------------------- consistency


# --------------------------------------------------------------------------- overrides file


# --------------------------------------------------------------------------- baselines


# --------------------------------------------------------------------------- end to end (simulator)

FAST_SIM: dict[str, Any] = {"ttft_base_ms": 10, "itl_ms": 1, "max_batch": 16}


@pytest.mark.slow
def test_accuracy_run_on_reference_answers_passes_and_garbled_answers_fail(
    harness_project: HarnessProject,
) -> None:
    root = harness_project.path
    refs = summaries()
    vocab = build_tokenizer(root / "tok", refs)
    ids = [[vocab[w] for w in t.split()] for t in refs]
    # Distinct prompts of ids in the tokenizer's vocabulary (the harness checks them against it).
    prompts = [[3 + i, 4 + i, 5 + i] for i in range(len(refs))]
    rows = [
        {"input": f"article {i}", "tok_input": p, "output": t}
        for i, (p, t) in enumerate(zip(prompts, refs, strict=True))
    ]
    (root / "data" / "summaries.json").write_text(json.dumps(rows))
    exact = write_responses(root / "exact.json", prompts, ids)
    # Another sample's answer, first half only: lower ROUGE and gen_len ~50 % of the target.
    garbled = write_responses(root / "garbled.json", prompts, [o[: len(o) // 2] for o in ids[1:] + ids[:1]])

    gen_len = score_texts(refs, refs).gen_len
    target = {"rouge1": 100, "rouge2": 100, "rougeL": 100, "rougeLsum": 100, "gen_len": gen_len}
    for name, responses in (("exact", exact), ("garbled", garbled)):
        harness_project.model(
            name,
            (),  # only the <model>_accuracy test
            sim={**FAST_SIM, "responses_file": str(responses), "eos_token_id": EOS},
            dataset="../data/summaries.json",
            generation={"max_tokens": max(map(len, ids)) + 8, "eos_token_ids": [EOS]},
            tokenizer="../tok",
            accuracy={"target": target},
        )

    result = harness_project.run()
    result.assert_outcomes(passed=1, failed=1)
    lines = result.outlines
    (session,) = harness_project.session_dirs()

    good = yaml.safe_load((session / "exact_accuracy" / "result.yaml").read_text())
    assert (good["test_id"], good["mode"], good["status"]) == ("exact_accuracy", "accuracy", "VALID")
    assert good["gate"] == []
    scores = good["accuracy"]["scores"]
    assert {k: scores[k] for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")} == dict.fromkeys(
        ("rouge1", "rouge2", "rougeL", "rougeLsum"), 100.0
    )
    assert (scores["gen_len"], scores["gen_num"]) == (gen_len, len(refs))
    assert good["consistency"]["multiple_eos"] == 0 and good["consistency"]["checked"] == len(refs)
    assert (session / "exact_accuracy" / "accuracy.txt").is_file()

    bad = yaml.safe_load((session / "garbled_accuracy" / "result.yaml").read_text())
    gate = {v["metric"]: v for v in bad["gate"]}
    assert set(gate) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len"}, bad["gate"]
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        v = gate[key]
        assert (v["threshold"], v["direction"], v["source"]) == (99.0, "higher_is_better", "accuracy")
        # observed as accuracy.txt prints it (4 decimals: what the checker reads)
        assert v["observed"] == round(bad["accuracy"]["scores"][key], 4) and v["observed"] < 99
        # One line per metric in the failure text: metric, observed, threshold, direction.
        pattern = rf"^{key} [\d.]+ < min 99 \(higher is better, accuracy\): 99% of target 100"
        assert any(re.match(pattern, line) for line in lines), (pattern, result.stdout.str())
    assert gate["gen_len"]["observed"] < gate["gen_len"]["threshold"] == round(0.9 * gen_len)
    assert any(re.match(r"^gen_len \d+ < min \d+ \(higher is better, accuracy\)", line) for line in lines)
    result.stdout.fnmatch_lines(
        ["*garbled_accuracy FAILED:", "  - rouge1 * < min 99 (higher is better, accuracy)*"]
    )


@pytest.mark.slow
def test_baseline_regression_fails_and_max_regression_allows_it(harness_project: HarnessProject) -> None:
    harness_project.model("a", ("Offline",))
    base = harness_project.path / "baseline.yaml"

    harness_project.run("--harness-save-baseline", str(base)).assert_outcomes(passed=1)
    data = yaml.safe_load(base.read_text())
    metrics = data["results"]["a_offline"]["metrics"]
    measured = metrics["tokens_per_s"]
    # The injected regression: a baseline 10x faster. Every other metric is far worse in the
    # baseline, so only tokens_per_s can fail.
    for k in metrics:
        better_now = 1e-3 if BASELINE_METRICS[k] == "higher_is_better" else 1e3
        metrics[k] *= 10 if k == "tokens_per_s" else better_now
    base.write_text(yaml.safe_dump(data))

    result = harness_project.run("--harness-baseline", str(base))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "tokens_per_s * < min * (higher is better, baseline): *% worse than baseline * (allowed 5.0%)",
            f"baseline comparison ({base}):",
            "  a_offline * tokens_per_s * -> * -*%  (allowed 5.0%)  REGRESSED",
        ]
    )
    # ~90 % slower than the baseline, give or take this run's own noise.
    (worse,) = re.findall(r"^tokens_per_s .*: ([\d.]+)% worse than baseline", result.stdout.str(), re.M)
    assert 50 < float(worse) < 100
    result.stdout.fnmatch_lines(["  a_offline * samples_per_s * (allowed 5.0%)  ok"])
    assert not [line for line in result.outlines if "warning:" in line]  # same machine, engine, settings
    session = harness_project.session_dirs()[-1]
    r = yaml.safe_load((session / "a_offline" / "result.yaml").read_text())
    (v,) = r["gate"]
    assert (v["metric"], v["direction"], v["source"]) == ("tokens_per_s", "higher_is_better", "baseline")
    assert v["observed"] < v["threshold"] == pytest.approx(metrics["tokens_per_s"] * 0.95, rel=1e-3)
    assert r["baseline"]["path"] == str(base)
    assert metrics["tokens_per_s"] == pytest.approx(10 * measured)

    # 10x the measured rate is a ~90 % regression: allowing 99.99 % passes; the table still shows it.
    result = harness_project.run("--harness-baseline", str(base), "--harness-max-regression", "99.99")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["  a_offline * tokens_per_s * -> * -*%  (allowed 99.99%)  ok"])


@pytest.mark.slow
def test_simulator_consistency_violations_fail_the_test(harness_project: HarnessProject) -> None:
    gen = {"max_tokens": 8, "ignore_eos": True, "eos_token_ids": [EOS]}
    harness_project.model("eos2", sim={**TINY_SIM, "double_eos": True, "eos_token_id": EOS}, generation=gen)
    # Llama's reference reports every token at completion; reporting all but the first (GPT-OSS
    # style) makes LoadGen's first token and token count disagree with the response data.
    harness_project.model("gptoss", sim=TINY_SIM, generation={**gen, "first_token_in_complete": False})

    result = harness_project.run()
    result.assert_outcomes(failed=2)
    (session,) = harness_project.session_dirs()
    expected = {
        "eos2_offline": {"multiple_eos"},
        "gptoss_offline": {"first_token_mismatch", "n_tokens_mismatch"},
    }
    for test_id, metrics in expected.items():
        r = yaml.safe_load((session / test_id / "result.yaml").read_text())
        assert r["status"] == "VALID"  # LoadGen is satisfied; only the output check catches it
        assert {v["metric"] for v in r["gate"]} == metrics, r["gate"]
        for v in r["gate"]:
            assert (v["threshold"], v["direction"], v["source"]) == (0, "lower_is_better", "consistency")
            assert v["observed"] == r["consistency"]["checked"] > 0  # every request
    result.stdout.fnmatch_lines(["multiple_eos * > max 0 (lower is better, consistency): *; e.g. query *"])
    result.stdout.fnmatch_lines(["first_token_mismatch * > max 0 (lower is better, consistency)*"])
    result.stdout.fnmatch_lines(["n_tokens_mismatch * > max 0 (lower is better, consistency)*"])


def test_thresholds_file_with_an_unknown_key_is_a_usage_error(harness_project: HarnessProject) -> None:
    harness_project.model("a", ("Offline",))
    path = harness_project.path / "thresholds.yaml"
    path.write_text("a_offline:\n  max_ttft_p99: 100\n")

    result = harness_project.run("--harness-thresholds", str(path))
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    assert f"ERROR: {path}: a_offline: unknown threshold(s) ['max_ttft_p99']; known: [" in result.stderr.str()
    assert "Traceback" not in result.stderr.str()
    assert harness_project.session_dirs() == []  # nothing ran: no session folder, no engine log


def test_accuracy_test_ids_in_both_modes(harness_project: HarnessProject) -> None:
    harness_project.model("a", ("Offline", "Server"), accuracy={"target": "llama3_1-8b"})
    result = harness_project.run("--collect-only", "-q")
    ids = [line.split("::")[-1] for line in result.outlines if "::test_benchmark[" in line]
    assert ids == ["test_benchmark[a_offline]", "test_benchmark[a_server]", "test_benchmark[a_accuracy]"]
    # --harness-mode accuracy runs the normal ids in AccuracyOnly; Offline, the accuracy scenario,
    # is already one of them (not collected twice, as a_offline0 and a_offline1 into one folder).
    result = harness_project.run("--collect-only", "-q", "--harness-mode", "accuracy")
    ids = [line.split("::")[-1] for line in result.outlines if "::test_benchmark[" in line]
    assert ids == ["test_benchmark[a_offline]", "test_benchmark[a_server]"]
