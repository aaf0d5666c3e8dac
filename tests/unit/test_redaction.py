"""The one redaction: which names are secret, every form a secret takes in text, argv, env and logs."""

from __future__ import annotations

import logging
import string
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness_fixtures import redaction
from harness_fixtures.redaction import REDACTED


@pytest.fixture(autouse=True)
def _fresh_registry() -> Iterator[None]:
    redaction.clear_secrets()
    yield
    redaction.clear_secrets()


@pytest.mark.parametrize(
    "name",
    [
        "--api-key",
        "--hf-token",
        "api_key",
        "apiKey",
        "HF_TOKEN",
        "VLLM_API_KEY",
        "MLFLOW_TRACKING_PASSWORD",
        "AWS_SECRET_ACCESS_KEY",
        "Authorization",
        "--auth-token",
        "GITHUB_TOKEN",
    ],
)
def test_secret_names(name: str) -> None:
    assert redaction.is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "--max-num-batched-tokens",  # vLLM: a number, not a secret (plural 'tokens')
        "max_tokens",
        "api_key_env",  # the NAME of the variable holding the key
        "eos_token_ids",
        "--return-tokens-as-token-ids",
        "TOKENIZERS_PARALLELISM",
        "--tokenizer",
        "--ssl-keyfile",
        "HF_TOKEN_PATH",
        "--ttft-per-prompt-token-ms",  # a unit, not a credential
        "eos_token",
        "first_token_in_complete",
        "--host",
        "PWD",  # the working directory, not a password
    ],
)
def test_not_secret_names(name: str) -> None:
    assert not redaction.is_secret_name(name)


def test_url_userinfo_is_hidden_even_with_an_at_sign_in_the_password() -> None:
    assert (
        redaction.scrub_url("GET http://bob:p@ss@host:8/v1?x=a@b ok") == "GET http://***@host:8/v1?x=a@b ok"
    )
    assert redaction.strip_userinfo("https://tok@h/v1") == "https://h/v1"
    assert redaction.url_password("http://bob:pw1234@h") == "pw1234"
    assert redaction.url_password("http://lonetoken@h") == "lonetoken"
    assert redaction.url_password("http://h/x") is None


def test_flag_forms_and_assignments_in_text() -> None:
    line = "vllm serve m --api-key=k1k1k1 --hf-token t2t2t2 --max-num-batched-tokens 8192 HF_TOKEN=t3t3t3 x=1"
    assert redaction.text(line) == (
        "vllm serve m --api-key=*** --hf-token *** --max-num-batched-tokens 8192 HF_TOKEN=*** x=1"
    )


def test_registered_values_and_secret_env_values_are_hidden_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_SERVICE_TOKEN", "env-secret-value")
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "true")  # plainly not a secret: not searched
    redaction.add_secrets(["registered-secret", "abcde", None])  # too short to search for: ignored
    out = redaction.text("a registered-secret and env-secret-value; it is true; abcde")
    assert out == "a *** and ***; it is true; abcde"


def test_argv_both_forms_and_bool_flags_do_not_swallow_the_next_flag() -> None:
    argv = ["vllm", "serve", "--api-key", "k", "--hf-token=t", "--disable-auth", "--port", "8000", "--token"]
    assert redaction.argv(argv) == [
        "vllm",
        "serve",
        "--api-key",
        REDACTED,
        f"--hf-token={REDACTED}",
        "--disable-auth",
        "--port",
        "8000",
        "--token",
    ]


def test_env_and_engine_args_hide_secret_keys_only() -> None:
    assert redaction.env({"HF_TOKEN": "x", "OMP_NUM_THREADS": "2"}) == {
        "HF_TOKEN": REDACTED,
        "OMP_NUM_THREADS": "2",
    }
    assert redaction.engine_args({"hf-token": "x", "api_key": True, "max-num-batched-tokens": 8192}) == {
        "hf-token": REDACTED,
        "api_key": True,  # a bare flag: nothing to hide
        "max-num-batched-tokens": 8192,
    }
    assert redaction.engine_args(["--api-key", "x"]) == ["--api-key", REDACTED]


def test_case_secrets_from_env_args_and_url() -> None:
    found = redaction.case_secrets(
        {
            "env": {"HF_TOKEN": "e1", "OMP_NUM_THREADS": "2"},
            "args": ["--hf-token=a1", "--api-key", "a2", "--port", "1"],
            "url": "http://u:pw@h",
        }
    )
    assert found == ["e1", "a1", "a2", "pw"]
    assert redaction.case_secrets({"args": {"api-key": "m1", "tp": 2}}) == ["m1"]


def test_data_walks_every_string_and_keeps_keys() -> None:
    redaction.add_secrets(["planted-1234"])
    doc = {"a": ["x planted-1234", {"b": "http://u:p@h"}], "n": 3, "planted-1234": None}
    assert redaction.data(doc) == {"a": ["x ***", {"b": "http://***@h"}], "n": 3, "planted-1234": None}


def test_log_records_are_redacted_for_every_handler(caplog: pytest.LogCaptureFixture) -> None:
    redaction.add_secrets(["log-secret-99"])
    child = logging.getLogger("harness_fixtures.test_redaction_child")
    redaction.protect_loggers()
    with caplog.at_level(logging.INFO, logger="harness_fixtures"):
        child.info("starting %s", "--api-key log-secret-99 http://u:pw@h")
        try:
            raise RuntimeError("boom log-secret-99")
        except RuntimeError:
            child.exception("failed")
    text = caplog.text
    assert "log-secret-99" not in text and "u:pw" not in text, text
    assert "--api-key ***" in text and "boom ***" in text


# -- properties ----------------------------------------------------------------------------------
USERINFO = st.text(
    alphabet=string.ascii_letters + string.digits + "-._~!$&'()*+,;=%:@", min_size=1, max_size=30
)
HOST = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z]{2,5})?(:[0-9]{1,5})?", fullmatch=True)


@given(userinfo=USERINFO, host=HOST, path=st.from_regex(r"(/[a-z0-9@?=&]{0,10}){0,3}", fullmatch=True))
def test_any_userinfo_is_hidden(userinfo: str, host: str, path: str) -> None:
    assert (
        redaction.scrub_url(f"see http://{userinfo}@{host}{path} now") == f"see http://***@{host}{path} now"
    )


SECRET_FLAGS = st.sampled_from(["--api-key", "--hf-token", "--password", "--auth-token", "--secret"])
VALUE = st.text(alphabet=string.ascii_letters + string.digits + "+/=_.:@", min_size=1, max_size=40).filter(
    lambda v: not v.startswith("-")
)


@given(flag=SECRET_FLAGS, value=VALUE, joined=st.booleans(), before=st.lists(st.sampled_from(["-v", "x"])))
def test_secret_flag_values_never_survive_argv_or_text(
    flag: str, value: str, joined: bool, before: list[str]
) -> None:
    args = [*before, f"{flag}={value}"] if joined else [*before, flag, value]
    out = redaction.argv(args)
    assert out[: len(before)] == before
    assert out[len(before) :] == ([f"{flag}={REDACTED}"] if joined else [flag, REDACTED])
    assert redaction.text(" ".join(args)).endswith(f"{flag}{'=' if joined else ' '}{REDACTED}")
