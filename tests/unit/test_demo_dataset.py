"""The bundled demo summarization set and its reference accuracy: schema, prompt ids, determinism.

Fast and torch-free: the generator's text part is stdlib-only, and the prompt ids are checked with
the ``tokenizers`` library against the model's tokenizer.json (skipped where the model is absent).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from harness_fixtures.config import DatasetSpec
from harness_fixtures.dataset import load_dataset
from harness_fixtures.servers.engine_env import model_dir

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "benchmarks" / "data"
DATASET = DATA / "demo_summarization.json"
OUTPUTS = DATA / "demo_reference_outputs.json"
ACCURACY = DATA / "smollm2_135m_reference_accuracy.yaml"
COLUMNS = {"instruction", "input", "tok_input", "output"}
VOCAB_SIZE = 49_152  # SmolLM2
# SmolLM2's chat template (chat_template.jinja) rendered for one user turn plus the generation
# prompt; written out here so the check needs no jinja2/transformers.
CHAT_PREFIX = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\n"
)
CHAT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


def _load_tool(name: str) -> ModuleType:
    path = REPO / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    return _load_tool("make_demo_dataset")


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(DATASET.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    tokenizers = pytest.importorskip("tokenizers", reason="the accuracy extra (tokenizers) is not installed")
    path = model_dir() / "tokenizer.json"
    if not path.is_file():
        pytest.skip(f"no {path}: build the model folder with `python -m harness_fixtures.servers.engine_env`")
    return tokenizers.Tokenizer.from_file(str(path))


def test_loads_with_the_harness_loader() -> None:
    ds = load_dataset(DatasetSpec(path=str(DATASET)), DATASET)
    assert 100 <= len(ds) <= 200
    assert all(ds.inputs) and all(ds.outputs)


def test_records_have_exactly_the_mlperf_columns(
    records: list[dict[str, Any]], generator: ModuleType
) -> None:
    assert all(set(r) == COLUMNS for r in records)
    # As MLCommons' prepare-calibration.py stores it: the template, placeholder included.
    assert {r["instruction"] for r in records} == {generator.INSTRUCTION}
    assert "{input}" in generator.INSTRUCTION


def test_token_ids_are_in_vocab_range(records: list[dict[str, Any]]) -> None:
    for i, r in enumerate(records):
        ids = r["tok_input"]
        assert ids and all(isinstance(t, int) and 0 <= t < VOCAB_SIZE for t in ids), f"sample {i}"


def test_file_is_small() -> None:
    assert DATASET.stat().st_size < 1_000_000


def test_prompts_decode_to_their_articles(records: list[dict[str, Any]], tokenizer: Any) -> None:
    for i, r in enumerate(records):
        text = tokenizer.decode(r["tok_input"], skip_special_tokens=False)
        assert r["input"] in text, f"sample {i}: article not in the decoded prompt"
        assert text.startswith("<|im_start|>system\n") and text.endswith(CHAT_SUFFIX), f"sample {i}"


def test_prompt_ids_equal_the_chat_template_tokenized(records: list[dict[str, Any]], tokenizer: Any) -> None:
    # Pins the exact ids: a change of template, tokenizer or BOS handling shows up here.
    for i, r in enumerate(records):
        prompt = CHAT_PREFIX + r["instruction"].format(input=r["input"]) + CHAT_SUFFIX
        assert tokenizer.encode(prompt, add_special_tokens=False).ids == r["tok_input"], f"sample {i}"


def test_generator_is_deterministic(generator: ModuleType) -> None:
    first, second = generator.generate_articles(), generator.generate_articles()
    assert first == second
    assert generator.generate_articles(5, seed=generator.SEED + 1) != first[:5]


def test_articles_and_summaries_meet_the_length_bounds(generator: ModuleType) -> None:
    articles = generator.generate_articles()
    assert len({a.text for a in articles}) == len(articles)
    for a in articles:
        assert 120 <= len(a.text.split()) <= 220, a.text
        assert 40 <= len(a.summary.split()) <= 70, a.summary
        assert a.summary.count(". ") + 1 >= 2, a.summary


def test_file_is_what_the_generator_writes(records: list[dict[str, Any]], generator: ModuleType) -> None:
    """The committed file is in sync with the generator, byte for byte (given its prompt ids)."""
    articles = generator.generate_articles()
    rebuilt = generator.build_records(articles, [r["tok_input"] for r in records])
    assert generator.dump_records(rebuilt) == DATASET.read_bytes()


def test_reference_accuracy_is_complete_and_plausible(records: list[dict[str, Any]]) -> None:
    acc = yaml.safe_load(ACCURACY.read_text())
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert 0 < acc[key] < 100, key
    assert acc["gen_num"] == len(records)
    assert acc["gen_len"] > 0
    how = acc["computed_with"]
    for key in ("transformers_version", "torch_version", "dtype", "decoding", "max_new_tokens", "date"):
        assert how[key], key
    assert how["dtype"] == "float32" and how["max_new_tokens"] == 128
    # Stale if the dataset or the outputs changed after scoring: rerun tools/reference_accuracy.py.
    assert how["dataset_sha256"] == hashlib.sha256(DATASET.read_bytes()).hexdigest()
    assert how["outputs_sha256"] == hashlib.sha256(OUTPUTS.read_bytes()).hexdigest()
    outputs = json.loads(OUTPUTS.read_text(encoding="utf-8"))["outputs"]
    assert [o["index"] for o in outputs] == list(range(len(records)))
    assert all(0 < len(o["token_ids"]) <= 128 for o in outputs)
