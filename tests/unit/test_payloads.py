"""Each engine's request body (harness_fixtures.client.payload) checked against a model of what that
engine's server accepts.

The models below list the top-level fields of the servers' own request models, as read in their
sources (docs/http.md says which versions): vLLM 0.32 ``vllm/entrypoints/openai/{completion,
chat_completion}/protocol.py``, SGLang ``python/sglang/srt/entrypoints/openai/protocol.py``,
TensorRT-LLM ``tensorrt_llm/serve/openai_protocol.py``. Fields the client sends are typed as there;
the rest are only named. All use ``extra="forbid"``: TensorRT-LLM's own models do (one unknown field
is HTTP 400), and for vLLM and SGLang, which log or ignore unknown fields, it proves nothing the
client sends is silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from harness_fixtures.client.payload import (
    PROFILES,
    SGLANG,
    TRTLLM,
    VLLM,
    PayloadError,
    RequestProfile,
    build_payload,
    describe_token_source,
    token_source,
)
from harness_fixtures.config import GenerationSpec


class _Forbid(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _named(*names: str) -> dict[str, Any]:
    """Fields the client never sends: named (so they are not 'extra'), not typed."""
    return {n: (Any, None) for n in names}


class StreamOptions(_Forbid):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class Message(_Forbid):
    role: Literal["user"]
    content: str


def _model(name: str, base: type[BaseModel], other: tuple[str, ...]) -> type[BaseModel]:
    from pydantic import create_model

    model: type[BaseModel] = create_model(name, __base__=base, **_named(*other))
    return model


# -- vLLM 0.32 ---------------------------------------------------------------------------------------
class _VllmCompletion(_Forbid):
    model: str | None = None
    prompt: list[int] | str
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    ignore_eos: bool = False
    return_token_ids: bool | None = None


VllmCompletion = _model(
    "VllmCompletion",
    _VllmCompletion,
    ("echo", "frequency_penalty", "logit_bias", "logprobs", "n", "presence_penalty", "stop", "suffix", "user",
     "use_beam_search", "min_p", "repetition_penalty", "watermarking", "length_penalty", "stop_token_ids",
     "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
     "truncate_prompt_tokens", "truncation_side", "allowed_token_ids", "prompt_logprobs", "logprob_token_ids",
     "bad_words", "prompt_embeds", "add_special_tokens", "response_format", "structured_outputs", "priority",
     "request_id", "session_id", "return_tokens_as_token_ids", "routed_experts_prompt_start",
     "return_token_offsets", "mm_payload", "return_mm_kwargs", "cache_salt", "kv_transfer_params",
     "ec_transfer_params", "vllm_xargs", "repetition_detection", "thinking_token_budget", "stream_interval"),
)  # fmt: skip


class _VllmChat(_Forbid):
    model: str | None = None
    messages: list[Message]
    max_tokens: int | None = None
    min_tokens: int = 0
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    ignore_eos: bool = False
    return_token_ids: bool | None = None


VllmChat = _model(
    "VllmChat",
    _VllmChat,
    ("frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "max_completion_tokens", "n",
     "presence_penalty", "response_format", "stop", "tools", "tool_choice", "reasoning_effort",
     "thinking_token_budget", "include_reasoning", "parallel_tool_calls", "user", "use_beam_search", "min_p",
     "repetition_penalty", "watermarking", "length_penalty", "stop_token_ids", "include_stop_str_in_output",
     "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens", "truncation_side",
     "prompt_logprobs", "logprob_token_ids", "allowed_token_ids", "bad_words", "echo",
     "add_generation_prompt",
     "continue_final_message", "add_special_tokens", "documents", "chat_template", "chat_template_kwargs",
     "media_io_kwargs", "mm_processor_kwargs", "structured_outputs", "priority", "request_id", "session_id",
     "return_tokens_as_token_ids", "routed_experts_prompt_start", "return_token_offsets",
     "return_prompt_text", "mm_payload", "return_mm_kwargs", "cache_salt", "kv_transfer_params",
     "ec_transfer_params", "vllm_xargs", "repetition_detection", "stream_interval"),
)  # fmt: skip


# -- SGLang ------------------------------------------------------------------------------------------
class _SglangCompletion(_Forbid):
    model: str = "default"
    prompt: list[int] | str
    max_tokens: int = Field(16, gt=0)
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False


SglangCompletion = _model(
    "SglangCompletion",
    _SglangCompletion,
    ("best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "n", "presence_penalty", "stop",
     "suffix", "user", "return_hidden_states", "return_routed_experts", "routed_experts_start_len",
     "return_cached_tokens_details", "min_p", "json_schema", "regex", "ebnf", "repetition_penalty",
     "stop_token_ids", "stop_regex", "no_stop_trim", "skip_special_tokens", "lora_path", "session_id",
     "session_params", "response_format", "custom_params", "custom_logit_processor", "images_config",
     "bootstrap_host", "bootstrap_port", "bootstrap_room", "routed_dp_rank", "disagg_prefill_dp_rank",
     "data_parallel_rank", "rid", "extra_key", "cache_salt", "ngram_corpus_id", "priority", "custom_labels"),
)  # fmt: skip


class _SglangChat(_Forbid):
    model: str = "default"
    messages: list[Message]
    max_completion_tokens: int | None = None
    min_tokens: int = 0
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False

    @model_validator(mode="after")
    def _streaming_ids(self) -> _SglangChat:
        # serving_chat.py refuses this pair with HTTP 400
        if self.stream and self.return_token_ids:
            raise ValueError("return_token_ids is not supported with streaming on /v1/chat/completions")
        return self


SglangChat = _model(
    "SglangChat",
    _SglangChat,
    ("frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "max_tokens", "n", "presence_penalty",
     "response_format", "stop", "user", "tools", "tool_choice", "parallel_tool_calls", "return_hidden_states",
     "return_routed_experts", "routed_experts_start_len", "return_cached_tokens_details",
     "return_prompt_token_ids", "return_meta_info", "reasoning_effort", "task", "min_p", "regex", "ebnf",
     "repetition_penalty", "stop_token_ids", "stop_regex", "no_stop_trim", "continue_final_message",
     "skip_special_tokens", "lora_path", "session_id", "session_params", "separate_reasoning",
     "stream_reasoning", "chat_template_kwargs", "max_dynamic_patch", "min_dynamic_patch",
     "use_audio_in_video", "images_config", "custom_logit_processor", "custom_params", "input_ids", "rid",
     "extra_key", "cache_salt", "ngram_corpus_id", "priority", "bootstrap_host", "bootstrap_port",
     "bootstrap_room", "routed_dp_rank", "disagg_prefill_dp_rank", "data_parallel_rank"),
)  # fmt: skip


# -- TensorRT-LLM (trtllm-serve) ---------------------------------------------------------------------
class _TrtllmCompletion(_Forbid):
    model: str
    prompt: list[int] | str
    max_tokens: int | None = None
    min_tokens: int = 0
    temperature: float | None = None
    top_k: int = 0
    top_p: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    ignore_eos: bool = False
    detokenize: bool = True

    @model_validator(mode="after")
    def _options_need_stream(self) -> _TrtllmCompletion:
        if self.stream_options and not self.stream:
            raise ValueError("Stream options can only be defined when stream is true.")
        return self


TrtllmCompletion = _model(
    "TrtllmCompletion",
    _TrtllmCompletion,
    ("best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "n", "presence_penalty", "stop",
     "suffix", "user", "lora_request", "prompt_ignore_length", "use_beam_search", "top_p_min", "min_p",
     "repetition_penalty", "length_penalty", "early_stopping", "stop_token_ids", "include_stop_str_in_output",
     "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens",
     "return_context_logits", "thinking_token_budget", "add_special_tokens", "response_format",
     "disaggregated_params", "priority", "conversation_params"),
)  # fmt: skip


class _TrtllmChat(_Forbid):
    model: str
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, validation_alias="max_tokens")
    min_tokens: int = 0
    temperature: float | None = None
    top_k: int = 0
    top_p: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    ignore_eos: bool = False


TrtllmChat = _model(
    "TrtllmChat",
    _TrtllmChat,
    ("prompt_token_ids", "prompt_token_ids_b64", "frequency_penalty", "logit_bias", "logprobs",
     "top_logprobs", "n", "presence_penalty", "response_format", "stop", "tools", "tool_choice",
     "parallel_tool_calls", "user",
     "reasoning_effort", "thinking", "thinking_token_budget", "prompt_ignore_length", "best_of",
     "use_beam_search", "top_p_min", "min_p", "repetition_penalty", "length_penalty", "early_stopping",
     "stop_token_ids", "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
     "truncate_prompt_tokens", "lora_request", "echo", "add_generation_prompt", "add_special_tokens",
     "documents", "chat_template", "chat_template_kwargs", "injected_chat_template_kwargs", "media_io_kwargs",
     "disaggregated_params", "conversation_params", "cache_salt", "priority", "agent_hierarchy",
     "mm_processor_kwargs"),
)  # fmt: skip

MODELS: dict[tuple[str, str], type[BaseModel]] = {
    ("vllm", "completions"): VllmCompletion,
    ("vllm", "chat"): VllmChat,
    ("sglang", "completions"): SglangCompletion,
    ("sglang", "chat"): SglangChat,
    ("trtllm", "completions"): TrtllmCompletion,
    ("trtllm", "chat"): TrtllmChat,
}
EXPECTED_SOURCE = {
    ("vllm", "completions"): "token_ids",
    ("vllm", "chat"): "token_ids",
    ("sglang", "completions"): "token_ids",
    ("sglang", "chat"): "usage",
    ("trtllm", "completions"): "token_ids",
    ("trtllm", "chat"): "usage",
}


def payload(profile: RequestProfile, api: str, **gen: Any) -> dict[str, Any]:
    g = GenerationSpec(api=api, max_tokens=128, ignore_eos=True, **gen)  # type: ignore[arg-type]
    prompt: list[int] | str = [1, 2, 3] if api == "completions" else "Summarize: ..."
    return build_payload(profile, g, "llama", prompt, token_source(profile, g))


@pytest.mark.parametrize("engine, api", list(MODELS))
def test_payload_is_accepted_by_the_engines_request_model(engine: str, api: str) -> None:
    profile = PROFILES[engine]
    body = payload(profile, api)
    req = MODELS[(engine, api)].model_validate(body)
    assert token_source(profile, GenerationSpec(api=api)) == EXPECTED_SOURCE[(engine, api)]  # type: ignore[arg-type]
    # What MLPerf needs arrives at the server: greedy, seed, min/max tokens, ignore_eos, usage.
    dumped = req.model_dump()
    assert dumped["temperature"] == 0.0 and dumped["top_k"] == 1 and dumped["seed"] == 42
    assert dumped["ignore_eos"] is True and dumped["min_tokens"] == 1 and dumped["stream"] is True
    assert dumped["stream_options"]["include_usage"] is True
    max_field = "max_tokens" if api == "completions" or engine == "vllm" else "max_completion_tokens"
    assert dumped[max_field] == 128


def test_each_engine_is_asked_for_token_ids_its_own_way() -> None:
    assert payload(VLLM, "completions")["return_token_ids"] is True
    assert payload(VLLM, "chat")["return_token_ids"] is True
    assert payload(SGLANG, "completions")["return_token_ids"] is True
    assert "return_token_ids" not in payload(SGLANG, "chat")  # refused when streaming
    assert payload(TRTLLM, "completions")["detokenize"] is False
    assert not {"return_token_ids", "detokenize"} & payload(TRTLLM, "chat").keys()
    assert payload(TRTLLM, "chat")["stream_options"]["continuous_usage_stats"] is True


def test_what_the_servers_refuse_is_caught_by_the_models() -> None:
    """The models are strict enough to have caught the client's old body: return_token_ids to
    trtllm-serve, and return_token_ids on SGLang's streamed chat."""
    old = {"model": "m", "prompt": [1], "stream": True, "return_token_ids": True}
    with pytest.raises(ValidationError, match="return_token_ids"):
        TrtllmCompletion.model_validate(old)
    with pytest.raises(ValidationError, match="not supported with streaming"):
        SglangChat.model_validate({"messages": [{"role": "user", "content": "x"}], "stream": True,
                                   "return_token_ids": True})  # fmt: skip


def test_count_tokens_setting() -> None:
    assert token_source(VLLM, GenerationSpec(count_tokens="usage")) == "usage"
    body = payload(VLLM, "completions", count_tokens="usage")
    assert "return_token_ids" not in body and body["stream_options"]["continuous_usage_stats"] is True
    with pytest.raises(PayloadError, match="carries no token ids"):
        token_source(TRTLLM, GenerationSpec(api="chat", count_tokens="token_ids"))
    line = describe_token_source(TRTLLM, GenerationSpec(api="chat"), "usage")
    assert line.startswith("usage: usage.completion_tokens") and "trtllm" in line
    line = describe_token_source(TRTLLM, GenerationSpec(), "token_ids")
    assert line.startswith("token_ids:") and "detokenize: false" in line


def test_extra_body_is_sent_as_given() -> None:
    body = payload(TRTLLM, "completions", extra_body={"priority": 0.5})
    assert TrtllmCompletion.model_validate(body).model_dump()["priority"] == 0.5
