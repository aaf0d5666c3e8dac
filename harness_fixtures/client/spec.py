"""What the streaming client needs for a run, serializable (no secrets): the runner hands it to
its in-process client and, as JSON, to each fan-out worker process."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..config import DatasetSpec, GenerationSpec
from ..dataset import load_dataset


class ClientSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    base_url: str
    served_model: str
    generation: GenerationSpec
    dataset: DatasetSpec
    dataset_path: str
    sample_count: int | None = Field(None, description="Use only the first N samples.")
    request_timeout_s: float = 600.0
    max_connections: int = 1024
    api_key_env: str | None = Field(
        None, description="The NAME of the variable; its value never touches disk."
    )

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def load_prompts(self) -> list[list[int] | str]:
        """What is sent per sample index: token ids (completions) or the input text (chat)."""
        ds = load_dataset(self.dataset, Path(self.dataset_path))
        n = min(len(ds), self.sample_count) if self.sample_count else len(ds)
        prompts: list[list[int] | str] = []
        prompts.extend(ds.tok_inputs[:n] if self.generation.api == "completions" else ds.inputs[:n])
        return prompts
