"""The one description of a LoadGen run, written as run_spec.json for the child process (no secrets)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..client.spec import ClientSpec
from ..config import LoadGenScenario


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    test_id: str
    out_dir: str
    user_conf: str
    loadgen_model: str
    loadgen_scenario: LoadGenScenario
    # find_peak: LoadGen's own FindPeakPerformance mode (Server), for tools/bench_capacity.py's comparison.
    mode: Literal["performance", "accuracy", "find_peak"] = "performance"
    client: ClientSpec
    performance_sample_count: int | None = Field(None, description="QSL performance sample count.")
    target_qps: float | None = Field(
        None, description="Server target / Offline expected QPS; SingleStream: 1 / expected latency."
    )
    min_duration_ms: int | None = None
    min_query_count: int | None = None
    network_sut: bool = Field(
        False,
        description="The endpoints are servers elsewhere (a Network SUT): LoadGen gets a Query Dispatch "
        "Library whose name is 'Network SUT' and its nodes' names, each asked over the network.",
    )
    test_timeout_s: float = Field(7200.0, description="The parent stops the child after this long.")
    warmup: bool = True
    metrics_paths: list[str] = Field(
        default_factory=lambda: ["/metrics"], description="Where the engine serves Prometheus text."
    )
    client_workers: int | None = Field(None, description="None: auto (client.sizing); 1: in-process.")
    single_stream_latency_from_warmup: bool = Field(
        False, description="Set SingleStream's expected latency from the warm-up request's."
    )
    t0_monotonic_ns: int | None = Field(None, description="The test's t0, shared with the collectors.")
