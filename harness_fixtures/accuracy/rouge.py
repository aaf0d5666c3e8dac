"""MLPerf Llama 3.1 8B accuracy: ROUGE exactly as the reference evaluation.py, accuracy.txt, targets.

What is matched, and where it was read (github.com/mlcommons/inference unless noted):

* ``language/llama3.1-8b/evaluation.py``: de-duplicate ``mlperf_log_accuracy.json`` by ``qsl_idx``
  keeping the first entry; ``np.frombuffer(bytes.fromhex(data), dtype)`` (``run_accuracy.sh``
  passes ``--dtype int32``; evaluation.py's own default is int64, hence ``--dtype``);
  ``tokenizer.batch_decode(ids, skip_special_tokens=True)``; ``postprocess_text``: strip, then
  ``"\\n".join(nltk.sent_tokenize(t))`` for predictions AND targets; ``evaluate.load("rouge")
  .compute(predictions, references, use_stemmer=True, use_aggregator=False)``; per metric
  ``f"{round(np.mean(v) * 100, 4)}"`` (a string); ``gen_len = np.sum(len(pred))`` over the
  post-processed predictions (characters); ``gen_num = len(preds)``; ``print(result)``.
* huggingface/evaluate ``metrics/rouge/rouge.py`` (0.4.0): ``RougeScorer(rouge_types,
  use_stemmer=use_stemmer, tokenizer=None)``; ``scorer.score(ref, pred)`` per pair (reference
  first: rougeLsum is not symmetric); with ``use_aggregator=False`` the F-measure per pair.
* The reference's ``AutoTokenizer`` decode also applies transformers' ``clean_up_tokenization``
  when the model's ``tokenizer_config.json`` says ``clean_up_tokenization_spaces: true`` (Llama 3.1
  does; huggingface/transformers#35175): :func:`load_tokenizer_decoder` does the same.
* ``tools/submission/submission_checker/constants.py`` ``ACC_PATTERN``: ``ROUGE1``
  ``.*'rouge1':\\s+'?([\\d.]+)'?.*`` (and rouge2/rougeL/rougeLsum alike), ``GEN_LEN``
  ``.*'gen_len':\\s([\\d.]+).*`` -- numpy 2 prints ``np.int64(...)``, which that misses, so gen_len
  is written as a plain int; ``checks/accuracy_check.py`` wants a ``^hash=([\\w\\d]+)$`` line
  (sha256 of mlperf_log_accuracy.json, as ``tools/submission/truncate_accuracy_log.py`` writes it).
  Targets: ``accuracy-target`` (x0.99 ROUGE, x0.9 GEN_LEN) and ``accuracy-upper-limit`` (x1.1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..config import DatasetSpec
from ..dataset import DatasetError, load_dataset
from ..results import write_text_atomic
from ..stats import round4
from .punkt import PunktUnavailableError, ensure_punkt

__all__ = [
    "MLPERF_TARGETS",
    "ROUGE_KEYS",
    "AccuracyInputError",
    "AccuracyScores",
    "AccuracyTarget",
    "load_tokenizer_decoder",
    "main",
    "postprocess",
    "reference_result_line",
    "rouge_scores",
    "score_accuracy_log",
    "score_texts",
    "write_accuracy_txt",
]

ROUGE_KEYS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")
TokenDtype = Literal["int32", "int64"]


class AccuracyInputError(ValueError):
    """An accuracy log, dataset or tokenizer the scorer cannot use; the message says which and why."""


class AccuracyScores(BaseModel):
    """Scores in the reference's units: ROUGE F-measure means x100 (unrounded), gen_len in characters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rouge1: float = Field(description="mean ROUGE-1 F-measure x 100")
    rouge2: float = Field(description="mean ROUGE-2 F-measure x 100")
    rougeL: float = Field(description="mean ROUGE-L F-measure x 100")
    rougeLsum: float = Field(description="mean ROUGE-Lsum F-measure x 100")
    gen_len: int = Field(description="total characters of the post-processed predictions")
    gen_num: int = Field(description="number of scored predictions (after de-duplication)")
    accuracy_log_sha256: str | None = Field(
        default=None, description="sha256 of the mlperf_log_accuracy.json scored, for accuracy.txt"
    )

    def metrics(self) -> dict[str, float | int]:
        """The six MLPerf keys (what ``--json`` prints)."""
        return {k: getattr(self, k) for k in (*ROUGE_KEYS, "gen_len", "gen_num")}


@dataclass(frozen=True)
class AccuracyTarget:
    """Reference (FP32/BF16) accuracy of one MLPerf benchmark; gates are fractions of these."""

    rouge1: float
    rouge2: float
    rougeL: float
    rougeLsum: float
    gen_len: int


_DATACENTER = AccuracyTarget(
    rouge1=38.7792, rouge2=15.9075, rougeL=24.4957, rougeLsum=35.793, gen_len=8_167_644
)
#: Keyed by LoadGen model name. Interactive is a scenario of llama3.1-8b in the checker
#: (v6.0 ``optional-scenarios-datacenter``), so it is held to the datacenter targets.
MLPERF_TARGETS: dict[str, AccuracyTarget] = {
    "llama3_1-8b": _DATACENTER,
    "llama3_1-8b-interactive": _DATACENTER,
    "llama3_1-8b-edge": AccuracyTarget(
        rouge1=39.06, rouge2=16.1147, rougeL=24.6375, rougeLsum=36.124, gen_len=3_051_113
    ),
}


# --------------------------------------------------------------------------- sentence splitting


def _sentence_splitter() -> Callable[[str], list[str]]:
    import nltk  # ~0.4 s: only when scoring

    data_dir = str(ensure_punkt())
    # nltk.data.path rather than NLTK_DATA: the process environment stays untouched; first, so
    # that the pinned, verified model wins over any other punkt_tab on the machine.
    if data_dir not in nltk.data.path:
        nltk.data.path.insert(0, data_dir)

    def split(text: str) -> list[str]:
        try:
            sentences: list[str] = nltk.sent_tokenize(text)
        except LookupError as exc:
            raise PunktUnavailableError(
                f"nltk {nltk.__version__} did not find its punkt model although punkt_tab is in "
                f"{data_dir}: nltk before 3.9.1 reads the pickled 'punkt' instead; install nltk>=3.9.1"
            ) from exc
        return sentences

    return split


def postprocess(texts: Iterable[str]) -> list[str]:
    """The reference's ``postprocess_text``: strip, then one punkt sentence per line (for rougeLsum)."""
    split = _sentence_splitter()
    return ["\n".join(split(t.strip())) for t in texts]


# --------------------------------------------------------------------------- scoring


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE F-measures x 100 over aligned pairs (texts already post-processed).

    HF evaluate 0.4.0's rouge with ``use_stemmer=True, use_aggregator=False``, then the
    reference's ``np.mean(v) * 100`` (unrounded here; :func:`reference_result_line` rounds).
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    per_pair: dict[str, list[float]] = {k: [] for k in ROUGE_KEYS}
    for prediction, reference in zip(predictions, references, strict=True):
        score = scorer.score(reference, prediction)  # (target, prediction): order matters
        for key in ROUGE_KEYS:
            per_pair[key].append(score[key].fmeasure)
    return {k: float(np.mean(v) * 100) for k, v in per_pair.items()}


def score_texts(
    predictions: Sequence[str], references: Sequence[str], *, accuracy_log_sha256: str | None = None
) -> AccuracyScores:
    """Post-process both sides, then ROUGE, gen_len and gen_num as the reference computes them."""
    preds = postprocess(predictions)
    refs = postprocess(references)
    return AccuracyScores(
        **rouge_scores(preds, refs),
        gen_len=sum(len(p) for p in preds),
        gen_num=len(preds),
        accuracy_log_sha256=accuracy_log_sha256,
    )


def _read_accuracy_log(accuracy_log: Path) -> tuple[list[dict[str, Any]], str]:
    try:
        raw = Path(accuracy_log).read_bytes()
    except OSError as exc:
        raise AccuracyInputError(
            f"cannot read the accuracy log {str(accuracy_log)!r}: {exc.strerror or exc}; pass the "
            f"mlperf_log_accuracy.json LoadGen wrote in accuracy mode"
        ) from exc
    try:
        entries = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AccuracyInputError(
            f"{str(accuracy_log)!r} is not JSON ({exc}); a truncated log (submission checker's "
            f"truncate_accuracy_log.py) cannot be scored: use the original"
        ) from exc
    if not isinstance(entries, list):
        raise AccuracyInputError(
            f"{str(accuracy_log)!r} holds a {type(entries).__name__}, expected LoadGen's list of "
            f'{{"qsl_idx": ..., "data": ...}} entries'
        )
    return entries, hashlib.sha256(raw).hexdigest()


def score_accuracy_log(
    accuracy_log: Path,
    dataset_outputs: Sequence[str],
    decode: Callable[[list[int]], str],
    *,
    dtype: TokenDtype = "int32",
) -> AccuracyScores:
    """Score LoadGen's ``mlperf_log_accuracy.json`` against the dataset's reference summaries.

    :param accuracy_log: the JSON list LoadGen writes (``qsl_idx``, ``data`` = hex token ids).
    :param dataset_outputs: reference summaries indexed by ``qsl_idx`` (the dataset's ``output``).
    :param decode: token ids -> text, e.g. :func:`load_tokenizer_decoder`.
    :param dtype: width of the logged token ids, little-endian (the reference SUT logs int32).
    :raises AccuracyInputError: unreadable log, bad entry, bad hex, ``qsl_idx`` out of range.
    """
    entries, digest = _read_accuracy_log(accuracy_log)
    item = np.dtype("<i4" if dtype == "int32" else "<i8")
    seen: set[int] = set()
    predictions: list[str] = []
    references: list[str] = []
    for n, entry in enumerate(entries):
        where = f"{str(accuracy_log)!r} entry {n}"
        if not isinstance(entry, dict) or "qsl_idx" not in entry or "data" not in entry:
            raise AccuracyInputError(f"{where} is {entry!r:.200}, expected qsl_idx and data keys")
        qsl_idx = entry["qsl_idx"]
        if not isinstance(qsl_idx, int) or isinstance(qsl_idx, bool):
            raise AccuracyInputError(f"{where}: qsl_idx {qsl_idx!r} is not an integer")
        if qsl_idx in seen:  # the reference keeps the first response per sample
            continue
        seen.add(qsl_idx)
        if not 0 <= qsl_idx < len(dataset_outputs):
            raise AccuracyInputError(
                f"{where}: qsl_idx {qsl_idx} is outside the dataset's {len(dataset_outputs)} "
                f"samples; was the run made with a different dataset file?"
            )
        data = entry["data"]
        try:
            blob = bytes.fromhex(data)
        except (TypeError, ValueError) as exc:
            raise AccuracyInputError(f"{where} (qsl_idx {qsl_idx}): data {data!r:.80} is not hex") from exc
        if len(blob) % item.itemsize:
            raise AccuracyInputError(
                f"{where} (qsl_idx {qsl_idx}): {len(blob)} bytes is not a whole number of {dtype} "
                f"token ids; wrong --dtype?"
            )
        token_ids = np.frombuffer(blob, dtype=item).tolist()
        try:
            predictions.append(decode(token_ids))
        except (OverflowError, TypeError, ValueError) as exc:
            raise AccuracyInputError(
                f"{where} (qsl_idx {qsl_idx}): cannot decode token ids {token_ids[:16]!r}: {exc}"
            ) from exc
        references.append(dataset_outputs[qsl_idx])
    if not predictions:
        raise AccuracyInputError(f"{str(accuracy_log)!r} has no entries; was the run in accuracy mode?")
    return score_texts(predictions, references, accuracy_log_sha256=digest)


def load_tokenizer_decoder(
    model_dir: Path, *, clean_up_tokenization_spaces: bool | None = None
) -> Callable[[list[int]], str]:
    """A decoder equal to the reference's ``AutoTokenizer.decode(ids, skip_special_tokens=True)``.

    Uses ``<model_dir>/tokenizer.json`` with the ``tokenizers`` library (no transformers/torch).
    transformers then applies ``clean_up_tokenization`` when ``tokenizer_config.json`` sets
    ``clean_up_tokenization_spaces`` (true for Llama 3.1); so does this, unless overridden.
    """
    from tokenizers import Tokenizer

    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the binding raises a bare Exception for a missing or bad file
        raise AccuracyInputError(
            f"cannot load {str(path)!r}: {exc}; --tokenizer must be a model folder holding the "
            f"Hugging Face tokenizer.json (e.g. the Llama-3.1-8B-Instruct checkpoint)"
        ) from exc
    if clean_up_tokenization_spaces is None:
        clean_up_tokenization_spaces = _config_flag(model_dir / "tokenizer_config.json")

    def decode(token_ids: list[int]) -> str:
        text: str = tokenizer.decode(token_ids, skip_special_tokens=True)
        return _clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    return decode


def _config_flag(config_path: Path) -> bool:
    if not config_path.is_file():
        return False
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AccuracyInputError(f"cannot read {str(config_path)!r}: {exc}") from exc
    # transformers' default when the key is absent is False (since 4.45).
    return bool(config.get("clean_up_tokenization_spaces", False))


def _clean_up_tokenization(text: str) -> str:
    # transformers' PreTrainedTokenizerBase.clean_up_tokenization, same replacements, same order.
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


# --------------------------------------------------------------------------- reporting


def reference_result_line(scores: AccuracyScores) -> str:
    """The dict the reference prints, e.g. ``{'rouge1': '38.7792', ..., 'gen_len': 8167644, ...}``.

    ROUGE values are strings as in the reference (``f"{round(...)}"``); gen_len/gen_num are plain
    ints so the checker's ``GEN_LEN`` pattern matches.
    """
    result: dict[str, str | int] = {k: f"{round4(getattr(scores, k))}" for k in ROUGE_KEYS}
    result["gen_len"] = int(scores.gen_len)
    result["gen_num"] = int(scores.gen_num)
    return repr(result)


def write_accuracy_txt(path: Path, scores: AccuracyScores, accuracy_log: Path | None = None) -> Path:
    """Write ``accuracy.txt`` as a submission has it: the reference's output, then ``hash=<sha256>``.

    :param accuracy_log: hash this file; default: the hash recorded in ``scores``.
    """
    if accuracy_log is not None:
        digest = hashlib.sha256(Path(accuracy_log).read_bytes()).hexdigest()
    elif scores.accuracy_log_sha256:
        digest = scores.accuracy_log_sha256
    else:
        raise ValueError("no hash for accuracy.txt: pass accuracy_log= or scores from score_accuracy_log()")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, f"\nResults\n\n{reference_result_line(scores)}\n\nhash={digest}\n")
    return path


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m harness_fixtures.accuracy",
        description="Score mlperf_log_accuracy.json like the MLPerf Llama 3.1 8B evaluation.py.",
    )
    parser.add_argument(
        "--mlperf-accuracy-file", required=True, type=Path, help="path to mlperf_log_accuracy.json"
    )
    parser.add_argument(
        "--dataset-file",
        required=True,
        type=Path,
        help="MLPerf dataset (JSON) with an 'output' column",
    )
    parser.add_argument(
        "--dataset-format",
        choices=["json", "pickle"],
        default="json",
        help="pickle runs code from the file: only for datasets you trust (default: json)",
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        type=Path,
        metavar="MODEL_DIR",
        help="model folder holding tokenizer.json (and tokenizer_config.json)",
    )
    parser.add_argument(
        "--dtype",
        choices=["int32", "int64"],
        default="int32",
        help="token id width in the log (default: int32, as run_accuracy.sh)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (rouge1 ... gen_num, unrounded) instead"
    )
    parser.add_argument(
        "--accuracy-txt",
        type=Path,
        metavar="PATH",
        help="also write accuracy.txt (results + hash=) to PATH (default: none)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on unusable input)."""
    args = _parser().parse_args(argv)
    try:
        spec = DatasetSpec(path=str(args.dataset_file), format=args.dataset_format)
        outputs = load_dataset(spec, args.dataset_file, need_prompts=False).outputs
        decode = load_tokenizer_decoder(args.tokenizer)
        scores = score_accuracy_log(args.mlperf_accuracy_file, outputs, decode, dtype=args.dtype)
        if args.accuracy_txt is not None:
            write_accuracy_txt(args.accuracy_txt, scores)
    except (AccuracyInputError, DatasetError, PunktUnavailableError, OSError) as exc:
        # OSError: writing accuracy.txt or the punkt cache folder; the others carry the fix.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(scores.metrics()))
    else:
        print(f"\nResults\n\n{reference_result_line(scores)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
