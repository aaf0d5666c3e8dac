"""Our own validation of LoadGen ``user.conf`` files (LoadGen silently ignores typos).

The grammar is LoadGen's ``TestSettings::FromConfig``: ``model.scenario.key = number`` per line,
``#`` starts a comment, model and scenario may be ``*``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

# Every key TestSettings::FromConfig reads in mlcommons-loadgen 6.0.x.
KNOWN_KEYS: frozenset[str] = frozenset(
    {
        "mode",
        "min_duration",
        "max_duration",
        "min_query_count",
        "max_query_count",
        "qsl_rng_seed",
        "sample_index_rng_seed",
        "schedule_rng_seed",
        "accuracy_log_rng_seed",
        "accuracy_log_probability",
        "accuracy_log_sampling_target",
        "print_timestamps",
        "performance_issue_unique",
        "performance_issue_same",
        "performance_issue_same_index",
        "performance_sample_count_override",
        "target_latency_percentile",
        "target_latency",
        "target_qps",
        "samples_per_query",
        "max_async_queries",
        "coalesce_queries",
        "ttft_latency",
        "tpot_latency",
        "use_token_latencies",
        "infer_token_latencies",
        "token_latency_scaling_factor",
        "sample_concatenate_permutation",
        "test05",
        "test05_qsl_rng_seed",
        "test05_sample_index_rng_seed",
        "test05_schedule_rng_seed",
        "accuracy_sample_count_override",
        "target_duration",
    }
)
KNOWN_SCENARIOS: frozenset[str] = frozenset({"*", "SingleStream", "MultiStream", "Server", "Offline"})
# Keys LoadGen reads with strtod; every other key is read with strtoull(value, 0), which silently
# truncates "1e3" to 1, wraps "-5" to 2**64 - 5 and reads "010" as octal 8.
DOUBLE_KEYS: frozenset[str] = frozenset(
    {"target_qps", "target_latency_percentile", "accuracy_log_probability"}
)
_INTEGER = re.compile(r"^\+?(0|[1-9]\d*|0[xX][0-9a-fA-F]+)$")
_DOUBLE = re.compile(r"^\+?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_NUMBER = re.compile(r"^[+-]?(0[xX][0-9a-fA-F]+|\d+(\.\d*)?([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?)$")


class UserConfError(ValueError):
    """A user.conf line LoadGen would ignore or misread; the message is ``file:line: what and fix``."""


@dataclass(frozen=True)
class ConfEntry:
    model: str
    scenario: str
    key: str
    value: str
    line: int


def parse_user_conf(path: Path) -> list[ConfEntry]:
    """Parse and validate a user.conf; raise UserConfError listing every bad line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserConfError(f"{path}: cannot read user.conf: {exc}; pass --harness-user-conf PATH") from exc
    entries: list[ConfEntry] = []
    errors: list[str] = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        line, hash_sign, comment = raw.partition("#")
        line = line.strip()
        where = f"{path}:{n}"
        if "=" not in line:
            errors.append(f"{where}: expected 'model.scenario.key = value', got {raw.strip()!r}")
            continue
        # LoadGen's parser splits on whitespace and wants exactly: key, "=", value. It ignores
        # "key=value" silently and rejects the whole file for a comment after the value.
        words = line.split()
        if len(words) != 3 or words[1] != "=":
            errors.append(
                f"{where}: write 'model.scenario.key = value' with spaces around '=' and one value, "
                f"got {line!r} (LoadGen would ignore or reject this line)"
            )
            continue
        if hash_sign:
            errors.append(
                f"{where}: LoadGen rejects a comment after the value; put '#{comment}' on its own line"
            )
            continue
        lhs, rhs = words[0], words[2]
        parts = lhs.split(".")
        if len(parts) < 3:
            errors.append(f"{where}: key {lhs!r} needs three dot-separated parts: model.scenario.key")
            continue
        # Model names may contain dots (e.g. "llama3.1"), so the last two parts are scenario and key.
        model, scenario, key = ".".join(parts[:-2]), parts[-2], parts[-1]
        if scenario not in KNOWN_SCENARIOS:
            hint = difflib.get_close_matches(scenario, sorted(KNOWN_SCENARIOS), n=1)
            fix = f"; did you mean {hint[0]!r}?" if hint else f"; use one of {sorted(KNOWN_SCENARIOS)}"
            errors.append(f"{where}: unknown scenario {scenario!r}{fix} (names are case-sensitive)")
            continue
        if key not in KNOWN_KEYS:
            hint = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1)
            fix = f"; did you mean {hint[0]!r}?" if hint else ""
            errors.append(f"{where}: unknown key {key!r}{fix} (LoadGen would silently ignore it)")
            continue
        if not _NUMBER.match(rhs):
            errors.append(f"{where}: value {rhs!r} of {key} must be an integer or a number")
            continue
        if key in DOUBLE_KEYS and not (_DOUBLE.match(rhs) or _INTEGER.match(rhs)):
            errors.append(f"{where}: value {rhs!r} of {key} must be a number >= 0")
            continue
        if key not in DOUBLE_KEYS and not _INTEGER.match(rhs):
            errors.append(
                f"{where}: value {rhs!r} of {key} must be a whole number >= 0 without leading zeros "
                "(LoadGen reads it with strtoull: '1e3' would be 1, '-5' a huge number, '010' octal 8)"
            )
            continue
        entries.append(ConfEntry(model, scenario, key, rhs, n))
    for e in entries:
        # LoadGen reads the token latency limits only where use_token_latencies = 1 applies: without
        # it, its 100 ms defaults stay, whatever the file says.
        if (
            e.key in ("ttft_latency", "tpot_latency")
            and lookup(entries, e.model, e.scenario, "use_token_latencies") != "1"
        ):
            errors.append(
                f"{path}:{e.line}: LoadGen ignores {e.key} unless use_token_latencies = 1 is set for "
                f"{e.model}/{e.scenario}; add '{e.model}.*.use_token_latencies = 1'"
            )
    if errors:
        raise UserConfError("\n".join(errors))
    return entries


def lookup(entries: list[ConfEntry], model: str, scenario: str, key: str) -> str | None:
    """The value LoadGen would pick, with its precedence: exact, *.scenario, model.*, *.*; last wins."""
    for m, s in ((model, scenario), ("*", scenario), (model, "*"), ("*", "*")):
        found = [e.value for e in entries if e.model == m and e.scenario == s and e.key == key]
        if found:
            return found[-1]
    return None


def unknown_models(path: Path, entries: list[ConfEntry], names: set[str]) -> list[str]:
    """Lines for a LoadGen model name that none of ``names`` (the cases using the file) is.

    LoadGen ignores them, so a typo in the model part silently runs with other settings; one
    ``file:line: what and fix`` message per line.
    """
    errors = []
    for e in entries:
        if e.model == "*" or e.model in names:
            continue
        hint = difflib.get_close_matches(e.model, sorted(names), n=1)
        fix = f"did you mean {hint[0]!r}? " if hint else ""
        errors.append(
            f"{path}:{e.line}: model {e.model!r} is not the LoadGen model name of any case using this "
            f"file ({', '.join(sorted(names))}); {fix}LoadGen would ignore the line: fix the name, use "
            "'*', or remove the line"
        )
    return errors
