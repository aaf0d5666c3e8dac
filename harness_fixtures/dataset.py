"""Datasets in the MLPerf schema (columns input, tok_input, output) from JSON or pickle files, checked
before any engine starts: every row a record with the case's columns, token ids non-negative ints
(and below the model's vocabulary size when its files are here), reference outputs text."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DatasetSpec

MAX_TOKEN_ID = 2**31 - 1  # LoadGen's logs and the accuracy recipe carry ids as int32


class DatasetError(ValueError):
    """The dataset cannot be used; the message names the file, the sample and column, and the fix."""


class DatasetMissing(DatasetError):
    """The dataset file is not there (``--harness-skip-missing`` may skip such tests)."""


@dataclass(frozen=True)
class Dataset:
    path: Path
    tok_inputs: list[list[int]]
    inputs: list[str]
    outputs: list[str]

    def __len__(self) -> int:
        return len(self.tok_inputs)


def _read(path: Path, fmt: str) -> Any:
    if fmt == "json":
        try:
            return json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise DatasetError(f"{path}: cannot read as json: {exc}") from None
    # Pickle runs code from the file: only with `format: pickle` (MLPerf ships its datasets so).
    try:
        with path.open("rb") as fh:
            return pickle.load(fh)
    except EOFError:
        raise DatasetError(f"{path}: cannot read as pickle: the file is empty or cut short") from None
    except Exception as exc:  # unpickling can raise anything the file's code raises
        raise DatasetError(f"{path}: cannot read as pickle: {type(exc).__name__}: {exc}") from None


def _records(path: Path, data: Any) -> list[dict[str, Any]]:
    """Rows as mappings: a list of records, a column-oriented mapping, or a pandas DataFrame."""
    if hasattr(data, "to_dict"):  # a pandas DataFrame, as MLPerf's own pickles are
        data = data.to_dict(orient="records")
    if isinstance(data, dict):  # column-oriented JSON: {"input": {...}, ...} or {"input": [...]}
        cols: dict[str, list[Any]] = {}
        for k, v in data.items():
            if isinstance(v, dict):
                # pandas' to_json keys each column by row label ("0", "1", ...): in label order.
                cols[k] = [
                    v[i] for i in sorted(v, key=lambda x: (0, int(x)) if str(x).isdigit() else (1, str(x)))
                ]
            elif isinstance(v, list):
                cols[k] = v
            else:
                raise DatasetError(
                    f"{path}: column {k!r} is {type(v).__name__}, not a list of values; write the dataset "
                    "as a list of records or as {column: [values]}"
                )
        lengths = {k: len(v) for k, v in cols.items()}
        if len(set(lengths.values())) > 1:
            raise DatasetError(
                f"{path}: columns have different lengths {lengths}; every column needs one value per sample"
            )
        n = next(iter(lengths.values()), 0)
        data = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    if not isinstance(data, list):
        raise DatasetError(
            f"{path}: expected a list of records (or {{column: [values]}}), got {type(data).__name__}"
        )
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DatasetError(
                f"{path}: sample {i} is {type(row).__name__} {row!r:.60}, not a record of "
                "{column: value}; write the dataset as a list of records"
            )
    return data


def vocab_size(model_dir: Path) -> tuple[int, str] | None:
    """(vocabulary size, the file it came from) of a model folder: config.json's ``vocab_size``,
    else the highest id in tokenizer.json + 1; None when neither says."""
    config = model_dir / "config.json"
    if config.is_file():
        try:
            n = json.loads(config.read_text()).get("vocab_size")
        except (OSError, ValueError, AttributeError):
            n = None
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n, str(config)
    tok = model_dir / "tokenizer.json"
    if tok.is_file():
        try:
            data = json.loads(tok.read_text())
            ids = [*(data.get("model", {}).get("vocab") or {}).values()]
            ids += [t.get("id") for t in data.get("added_tokens") or []]
            top = max(i for i in ids if isinstance(i, int))
        except (OSError, ValueError, AttributeError, TypeError):
            return None
        return top + 1, str(tok)
    return None


def _check_ids(path: Path, i: int, column: str, ids: Any, vocab: tuple[int, str] | None) -> list[int]:
    where = f"{path}: sample {i} column {column!r}"
    if hasattr(ids, "tolist"):  # numpy arrays in MLPerf's pickles
        ids = ids.tolist()
    if not isinstance(ids, list) or not ids:
        raise DatasetError(f"{where} is {ids!r:.60}, not a non-empty list of token ids")
    limit = vocab[0] if vocab is not None else MAX_TOKEN_ID + 1
    for pos, t in enumerate(ids):
        # bool is an int in Python, and true/false are easy to write by mistake in JSON.
        if isinstance(t, bool) or not isinstance(t, int):
            raise DatasetError(f"{where}: position {pos} is {t!r:.40}, not a token id (a whole number >= 0)")
        if t < 0:
            raise DatasetError(f"{where}: position {pos} is {t}; token ids are >= 0")
        if t >= limit:
            known = (
                f"the model's vocabulary size {vocab[0]} ({vocab[1]}); was the dataset tokenized for "
                "another model? Set tokenizer: in the model YAML if it is this model's"
                if vocab is not None
                else f"{MAX_TOKEN_ID} (int32, as LoadGen logs them)"
            )
            raise DatasetError(f"{where}: position {pos} is {t}, not below {known}")
    return ids


def load_dataset(
    spec: DatasetSpec, path: Path, *, need_prompts: bool = True, vocab: tuple[int, str] | None = None
) -> Dataset:
    """Load and check the dataset; raise DatasetError saying what is wrong, where, and the fix.

    JSON unless the case says ``format: pickle`` (loading a pickle runs code from the file).
    ``need_prompts=False`` (scoring): only the reference outputs are required.
    ``vocab``: (size, source) of the model's vocabulary, when known: token ids must be below it.
    """
    if not path.is_file():
        raise DatasetMissing(
            f"dataset file {str(path)!r} does not exist; set dataset.path in the model YAML "
            "(env vars like ${MLPERF_DATA} are expanded) or place the file there"
        )
    fmt = spec.format or "json"
    if fmt == "json" and path.suffix in {".pkl", ".pickle"} and spec.format is None:
        raise DatasetError(
            f"{path}: looks like a pickle; set dataset.format: pickle in the model YAML if you trust it "
            "(loading a pickle runs code from the file)"
        )
    records = _records(path, _read(path, fmt))
    if spec.max_samples:
        records = records[: spec.max_samples]
    if not records:
        raise DatasetError(f"{path}: no samples")
    need = [spec.tok_input_column, spec.output_column] if need_prompts else [spec.output_column]
    cols = set(records[0])
    missing = [c for c in need if c not in cols]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {missing}; columns present: {sorted(cols)}; set "
            "dataset.tok_input_column / output_column in the model YAML"
        )
    for i, r in enumerate(records):
        absent = [c for c in need if c not in r]
        if absent:
            raise DatasetError(
                f"{path}: sample {i} has no column(s) {absent} (it has {sorted(r)}); every sample needs "
                f"{need}"
            )
    tok = [
        _check_ids(path, i, spec.tok_input_column, r[spec.tok_input_column], vocab)
        for i, r in enumerate(records if need_prompts else ())
    ]
    inputs = [str(r.get(spec.input_column, "")) for r in records]
    outputs: list[str] = []
    for i, r in enumerate(records):
        if not isinstance(r[spec.output_column], str):
            raise DatasetError(
                f"{path}: sample {i} column {spec.output_column!r} is {r[spec.output_column]!r:.80}, "
                "not text (the reference answer)"
            )
        outputs.append(r[spec.output_column])
    return Dataset(path=path, tok_inputs=tok, inputs=inputs, outputs=outputs)
