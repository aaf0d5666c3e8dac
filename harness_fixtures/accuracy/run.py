"""Score an AccuracyOnly LoadGen run of a case: decode, ROUGE the MLPerf way, accuracy.txt, target."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from ..config import BenchmarkCase, ConfigError, expand_env
from ..dataset import Dataset
from ..results import AccuracyResult


class AccuracyRunError(RuntimeError):
    """The accuracy run cannot be scored; the message says what is missing and how to fix it."""


def hf_cache_dirs() -> list[Path]:
    """Where Hugging Face keeps downloaded models, in the order its own library looks:
    ``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``."""
    out = []
    if os.environ.get("HF_HUB_CACHE"):
        out.append(Path(os.environ["HF_HUB_CACHE"]).expanduser())
    if os.environ.get("HF_HOME"):
        out.append(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    out.append(Path("~/.cache/huggingface/hub").expanduser())
    return out


def hf_snapshot(model_id: str, want: str = "tokenizer.json") -> Path | None:
    """The cached snapshot folder of ``model_id`` (``org/name``) holding ``want``, or None.

    The hub cache keeps ``models--org--name/snapshots/<commit>/``; ``refs/main`` names the commit a
    plain download resolved to, which is preferred over any other snapshot.
    """
    for cache in hf_cache_dirs():
        repo = cache / ("models--" + model_id.replace("/", "--"))
        snapshots = repo / "snapshots"
        if not snapshots.is_dir():
            continue
        ref = repo / "refs" / "main"
        if ref.is_file() and (snapshots / ref.read_text().strip() / want).is_file():
            return snapshots / ref.read_text().strip()
        found = sorted(
            (d for d in snapshots.iterdir() if (d / want).is_file()), key=lambda d: d.stat().st_mtime
        )
        if found:
            return found[-1]
    return None


def tokenizer_dir(case: BenchmarkCase) -> Path:
    """The folder with the case's ``tokenizer.json``: ``tokenizer:``, else the engine's model.

    Each is a local folder (``builtin:`` resolved) or a Hugging Face model id found in the local hub
    cache; nothing is downloaded.

    :raises AccuracyRunError: none holds a tokenizer.json; the message lists where it looked.
    """
    ref = case.tokenizer or case.engine.model
    key = "tokenizer" if case.tokenizer else "engine.model"
    if ref.startswith("builtin:"):
        from ..servers import engine_env

        return engine_env.model_dir()
    try:
        expanded = expand_env(ref, f"{key} of {case.source or case.name}")
    except ConfigError as exc:
        raise AccuracyRunError(str(exc)) from None
    looked: list[str] = []
    path = case.resolve(expanded)
    if (path / "tokenizer.json").is_file():
        return path
    looked.append(str(path))
    if not expanded.startswith(("/", ".", "~")) and expanded.count("/") == 1:
        snap = hf_snapshot(expanded)
        if snap is not None:
            return snap
        looked += [str(c / ("models--" + expanded.replace("/", "--"))) for c in hf_cache_dirs()]
    raise AccuracyRunError(
        f"no tokenizer.json for {key} {ref!r} of {case.name} (looked in: {', '.join(looked)}); set "
        f"`tokenizer:` in {case.source or 'the model YAML'} to the model folder or a Hugging Face id "
        "downloaded to the hub cache (HF_HUB_CACHE / HF_HOME), e.g. `huggingface-cli download "
        f"{expanded if '/' in expanded else 'ORG/NAME'} tokenizer.json`"
    )


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
