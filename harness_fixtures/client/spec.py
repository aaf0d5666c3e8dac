"""What the streaming client needs for a run, serializable (no secrets): the runner hands it to
its in-process client and, as JSON, to each fan-out worker process."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config import DatasetSpec, GenerationSpec
from ..dataset import load_dataset
from .httpconfig import HttpSettings
from .payload import VLLM, RequestProfile, TokenSource, token_source

DispatchPolicy = Literal["least-outstanding", "round-robin"]
DISPATCH_POLICIES: tuple[DispatchPolicy, ...] = ("least-outstanding", "round-robin")


class ClientSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    base_url: str = Field(description="The server URL, without credentials (they travel in the environment).")
    served_model: str
    generation: GenerationSpec
    dataset: DatasetSpec
    dataset_path: str
    sample_count: int | None = Field(None, description="Use only the first N samples.")
    request_timeout_s: float = Field(600.0, description="Per-request deadline, from the moment it is sent.")
    idle_timeout_s: float | None = Field(
        120.0, description="An answer that started, then sent nothing for this long, fails; None: off."
    )
    max_connections: int = Field(1024, description="Connections per client process, at most.")
    http: HttpSettings = Field(
        default_factory=HttpSettings, description="Headers, proxies, TLS (no secrets)."
    )
    request_profile: RequestProfile = Field(VLLM, description="The request fields the server accepts.")
    endpoints: list[str] = Field(
        default_factory=list,
        description="Every endpoint's URL (no credentials) when the run has more than one; base_url is "
        "the first. Empty: base_url alone.",
    )
    dispatch: DispatchPolicy = Field("least-outstanding", description="How a query picks its endpoint.")

    @property
    def token_source(self) -> TokenSource:
        """token_ids or usage: how this run counts output tokens (client.payload.token_source)."""
        return token_source(self.request_profile, self.generation)

    def load_prompts(self) -> list[list[int] | str]:
        """What is sent per sample index: token ids (completions) or the input text (chat)."""
        ds = load_dataset(self.dataset, Path(self.dataset_path))
        n = min(len(ds), self.sample_count) if self.sample_count else len(ds)
        prompts: list[list[int] | str] = []
        prompts.extend(ds.tok_inputs[:n] if self.generation.api == "completions" else ds.inputs[:n])
        return prompts
