"""What each engine's OpenAI-compatible server accepts in a request, and how its stream carries tokens.

A launcher kind declares its :class:`RequestProfile` (``request_profile``); the client builds every
request body with :func:`build_payload` from it, so a server never gets a field it rejects
(trtllm-serve's request models forbid unknown fields: one extra field is HTTP 400 for every request).
How output tokens are counted follows from the profile and the API (:func:`token_source`): token ids
per stream chunk where the server sends them, else ``usage.completion_tokens``. What each server
accepts was read from its request models; docs/http.md says where and when.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config import GenerationSpec

TokenSource = Literal["token_ids", "usage"]


class RequestProfile(BaseModel):
    """The request fields one server kind accepts (OpenAI's plus its extensions)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(description="Engine the profile describes (vllm, sglang, trtllm).")
    completions_ids: Literal["return_token_ids", "detokenize_false", "none"] = Field(
        "return_token_ids",
        description="How /v1/completions streams output token ids: asked with return_token_ids, "
        "with detokenize=false, or not at all.",
    )
    chat_ids: Literal["return_token_ids", "none"] = Field(
        "return_token_ids", description="How /v1/chat/completions streams output token ids."
    )
    chat_max_tokens: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens", description="The chat request's output-length field."
    )
    min_tokens: bool = True
    ignore_eos: bool = True
    top_k: bool = True
    seed: bool = True
    continuous_usage: bool = Field(
        True, description="stream_options.continuous_usage_stats: usage on every chunk."
    )


# vLLM: OpenAI fields plus token-id prompts, return_token_ids (ids on every chunk, both APIs),
# min_tokens, ignore_eos, top_k.
VLLM = RequestProfile(name="vllm")
# SGLang: return_token_ids on /v1/completions streams; /v1/chat/completions refuses it when streaming.
SGLANG = RequestProfile(name="sglang", chat_ids="none", chat_max_tokens="max_completion_tokens")
# trtllm-serve: no return_token_ids (an unknown field: HTTP 400); detokenize=false puts the ids of each
# chunk in choices[].token_ids on /v1/completions; chat chunks carry no ids.
TRTLLM = RequestProfile(
    name="trtllm",
    completions_ids="detokenize_false",
    chat_ids="none",
    chat_max_tokens="max_completion_tokens",
)
PROFILES: dict[str, RequestProfile] = {"vllm": VLLM, "sglang": SGLANG, "trtllm": TRTLLM}


class PayloadError(ValueError):
    """The generation settings ask for something the server cannot do; the message says the fix."""


def token_source(profile: RequestProfile, generation: GenerationSpec) -> TokenSource:
    """How output tokens are counted for this server and API.

    :raises PayloadError: ``count_tokens: token_ids`` for an API whose stream carries no ids.
    """
    api = generation.api
    ids = profile.completions_ids if api == "completions" else profile.chat_ids
    asked = generation.count_tokens
    if asked == "usage":
        return "usage"
    if ids == "none":
        if asked == "token_ids":
            raise PayloadError(
                f"generation.count_tokens is token_ids, but {profile.name}'s {api} stream carries no token "
                "ids; use api: completions, or count_tokens: usage (no ids: accuracy runs and the "
                "output-consistency checks then cannot run)"
            )
        return "usage"
    return "token_ids"


def describe_token_source(profile: RequestProfile, generation: GenerationSpec, source: TokenSource) -> str:
    """One line for result.yaml: how this run counted output tokens."""
    api = generation.api
    if source == "usage":
        return (
            f"usage: usage.completion_tokens of {profile.name}'s {api} stream (no token ids; "
            "first token = first chunk with output)"
        )
    how = profile.completions_ids if api == "completions" else profile.chat_ids
    asked = "return_token_ids" if how == "return_token_ids" else "detokenize: false"
    return f"token_ids: ids of every {api} stream chunk ({profile.name}, {asked}), checked against usage"


def build_payload(
    profile: RequestProfile,
    generation: GenerationSpec,
    served_model: str,
    prompt: list[int] | str,
    source: TokenSource,
) -> dict[str, Any]:
    """The JSON body of one streamed request; ``generation.extra_body`` is merged last (as given)."""
    g = generation
    body: dict[str, Any] = {"model": served_model}
    if g.api == "completions":
        body["prompt"] = prompt
        body["max_tokens"] = g.max_tokens
    else:
        body["messages"] = [{"role": "user", "content": prompt}]
        body[profile.chat_max_tokens] = g.max_tokens
    if profile.min_tokens:
        body["min_tokens"] = g.min_tokens
    body["temperature"] = g.temperature
    if profile.top_k:
        body["top_k"] = g.top_k
    body["top_p"] = g.top_p
    body["stream"] = True
    options: dict[str, Any] = {"include_usage": True}
    if source == "usage" and profile.continuous_usage:
        options["continuous_usage_stats"] = True  # usage on every chunk: the first token is exact
    body["stream_options"] = options
    if source == "token_ids":
        how = profile.completions_ids if g.api == "completions" else profile.chat_ids
        if how == "return_token_ids":
            body["return_token_ids"] = True
        elif how == "detokenize_false":
            body["detokenize"] = False
    if g.seed is not None and profile.seed:
        body["seed"] = g.seed
    if g.ignore_eos and profile.ignore_eos:
        body["ignore_eos"] = True
    body.update(g.extra_body)
    return body


def model_ids(text: str) -> list[Any] | None:
    """The model ids of an OpenAI ``/v1/models`` answer (``{"data": [{"id": ...}]}``), or None when
    the text is not such a list."""
    try:
        data = json.loads(text).get("data")
    except (ValueError, AttributeError):
        return None
    if not isinstance(data, list) or not all(isinstance(m, dict) for m in data):
        return None
    return [m.get("id") for m in data]
