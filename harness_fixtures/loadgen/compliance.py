"""MLPerf compliance TEST06 (LLM output consistency): its audit.config and its verification.

TEST06 is an ordinary performance run that LoadGen changes itself when it finds ``audit.config`` in its
working directory: 100 sampled answers are logged to ``mlperf_log_accuracy.json``, at least 100
queries, no minimum duration, no equal-issue mode. The log is then checked by three rules:

- first token: the token reported to ``FirstTokenComplete`` equals the first token of the answer
  (skipped for Offline, where LoadGen asks for no first token);
- EOS: an answer ends in at most one EOS token;
- sample length: the ``n_tokens`` reported equals the number of tokens in the answer data.

The rules and the settings are MLCommons' (``compliance/TEST06`` of mlcommons/inference,
docs/submission.md); this module is the harness's own implementation of them.

The harness builds the first token and the answer from the same stream, so the first-token rule
holds by construction on its side. What it cannot see that way is a server whose streamed first token
is not its real answer's; for greedy generation the first-token check therefore also asks the server
for each logged prompt's answer without streaming (one token: the prefill's argmax) and compares.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests

from ..config import GenerationSpec

AUDIT_CONFIG = "audit.config"
# LoadGen reads this file from its working directory at the start of a test and applies it over
# the test settings, for every model (*) and the scenario being run. mode 2 = PerformanceOnly.
TEST06_AUDIT_CONFIG = """\
# MLPerf compliance TEST06 (written by harness-fixtures; settings from mlcommons/inference
# compliance/TEST06/audit.config): 100 sampled answers logged, >= 100 queries, no minimum duration.
*.*.mode = 2
*.*.accuracy_log_rng_seed = 720381539243781796
*.*.accuracy_log_sampling_target = 100
*.*.min_query_count = 100
*.*.min_duration = 0
*.*.sample_concatenate_permutation = 0
"""
# What LoadGen writes to its detail log when it applied an audit.config.
AUDIT_FOUND = "Found Audit Config file (audit.config)"


def write_audit_config(run_dir: Path) -> Path:
    """Put TEST06's audit.config where the LoadGen child of ``run_dir`` will run (its cwd)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / AUDIT_CONFIG
    path.write_text(TEST06_AUDIT_CONFIG)
    return path


@dataclass
class Test06Verdict:
    """The three checks over one TEST06 accuracy log."""

    samples: int
    first_token: bool | None  # None: skipped (Offline)
    eos: bool
    sample_length: bool
    examples: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # the log could not be read or LoadGen did not apply audit.config

    @property
    def passed(self) -> bool:
        return self.error is None and self.first_token is not False and self.eos and self.sample_length

    def text(self) -> str:
        """verify_accuracy.txt, in the lines the submission checker looks for."""
        first = "Skipped" if self.first_token is None else str(self.first_token)
        lines = [
            f"First token check pass: {first}",
            f"EOS check pass: {self.eos}",
            f"Sample length check pass: {self.sample_length}",
            "TEST06 verification complete" if self.passed else "TEST06 verification failed",
        ]
        if self.error:
            lines.append(f"# {self.error}")
        for check, example in self.examples.items():
            lines.append(f"# {check}: {example}")
        return "\n".join(lines) + "\n"


def _ids(hex_data: str) -> np.ndarray[Any, np.dtype[np.int32]]:
    return np.frombuffer(bytes.fromhex(hex_data), dtype="<i4")


def trailing_eos(ids: np.ndarray[Any, np.dtype[np.int32]], eos_ids: set[int]) -> int:
    """How many EOS tokens the answer ends with."""
    n = 0
    for t in ids[::-1]:
        if int(t) not in eos_ids:
            break
        n += 1
    return n


def answer_first_tokens(
    base_url: str,
    served_model: str,
    generation: GenerationSpec,
    prompts: Sequence[list[int] | str],
    headers: dict[str, str] | None = None,
    timeout_s: float = 120.0,
) -> list[int | None]:
    """The first token of the server's non-streamed answer to each prompt (None: no answer).

    One token is enough: under greedy decoding it is the argmax after prefill, whatever follows.
    """
    path = "/v1/completions" if generation.api == "completions" else "/v1/chat/completions"

    def one(prompt: list[int] | str) -> int | None:
        body: dict[str, Any] = {
            "model": served_model,
            "max_tokens": 1,
            "temperature": generation.temperature,
            "top_k": generation.top_k,
            "top_p": generation.top_p,
            "return_token_ids": True,
            "stream": False,
            **({"seed": generation.seed} if generation.seed is not None else {}),
            **generation.extra_body,
        }
        if generation.api == "completions":
            body["prompt"] = prompt
        else:
            body["messages"] = [{"role": "user", "content": prompt}]
        try:
            r = requests.post(base_url + path, json=body, headers=headers, timeout=timeout_s)
            ids = r.json()["choices"][0]["token_ids"] if r.status_code == 200 else None
        except (requests.RequestException, ValueError, KeyError, IndexError, TypeError):
            return None
        return int(ids[0]) if ids else None

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, prompts))


def logged_answers(run_dir: Path) -> list[dict[str, Any]]:
    """The entries of a run's mlperf_log_accuracy.json ([] when there is none)."""
    try:
        data = json.loads((run_dir / "mlperf" / "mlperf_log_accuracy.json").read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return data if isinstance(data, list) else []


def greedy(generation: GenerationSpec) -> bool:
    return generation.temperature == 0 or generation.top_k == 1


def verify_test06(
    run_dir: Path,
    scenario: str,
    eos_ids: list[int],
    answer_first: dict[int, int | None] | None = None,
) -> Test06Verdict:
    """Check ``run_dir/mlperf/mlperf_log_accuracy.json`` of a TEST06 run by the three rules.

    :param scenario: the LoadGen scenario (Offline skips the first-token check, as LoadGen logs no
        first token there).
    :param eos_ids: the model's EOS token ids; an empty list makes the EOS check pass trivially.
    :param answer_first: qsl_idx → the first token of the server's non-streamed answer
        (:func:`answer_first_tokens`); the first-token check then also compares against it.
    """
    mlperf = run_dir / "mlperf"
    detail = mlperf / "mlperf_log_detail.txt"
    skipped_first = None if scenario == "Offline" else True
    if not detail.is_file() or AUDIT_FOUND not in detail.read_text(errors="replace"):
        return Test06Verdict(
            0,
            None if skipped_first is None else False,
            False,
            False,
            error=f"LoadGen did not report reading {AUDIT_CONFIG} in {detail}: not a TEST06 run",
        )
    try:
        entries: list[dict[str, Any]] = json.loads((mlperf / "mlperf_log_accuracy.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return Test06Verdict(0, None if skipped_first is None else False, False, False, error=str(exc))
    eos = set(eos_ids)
    v = Test06Verdict(len(entries), skipped_first, True, True)
    for e in entries:
        data = _ids(e.get("data", ""))
        where = f"seq_id {e.get('seq_id')} qsl_idx {e.get('qsl_idx')}"
        if v.first_token is not None:
            first = _ids(e["token_data"]) if "token_data" in e else None
            if first is None or not len(first) or not len(data) or int(first[0]) != int(data[0]):
                v.first_token = False
                got = "none" if first is None or not len(first) else int(first[0])
                v.examples.setdefault(
                    "first_token", f"{where}: first token {got} != answer's {data[:1].tolist()}"
                )
            elif answer_first is not None and answer_first.get(int(e.get("qsl_idx", -1))) != int(first[0]):
                v.first_token = False
                v.examples.setdefault(
                    "first_token",
                    f"{where}: streamed first token {int(first[0])} != the server's non-streamed answer's "
                    f"{answer_first.get(int(e.get('qsl_idx', -1)))}",
                )
        if trailing_eos(data, eos) > 1:
            v.eos = False
            v.examples.setdefault("eos", f"{where}: ends in {trailing_eos(data, eos)} EOS tokens")
        if int(e.get("token_count", -1)) != len(data):
            v.sample_length = False
            v.examples.setdefault(
                "sample_length", f"{where}: token_count {e.get('token_count')} != {len(data)} tokens"
            )
    if not entries:
        v.error = "the TEST06 accuracy log holds no answers"
    return v
