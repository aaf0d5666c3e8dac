"""Helpers of the suite's own tests (``from support import ...``; pytest.ini puts tests/ on the path):
throwaway harness projects run by pytester, tiny LoadGen settings, datasets, the pipeline on a running
engine. The fixtures that use them are in conftest.py."""

from __future__ import annotations

import json
import random
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness_fixtures.config import BenchmarkCase, plan_runs
from harness_fixtures.options import HarnessOptions
from harness_fixtures.pipeline import Events, Outcome, Suite, run_test
from harness_fixtures.servers import Endpoint

# LoadGen settings for runs of a second or less. The p50 target keeps Server early stopping
# satisfiable with a dozen queries (p99 needs ~460); latency limits are far above the simulator's.
TINY_USER_CONF = """\
tiny.*.performance_sample_count_override = 16
tiny.*.use_token_latencies = 1
tiny.Offline.target_qps = 100
tiny.Offline.min_duration = 200
tiny.Offline.min_query_count = 1
tiny.Server.target_qps = 40
tiny.Server.min_duration = 300
tiny.Server.min_query_count = 10
tiny.Server.target_latency_percentile = 50
tiny.Server.ttft_latency = 2000
tiny.Server.tpot_latency = 200
"""

# 22 Offline samples in waves of 4, ~85 ms each: ~0.5 s, so min_duration (200 ms) is met.
TINY_SIM: dict[str, Any] = {"ttft_base_ms": 50, "itl_ms": 5, "max_batch": 4}

BENCHMARK_TEST = """\
from harness_fixtures.plugin import HarnessBenchmark


def test_benchmark(harness_benchmark: HarnessBenchmark) -> None:
    result = harness_benchmark.run()
    harness_benchmark.check(result)
"""


def write_dataset(path: Path, n: int = 16, prompt_len: int = 8, seed: int = 0) -> list[list[int]]:
    """An MLPerf-schema JSON dataset of ``n`` random prompts; returns the prompt token ids."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 30_000) for _ in range(prompt_len)] for _ in range(n)]
    rows = [{"input": f"prompt {i}", "tok_input": p, "output": f"answer {i}"} for i, p in enumerate(prompts)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return prompts


@dataclass
class HarnessProject:
    """A temp project laid out like this repo: pytest.ini, models/, data/, user.conf, a test module."""

    pytester: pytest.Pytester

    @property
    def path(self) -> Path:
        return self.pytester.path

    def junit_times(self, name: str = "junit.xml") -> dict[str, float]:
        """Test id → seconds the test took, from the JUnit XML the inner run wrote."""
        out = {}
        for case in ET.parse(self.path / name).getroot().iter("testcase"):
            test = case.get("name", "")
            out[test[test.index("[") + 1 : -1]] = float(case.get("time", "nan"))
        return out

    def model(
        self,
        name: str,
        scenarios: tuple[str, ...] = ("Offline",),
        *,
        sim: dict[str, Any] | None = None,
        kind: str = "sim",
        dataset: str = "../data/prompts.json",
        loadgen_model: str = "tiny",
        max_tokens: int = 8,
        **extra: Any,
    ) -> Path:
        """Write ``models/<name>.yaml``; ``extra`` adds or replaces top-level keys."""
        case: dict[str, Any] = {
            "name": name,
            "engine": {"kind": kind, "start_timeout_s": 60, "stop_timeout_s": 5, "sim": sim or TINY_SIM},
            "dataset": {"path": dataset},
            "generation": {"max_tokens": max_tokens, "ignore_eos": True},
            "loadgen_model": {s: loadgen_model for s in ("Offline", "Server", "SingleStream")},
            "scenarios": list(scenarios),
            **extra,
        }
        path = self.path / "models" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(case, sort_keys=False))
        return path

    def user_conf(self, text: str) -> Path:
        path = self.path / "user.conf"
        path.write_text(textwrap.dedent(text))
        return path

    def run(self, *args: str, timeout: float = 120) -> pytest.RunResult:
        """pytest in a subprocess: LoadGen children, engine process groups and SIGTERM handlers stay
        out of this process."""
        return self.pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=timeout)

    def session_dirs(self) -> list[Path]:
        out = self.path / "harness_output"
        return sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []


def sim_case(tmp_path: Path, name: str = "simcase", max_tokens: int = 8, **sim: Any) -> BenchmarkCase:
    """A benchmark case for the simulator with ``sim`` settings (dataset: 16 random prompts)."""
    data = tmp_path / f"{name}-prompts.json"
    if not data.exists():
        write_dataset(data)
    return BenchmarkCase.model_validate(
        {
            "name": name,
            "engine": {"kind": "sim", "start_timeout_s": 30, "stop_timeout_s": 5, "sim": sim},
            "dataset": {"path": str(data)},
            "generation": {"max_tokens": max_tokens, "ignore_eos": True},
            "loadgen_model": {"Offline": "tiny", "Server": "tiny"},
            "scenarios": ["Offline", "Server"],
        }
    )


def run_pipeline(
    case: BenchmarkCase,
    scenario: str,
    endpoint: Endpoint,
    test_dir: Path,
    user_conf: Path,
    *,
    mode: str = "performance",
    events: Events | None = None,
    **options: Any,
) -> Outcome:
    """One benchmark test through the pipeline the plugin uses, against an engine already running."""
    (planned,) = [r for r in plan_runs(case, mode) if r.scenario == scenario]  # type: ignore[arg-type]
    suite = Suite(HarnessOptions(user_conf=user_conf, mode=mode, **options))
    return run_test(planned, lambda: endpoint, suite, test_dir, events)


class OnChild(Events):
    """Events that hand the LoadGen runner's pid to a callback."""

    def __init__(self, callback: Callable[[int], None]) -> None:
        self.callback = callback

    def child_started(self, pid: int) -> None:
        self.callback(pid)


# -- accuracy on the simulator: reference answers a word-level tokenizer decodes exactly ----------
EOS = 2  # the simulator's default eos_token_id; "</s>" in the test tokenizer
WORDS = (  # noqa: SIM905 (a list literal would take 44 lines)
    "the a council city storm police team report market school river mayor village company minister "
    "hospital court bridge festival museum said found announced opened closed warned raised built won "
    "lost new old local national small large early late on in after before with for"
).split()
ENDINGS = "today. yesterday. again. overnight. locally. quickly. recently. nationwide.".split()  # noqa: SIM905


def summaries(n: int = 16, seed: int = 7) -> list[str]:
    """Multi-sentence summaries: capitalised starts and full stops, so punkt splits them (rougeLsum)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(2, 4)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
            sentences.append(" ".join([words[0].capitalize(), *words[1:], rng.choice(ENDINGS)]))
        texts.append(" ".join(sentences))
    return texts


def build_tokenizer(folder: Path, texts: list[str]) -> dict[str, int]:
    """A word-level tokenizer.json: ids 0-2 special, then every whitespace-separated word of ``texts``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for t in texts for w in t.split()})
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": EOS, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: tokenizers then joins the tokens with single spaces, the inverse of WhitespaceSplit.
    tok.add_special_tokens(["[UNK]", "<s>", "</s>"])  # skip_special_tokens drops EOS when decoding
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    loaded = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for t in texts:
        ids = loaded.encode(t).ids
        assert 0 not in ids, f"unknown word in {t!r}"
        assert loaded.decode([*ids, EOS], skip_special_tokens=True) == t
    return vocab


def write_responses(path: Path, prompts: list[list[int]], outputs: list[list[int]]) -> Path:
    rows = [
        {"prompt_token_ids": p, "output_token_ids": [*o, EOS]} for p, o in zip(prompts, outputs, strict=True)
    ]
    path.write_text(json.dumps(rows))
    return path
