"""user.conf validation (harness_fixtures.userconf), checked against what LoadGen itself does.

LoadGen ignores typos and misreads some values silently, so where a test claims "LoadGen would
misread this", LoadGen is asked, in a subprocess (its config state is process-global).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness_fixtures.loadgen.userconf import ConfEntry, UserConfError, parse_user_conf, unknown_models

REPO = Path(__file__).resolve().parents[2]

# Loads each conf into a fresh TestSettings and prints the asked attributes. The first FromConfig of
# a process also loads the built-in mlperf.conf, so an empty file goes first and every job sees only
# its own file on top of LoadGen's defaults.


def write(tmp_path: Path, text: str, name: str = "user.conf") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_of(path: Path) -> str:
    with pytest.raises(UserConfError) as info:
        parse_user_conf(path)
    return str(info.value)


def test_valid_file_parses_with_line_numbers(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# a comment\n"
        "\n"
        "llama3_1-8b.Server.target_qps = 5\n"
        "   # indented comment\n"
        "*.*.min_duration = 10000\n"
        "llama3.1-70b.Offline.target_qps = 1.5e1\n"
        "m.Server.max_query_count = 0x10\n",
    )
    assert parse_user_conf(path) == [
        ConfEntry("llama3_1-8b", "Server", "target_qps", "5", 3),
        ConfEntry("*", "*", "min_duration", "10000", 5),
        ConfEntry("llama3.1-70b", "Offline", "target_qps", "1.5e1", 6),  # dots in a model name
        ConfEntry("m", "Server", "max_query_count", "0x10", 7),
    ]


def test_the_suites_user_conf_is_valid() -> None:
    assert parse_user_conf(REPO / "benchmarks" / "user.conf")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("m.Server.target_qsp = 5", "unknown key 'target_qsp'; did you mean 'target_qps'? (LoadGen would"),
        ("m.server.target_qps = 5", "unknown scenario 'server'; did you mean 'Server'? (names are case-sens"),
        ("m.Offlin.target_qps = 5", "unknown scenario 'Offlin'; did you mean 'Offline'?"),
        ("m.Server.target_qps = fast", "value 'fast' of target_qps must be an integer or a number"),
        ("m.Server.min_duration = 10s", "value '10s' of min_duration must be an integer or a number"),
        ("m.Server.use_token_latencies = true", "value 'true' of use_token_latencies must be an integer"),
        ("m.Server.target_qps 5", "expected 'model.scenario.key = value', got 'm.Server.target_qps 5'"),
        ("Server.target_qps = 5", "key 'Server.target_qps' needs three dot-separated parts"),
    ],
)
def test_bad_line_is_named_with_file_line_and_fix(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, f"m.Server.min_query_count = 10\n{line}\n")
    assert errors_of(path).startswith(f"{path}:2: ")
    assert message in errors_of(path)


def test_every_bad_line_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "m.Server.target_qsp = 5\nm.Server.target_qps = 5\nm.server.min_duration = 1\n")
    lines = errors_of(path).splitlines()
    assert [ln.split(": ", 1)[0] for ln in lines] == [f"{path}:1", f"{path}:3"]


def test_unreadable_file_says_which_option_to_set(tmp_path: Path) -> None:
    message = errors_of(tmp_path / "missing.conf")
    assert str(tmp_path / "missing.conf") in message and "--harness-user-conf" in message


# Lines LoadGen reads differently from what they say (each verified against LoadGen below).
MISREAD: list[tuple[str, str, dict[str, Any]]] = [
    ("m.Server.min_query_count = 1e3", "whole number", {"rc": 0, "value": 1}),
    ("m.Server.min_query_count = 2.5", "whole number", {"rc": 0, "value": 2}),
    ("m.Server.min_query_count = -5", "whole number", {"rc": 0, "value": 2**64 - 5}),
    ("m.Server.min_query_count = 010", "leading zeros", {"rc": 0, "value": 8}),
    ("m.Server.min_query_count=700", "spaces around '='", {"rc": 0, "value": "default"}),
    ("m.Server.min_query_count = 7 8", "one value", {"rc": 0, "value": 8}),
    ("m.Server.min_query_count = 700 # why", "comment after the value", {"rc": -22}),
    ("m.Server.min_query_count = 700 #", "comment after the value", {"rc": -22}),
    ("m.Server.target_qps = -3", "must be a number >= 0", {"rc": 0, "value": -3.0}),
]


def test_token_latency_limits_without_use_token_latencies_are_rejected(tmp_path: Path) -> None:
    # LoadGen keeps its 100 ms defaults for these unless use_token_latencies = 1 applies (checked by
    # running LoadGen: tests/e2e/test_userconf_loadgen.py).
    message = errors_of(write(tmp_path, "m.Server.ttft_latency = 2000\nm.Server.tpot_latency = 200\n"))
    assert "user.conf:1: LoadGen ignores ttft_latency unless use_token_latencies = 1" in message
    assert (
        "user.conf:2: LoadGen ignores tpot_latency" in message and "'m.*.use_token_latencies = 1'" in message
    )
    for enable in (
        "m.*.use_token_latencies = 1",
        "*.Server.use_token_latencies = 1",
        "m.Server.use_token_latencies = 1",
    ):
        ok = parse_user_conf(write(tmp_path, f"{enable}\nm.Server.ttft_latency = 2000\n"))
        assert [e.key for e in ok] == ["use_token_latencies", "ttft_latency"]


def test_lines_for_a_model_no_case_uses_are_named_with_a_hint(tmp_path: Path) -> None:
    """LoadGen ignores a line whose model part matches nothing: a typo there silently runs with
    other settings."""
    path = write(
        tmp_path,
        "llama3_1-8b.Server.target_qps = 5\n"
        "llama3_1-8b-interactiv.Server.target_qps = 2\n"
        "*.Offline.min_duration = 10\n"
        "gptj.Offline.target_qps = 1\n",
    )
    names = {"llama3_1-8b", "llama3_1-8b-interactive"}
    first, second = unknown_models(path, parse_user_conf(path), names)
    assert first.startswith(f"{path}:2: model 'llama3_1-8b-interactiv' is not the LoadGen model name")
    assert "did you mean 'llama3_1-8b-interactive'?" in first and "use '*', or remove the line" in first
    assert second.startswith(f"{path}:4: model 'gptj'")
    assert unknown_models(path, parse_user_conf(path), {*names, "gptj", "llama3_1-8b-interactiv"}) == []
