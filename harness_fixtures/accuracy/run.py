"""Score an AccuracyOnly LoadGen run of a case: decode, ROUGE the MLPerf way, accuracy.txt, target."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from ..config import BenchmarkCase
from ..dataset import Dataset
from ..results import AccuracyResult


class AccuracyRunError(RuntimeError):
    """The accuracy run cannot be scored; the message says what is missing and how to fix it."""


def tokenizer_dir(case: BenchmarkCase) -> Path:
    """The case's tokenizer folder: ``tokenizer:``, else the engine's model (``builtin:`` resolved)."""
    ref = case.tokenizer or case.engine.model
    if ref.startswith("builtin:"):
        from ..servers import engine_env

        path = engine_env.model_dir()
    else:
        path = case.resolve(ref)
    if not (path / "tokenizer.json").is_file():
        raise AccuracyRunError(
            f"no tokenizer.json in {str(path)!r} to decode the accuracy log; set `tokenizer:` in "
            f"{case.source or 'the model YAML'} to the model folder"
        )
    return path


def resolve_target(case: BenchmarkCase) -> dict[str, float]:
    """The accuracy target of a case: an MLPerf name, a YAML file, or inline values."""
    assert case.accuracy is not None
    target = case.accuracy.target
    if isinstance(target, dict):
        return dict(target)
    from .rouge import MLPERF_TARGETS

    if target in MLPERF_TARGETS:
        return {k: float(v) for k, v in dataclasses.asdict(MLPERF_TARGETS[target]).items()}
    path = case.resolve(target)
    if not path.is_file():
        raise AccuracyRunError(
            f"accuracy target {target!r} of {case.name} is neither an MLPerf name "
            f"({sorted(MLPERF_TARGETS)}) nor an existing file ({path})"
        )
    data: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    scores: dict[str, Any] = data.get("scores") or data
    return {
        k: float(scores[k]) for k in ("rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len") if k in scores
    }


def score_run(case: BenchmarkCase, test_dir: Path, dataset: Dataset) -> AccuracyResult:
    """Score ``mlperf/mlperf_log_accuracy.json``; write accuracy.txt; return result.yaml's ``accuracy:``."""
    from .rouge import load_tokenizer_decoder, score_accuracy_log, write_accuracy_txt

    log_path = test_dir / "mlperf" / "mlperf_log_accuracy.json"
    if not log_path.is_file():
        raise AccuracyRunError(f"LoadGen wrote no accuracy log at {log_path}; see {test_dir / 'harness.log'}")
    decode = load_tokenizer_decoder(tokenizer_dir(case))
    scores = score_accuracy_log(log_path, dataset.outputs, decode)
    txt = write_accuracy_txt(test_dir / "accuracy.txt", scores, log_path)
    values = {k: float(v) for k, v in scores.metrics().items()}
    out = AccuracyResult(scores=values, accuracy_txt=str(txt))
    if case.accuracy is not None:
        target = resolve_target(case)
        out.target = target
        out.ratios = {k: round(values[k] / v, 4) for k, v in target.items() if v and k in values}
    return out
