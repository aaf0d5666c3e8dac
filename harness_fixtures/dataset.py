"""Datasets in the MLPerf schema (columns input, tok_input, output) from JSON or pickle files."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DatasetSpec


class DatasetError(ValueError):
    """The dataset is missing or does not have the columns the case names."""


@dataclass(frozen=True)
class Dataset:
    path: Path
    tok_inputs: list[list[int]]
    inputs: list[str]
    outputs: list[str]

    def __len__(self) -> int:
        return len(self.tok_inputs)


def _records(path: Path, fmt: str) -> list[dict[str, Any]]:
    if fmt == "json":
        data = json.loads(path.read_text())
    else:
        # Pickle runs code from the file: only load datasets you trust (MLPerf ships them this way).
        with path.open("rb") as fh:
            data = pickle.load(fh)
    if hasattr(data, "to_dict"):  # a pandas DataFrame, as MLPerf's own pickles are
        data = data.to_dict(orient="records")
    if isinstance(data, dict):  # column-oriented JSON: {"input": {...}, ...} or {"input": [...]}
        # pandas' to_json orientation keys each column by row label ("0", "1", ...): in label order.
        cols = {
            k: [v[i] for i in sorted(v, key=lambda x: int(x) if str(x).isdigit() else x)]
            if isinstance(v, dict)
            else list(v)
            for k, v in data.items()
        }
        n = len(next(iter(cols.values()), []))
        data = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a list of records, got {type(data).__name__}")
    return data


def load_dataset(spec: DatasetSpec, path: Path, *, need_prompts: bool = True) -> Dataset:
    """Load, check columns and types; raise DatasetError saying what is wrong and how to fix it.

    JSON unless the case says ``format: pickle`` (loading a pickle runs code from the file).
    ``need_prompts=False`` (scoring): only the reference outputs are required.
    """
    if not path.is_file():
        raise DatasetError(
            f"dataset file {str(path)!r} does not exist; set dataset.path in the model YAML "
            "(env vars like ${MLPERF_DATA} are expanded) or place the file there"
        )
    fmt = spec.format or "json"
    if fmt == "json" and path.suffix in {".pkl", ".pickle"} and spec.format is None:
        raise DatasetError(
            f"{path}: looks like a pickle; set dataset.format: pickle in the model YAML if you trust it "
            "(loading a pickle runs code from the file)"
        )
    try:
        records = _records(path, fmt)
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        raise DatasetError(f"{path}: cannot read as {fmt}: {exc}") from exc
    if spec.max_samples:
        records = records[: spec.max_samples]
    if not records:
        raise DatasetError(f"{path}: no samples")
    cols = set(records[0])
    need = [spec.tok_input_column, spec.output_column] if need_prompts else [spec.output_column]
    missing = [c for c in need if c not in cols]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {missing}; columns present: {sorted(cols)}; set "
            "dataset.tok_input_column / output_column in the model YAML"
        )
    tok: list[list[int]] = []
    for i, r in enumerate(records if need_prompts else ()):
        ids = r[spec.tok_input_column]
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if not isinstance(ids, list) or not ids or not all(isinstance(x, int) for x in ids):
            raise DatasetError(
                f"{path}: sample {i} column {spec.tok_input_column!r} is not a list of token ids"
            )
        tok.append(ids)
    inputs = [str(r.get(spec.input_column, "")) for r in records]
    outputs: list[str] = []
    for i, r in enumerate(records):
        if not isinstance(r.get(spec.output_column), str):
            raise DatasetError(
                f"{path}: sample {i} column {spec.output_column!r} is {r.get(spec.output_column)!r:.80}, "
                "not text (the reference answer)"
            )
        outputs.append(r[spec.output_column])
    return Dataset(path=path, tok_inputs=tok, inputs=inputs, outputs=outputs)
