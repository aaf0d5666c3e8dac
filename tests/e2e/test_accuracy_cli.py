"""ROUGE parity with the MLPerf Llama 3.1 8B reference recipe, accuracy.txt format, CLI, errors.

Uses the real punkt cache (``ensure_punkt``; the setup step downloads it, else the first test does).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness_fixtures.accuracy.punkt import ensure_punkt

REPO = Path(__file__).resolve().parents[2]

# (prediction, reference): abbreviations, quotes, several sentences, stemming, stray whitespace.
PAIRS: list[tuple[str, str]] = [
    (
        "Dr. Smith said the U.S. economy grew. Prices rose, e.g. for food and fuel.",
        "The U.S. economy grew, Dr. Smith said. Food and fuel prices rose.",
    ),
    (
        "Officials in the U.S. said the storm weakened. Mr. Brown said power returned on Monday.",
        "The storm weakened, U.S. officials said. Power returned on Monday, Mr. Brown said.",
    ),
    (
        '"We are not going anywhere," the mayor said. Residents cheered. The vote is on Friday.',
        'The mayor said: "We are not going anywhere." A vote follows on Friday.',
    ),
    (
        "  The company's shares fell 5 per cent on Tuesday.\n\nAnalysts expected a drop.  ",
        "Shares in the company dropped 5% on Tuesday, as analysts had expected.",
    ),
    (
        "Scientists found running improves memory. The study, e.g. in mice, lasted 3 years.",
        "Running improved memory in mice, scientists found after a three-year study.",
    ),
    (
        "Police arrested two men. They were charged with robbery at St. Mary's church.",
        "Two men were arrested and charged over a robbery at St. Mary's Church.",
    ),
    (
        "The team won 3-1. 'It was a great night,' the coach said. Fans celebrated in the streets.",
        "Fans celebrated after the team's 3-1 win. The coach called it a great night.",
    ),
    (
        "Prof. Lee warned of rising sea levels. Coastal cities, i.e. Miami, face flooding by 2050.",
        "Rising seas could flood coastal cities such as Miami by 2050, Prof. Lee warned.",
    ),
    (
        "The bill passed the Senate. It now goes to the House.",
        "The bill passed the Senate and now goes to the House.",
    ),
    (
        "Nothing in common here",
        "The quick brown fox jumps over the lazy dog.",
    ),
]

# tools/submission/submission_checker/constants.py ACC_PATTERN (mlcommons/inference), verbatim,
# and the hash pattern of checks/accuracy_check.py.


@pytest.fixture(scope="session")
def punkt_dir() -> Path:
    return ensure_punkt()


def reference_recipe(preds: Sequence[str], targets: Sequence[str], punkt: Path) -> dict[str, Any]:
    """evaluation.py + HF evaluate 0.4.0 rouge, written out independently of the module under test."""
    import nltk
    from rouge_score import rouge_scorer

    if str(punkt) not in nltk.data.path:
        nltk.data.path.append(str(punkt))
    preds = ["\n".join(nltk.sent_tokenize(p.strip())) for p in preds]
    targets = ["\n".join(nltk.sent_tokenize(t.strip())) for t in targets]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for ref, pred in zip(targets, preds, strict=True)]
    per_key = {key: [s[key].fmeasure for s in scores] for key in scores[0]}
    result: dict[str, Any] = {k: np.mean(v) * 100 for k, v in per_key.items()}
    result["gen_len"] = int(np.sum([len(p) for p in preds]))
    result["gen_num"] = len(preds)
    return result


# --------------------------------------------------------------------------- parity


# --------------------------------------------------------------------------- accuracy log


def _hex(ids: Sequence[int], dtype: str = "<i4") -> str:
    return np.asarray(ids, dtype=dtype).tobytes().hex().upper()  # LoadGen writes upper case


def write_log(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- accuracy.txt / gates


# --------------------------------------------------------------------------- tokenizer / dataset / CLI

PREDICTIONS = [
    "Dr. Smith went home. He was tired after the long trip.",
    "The council approved the budget. Taxes will rise next year.",
    "Nothing matched.",
]
OUTPUTS = [
    "Dr. Smith went home after a long trip. He was tired.",
    "The budget was approved by the council. Taxes rise next year.",
    "The storm passed quickly.",
]


def build_model_dir(path: Path, *, clean_up: bool | None) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(re.findall(r"\w+|[^\w\s]", " ".join(PREDICTIONS + OUTPUTS))))
    vocab = {"[UNK]": 0, "<|eot_id|>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<|eot_id|>"])
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    if clean_up is not None:
        (path / "tokenizer_config.json").write_text(json.dumps({"clean_up_tokenization_spaces": clean_up}))
    return tokenizer


def make_fixture(tmp_path: Path) -> tuple[Path, Path, Path]:
    tokenizer = build_model_dir(tmp_path / "model", clean_up=True)
    records = [
        {"instruction": "Summarize", "input": "article", "tok_input": [1, 2, 3], "output": out}
        for out in OUTPUTS
    ]
    dataset = tmp_path / "cnn_eval.json"
    dataset.write_text(json.dumps(records), encoding="utf-8")
    entries = []
    for seq_id, qsl_idx in enumerate([2, 0, 1, 0]):  # sample 0 answered twice
        ids = [*tokenizer.encode(PREDICTIONS[qsl_idx]).ids, 1]
        entries.append({"seq_id": seq_id, "qsl_idx": qsl_idx, "data": _hex(ids), "token_count": len(ids)})
    log = write_log(tmp_path / "mlperf_log_accuracy.json", entries)
    return log, dataset, tmp_path / "model"


def test_cli_json_equals_the_reference_recipe(tmp_path: Path, punkt_dir: Path) -> None:
    log, dataset, model = make_fixture(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "harness_fixtures.accuracy", "--mlperf-accuracy-file", str(log),
         "--dataset-file", str(dataset), "--tokenizer", str(model), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert list(result) == ["rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len", "gen_num"]
    order = [2, 0, 1]
    expected = reference_recipe([PREDICTIONS[i] for i in order], [OUTPUTS[i] for i in order], punkt_dir)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert result[key] == pytest.approx(expected[key], abs=1e-4)
    assert (result["gen_len"], result["gen_num"]) == (expected["gen_len"], 3)


# --------------------------------------------------------------------------- ensure_punkt
