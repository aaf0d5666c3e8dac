"""``SimSettings``: how the simulator behaves (latency model, output, fault knobs); read once at start."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class SimSettingsError(ValueError):
    """The settings file or a flag is wrong; the message names the field, the value and the fix."""


class SimSettings(BaseModel):
    """Everything the simulator can be told; every field is also a ``--dashed-name`` CLI flag."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Latency model: TTFT is counted from admission into the batch, so queueing adds to it.
    ttft_base_ms: float = Field(50.0, ge=0, description="Time to first token for an empty prompt, in ms.")
    ttft_per_prompt_token_ms: float = Field(
        0.0, ge=0, description="Extra time to first token per prompt token (prefill cost), in ms."
    )
    itl_ms: float = Field(5.0, ge=0, description="Time between successive output tokens, in ms.")
    itl_per_running_ms: float = Field(
        0.0,
        ge=0,
        description="Extra inter-token latency per other request running when this one is admitted, in "
        "ms: a batch that decodes slower as it fills, so TPOT grows with load as on a real engine.",
    )
    latency_jitter: float = Field(
        0.0,
        ge=0,
        le=2,
        description="Sigma of a lognormal factor (median 1) drawn per request and applied to its TTFT "
        "and ITL: run-to-run noise; 0 = deterministic.",
    )
    max_batch: int = Field(
        256, ge=1, description="Requests generating at once; later ones wait in a FIFO queue."
    )
    kv_cache_capacity_tokens: int = Field(
        262_144,
        ge=1,
        description="Tokens the pretend KV cache holds; only scales vllm:kv_cache_usage_perc.",
    )
    max_model_len: int = Field(
        131_072, ge=1, description="Prompt + output tokens allowed per request; more is a 400 like vLLM's."
    )

    # Output.
    vocab_size: int = Field(32_000, ge=16, description="Generated token ids are drawn from [3, vocab_size).")
    eos_token_id: int = Field(2, ge=0, description="Token id that ends an answer (finish_reason 'stop').")
    eos_after_tokens: int | None = Field(
        None,
        ge=0,
        description="End every generated answer with EOS after this many ordinary tokens, unless the "
        "request sets ignore_eos; unset: answers run to max_tokens.",
    )
    responses_file: Path | None = Field(
        None,
        description='JSON list of {"prompt_token_ids": [...], "output_token_ids": [...]}: prompts found '
        "there are answered with exactly those ids (cut at max_tokens).",
    )
    default_max_tokens: int = Field(
        16, ge=1, description="max_tokens of a completion request that sets none (vLLM's default)."
    )

    # Faults: all off by default.
    fail_start: bool = Field(False, description="Print an error and exit 3 before listening.")
    startup_delay_s: float = Field(0.0, ge=0, description="Wait this long before listening, in s.")
    crash_after_requests: int | None = Field(
        None, ge=0, description="Exit 1 (os._exit) when generation request N+1 arrives."
    )
    hang_after_requests: int | None = Field(
        None, ge=0, description="Accept generation request N+1 and later but never answer them."
    )
    http_500_rate: float = Field(0.0, ge=0, le=1, description="Fraction of requests answered HTTP 500.")
    malformed_sse_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Fraction of requests with a non-JSON data line mid-stream (non-streaming: a "
        "non-JSON body).",
    )
    truncate_stream_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Fraction of requests whose connection is closed mid-answer, without [DONE].",
    )
    stall_stream_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Fraction of streamed requests that stop sending half way through and keep the "
        "connection open (a stalled engine).",
    )
    done_without_end_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Fraction of streams that send everything up to data: [DONE] but never end the HTTP "
        "body (no terminating chunk); the connection stays open until the client closes it.",
    )
    ignore_stream_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description='Fraction of streamed requests answered as if "stream" were false: one JSON body, as a '
        "server or gateway that ignores stream does.",
    )
    double_eos: bool = Field(
        False,
        description="Every answer ends in two EOS ids, still within max_tokens (finish_reason 'stop'); "
        "breaks MLPerf's at-most-one-EOS output check.",
    )
    first_token_mismatch: bool = Field(
        False,
        description="Streams send a different first token id than the answer's true first token "
        "(the non-streaming answer, the reference answer and /sim/requests' expected_first_token_id).",
    )
    ignore_sigterm: bool = Field(
        False, description="Ignore SIGTERM, as a stuck engine does: only SIGKILL stops the process."
    )
    seed: int = Field(0, description="Seed of the RNG that picks which requests the *_rate faults hit.")

    # Transport: TLS and an Authorization check, as a remote deployment behind a gateway has.
    tls_certfile: Path | None = Field(None, description="Serve https with this PEM certificate (chain).")
    tls_keyfile: Path | None = Field(None, description="PEM key of tls_certfile (if not in the same file).")
    tls_client_ca: Path | None = Field(
        None, description="Require client certificates signed by this PEM CA (mutual TLS)."
    )
    require_authorization: str | None = Field(
        None, description="Answer 401 on every path unless the Authorization header equals this value."
    )

    # Bookkeeping.
    records_max: int = Field(
        200_000, ge=1, description="Per-request records kept for /sim/requests (oldest dropped first)."
    )
    uvloop: bool = Field(True, description="Run on uvloop when it is importable.")

    @model_validator(mode="after")
    def _check(self) -> SimSettings:
        if self.eos_token_id >= self.vocab_size:
            raise ValueError(
                f"eos_token_id {self.eos_token_id!r} must be below vocab_size {self.vocab_size!r}"
            )
        if self.responses_file is not None and not self.responses_file.is_file():
            raise ValueError(f"responses_file {str(self.responses_file)!r} is not a file; fix the path")
        for name in ("tls_certfile", "tls_keyfile", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {str(path)!r} is not a file; fix the path")
        if (self.tls_keyfile or self.tls_client_ca) and self.tls_certfile is None:
            raise ValueError("tls_keyfile and tls_client_ca need tls_certfile; set it")
        return self

    @classmethod
    def load(cls, path: Path | None, overrides: dict[str, Any]) -> SimSettings:
        """Build settings from a JSON file (optional) with ``overrides`` on top.

        :param path: JSON object file, or None.
        :param overrides: field values from the command line; they win over the file.
        :raises SimSettingsError: unreadable file or invalid values, with a message that says the fix.
        """
        data: dict[str, Any] = {}
        if path is not None:
            try:
                loaded = json.loads(Path(path).read_text())
            except OSError as exc:
                raise SimSettingsError(f"cannot read sim config {str(path)!r}: {exc.strerror}") from exc
            except json.JSONDecodeError as exc:
                raise SimSettingsError(f"sim config {str(path)!r} is not valid JSON: {exc}") from exc
            if not isinstance(loaded, dict):
                raise SimSettingsError(
                    f"sim config {str(path)!r} must hold a JSON object, got {type(loaded).__name__}"
                )
            data.update(loaded)
        data.update(overrides)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            lines = []
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"]) or "settings"
                got = f" (got {err['input']!r})" if err["type"] != "missing" and err["loc"] else ""
                lines.append(f"  {where}: {err['msg']}{got}")
            source = f" in {str(path)!r}" if path is not None else ""
            fields = ", ".join(cls.model_fields)
            raise SimSettingsError(
                f"invalid sim settings{source}:\n" + "\n".join(lines) + f"\nknown fields: {fields}"
            ) from exc


def load_responses(path: Path) -> dict[tuple[int, ...], list[int]]:
    """Read a reference-answer file into {prompt ids: output ids}.

    :raises SimSettingsError: the file is not a list of {"prompt_token_ids", "output_token_ids"}.
    """
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SimSettingsError(f"cannot read responses_file {str(path)!r}: {exc}") from exc
    if not isinstance(rows, list):
        raise SimSettingsError(f"responses_file {str(path)!r} must hold a JSON list")
    table: dict[tuple[int, ...], list[int]] = {}
    for i, row in enumerate(rows):
        ok = (
            isinstance(row, dict)
            and isinstance(row.get("prompt_token_ids"), list)
            and isinstance(row.get("output_token_ids"), list)
            and all(isinstance(t, int) for t in row["prompt_token_ids"])
            and all(isinstance(t, int) for t in row["output_token_ids"])
        )
        if not ok:
            raise SimSettingsError(
                f"responses_file {str(path)!r} row {i}: expected "
                '{"prompt_token_ids": [int, ...], "output_token_ids": [int, ...]}'
            )
        table[tuple(row["prompt_token_ids"])] = list(row["output_token_ids"])
    return table
