"""Dataset contents are checked before any engine starts: every bad file is a DatasetError naming the
file, the sample and the column, never a raw EOFError / TypeError / KeyError / IndexError."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness_fixtures.config import DatasetSpec
from harness_fixtures.dataset import DatasetError, DatasetMissing, load_dataset, vocab_size

JSON = DatasetSpec(path="d.json")
PICKLE = DatasetSpec(path="d.pkl", format="pickle")


def write_json(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    return path


def row(i: int = 0, **changes: Any) -> dict[str, Any]:
    return {"input": f"p{i}", "tok_input": [1, 2, 3], "output": f"a{i}", **changes}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([1, 2, 3], r"sample 0 is int 1, not a record"),
        ([row(0), row(1, tok_input=None)], r"sample 1 column 'tok_input' is None, not a non-empty list"),
        ([row(0), {"input": "x", "output": "y"}], r"sample 1 has no column\(s\) \['tok_input'\]"),
        (
            [row(0, tok_input=[1, True, 3])],
            r"sample 0 column 'tok_input': position 1 is True, not a token id",
        ),
        ([row(0, tok_input=[1, "2"])], r"sample 0 column 'tok_input': position 1 is '2', not a token id"),
        ([row(0, tok_input=[1.0])], r"position 0 is 1.0, not a token id"),
        ([row(0, tok_input=[4, -5])], r"sample 0 column 'tok_input': position 1 is -5; token ids are >= 0"),
        ([row(0, tok_input=[2**31])], r"position 0 is 2147483648, not below 2147483647 \(int32"),
        ([row(0, tok_input=[])], r"not a non-empty list of token ids"),
        ([row(0, output=5)], r"sample 0 column 'output' is 5, not text"),
        ({"input": ["a", "b"], "tok_input": [[1]], "output": ["x", "y"]}, r"columns have different lengths"),
        ({"input": "a", "tok_input": [[1]], "output": ["x"]}, r"column 'input' is str, not a list of values"),
        ("just text", r"expected a list of records .*got str"),
        ([], r"no samples"),
    ],
)
def test_bad_json_contents_name_file_sample_and_column(tmp_path: Path, data: Any, match: str) -> None:
    path = write_json(tmp_path, data)
    with pytest.raises(DatasetError, match=match) as exc:
        load_dataset(JSON, path)
    assert str(exc.value).startswith(str(path)) and not isinstance(exc.value, DatasetMissing)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", r"cannot read as pickle: the file is empty or cut short"),
        (pickle.dumps([row(0)])[:-3], r"cannot read as pickle"),
        (pickle.dumps([1, 2]), r"sample 0 is int 1, not a record"),
        (pickle.dumps({"tok_input": [[1], [2]], "output": ["a"]}), r"columns have different lengths"),
    ],
    ids=["empty", "cut_short", "list_of_ints", "ragged_columns"],
)
def test_bad_pickle_contents(tmp_path: Path, payload: bytes, match: str) -> None:
    path = tmp_path / "d.pkl"
    path.write_bytes(payload)
    with pytest.raises(DatasetError, match=match):
        load_dataset(PICKLE, path)


def test_ids_must_be_below_the_model_vocabulary_when_it_is_known(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 100}))
    vocab = vocab_size(model)
    assert vocab == (100, str(model / "config.json"))
    path = write_json(tmp_path, [row(0, tok_input=[5, 99]), row(1, tok_input=[5, 100])])
    with pytest.raises(
        DatasetError, match=r"sample 1 column 'tok_input': position 1 is 100, not below the mo"
    ):
        load_dataset(JSON, path, vocab=vocab)
    assert len(load_dataset(JSON, path)) == 2  # unknown vocabulary: only the int32 bound


def test_vocab_size_from_tokenizer_json_when_config_has_none(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"model": {"vocab": {"a": 0, "b": 41}}, "added_tokens": [{"id": 49, "content": "<s>"}]})
    )
    assert vocab_size(tmp_path) == (50, str(tmp_path / "tokenizer.json"))
    assert vocab_size(tmp_path / "nothing-here") is None


def test_a_missing_file_is_the_only_skippable_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissing, match=r"does not exist; set dataset\.path"):
        load_dataset(JSON, tmp_path / "nope.json")


def test_column_oriented_rows_load_in_label_order(tmp_path: Path) -> None:
    path = tmp_path / "d.pkl"
    columns = {
        "input": {"1": "b", "0": "a"},
        "tok_input": {"0": [1], "1": [2, 3]},
        "output": {"0": "x", "1": "y"},
    }
    path.write_bytes(pickle.dumps(columns))
    ds = load_dataset(PICKLE, path)
    assert ds.tok_inputs == [[1], [2, 3]] and ds.inputs == ["a", "b"] and ds.outputs == ["x", "y"]


JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["input", "tok_input", "output", "x"]), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=JSONISH)
def test_any_json_is_a_dataset_or_a_dataset_error(tmp_path: Path, data: Any) -> None:
    """The loader is a parser of user files: whatever they hold, a Dataset with int ids and text
    outputs, or a DatasetError naming the file. (One file, rewritten for each example.)"""
    path = write_json(tmp_path, data)
    try:
        ds = load_dataset(JSON, path)
    except DatasetError as exc:
        assert str(exc).startswith(str(path))
        return
    assert len(ds) == len(ds.outputs) > 0
    assert all(type(t) is int and 0 <= t < 2**31 for ids in ds.tok_inputs for t in ids) and all(
        isinstance(o, str) for o in ds.outputs
    )
