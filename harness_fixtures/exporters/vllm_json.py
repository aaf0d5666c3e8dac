"""``result.json``: a test's result under the field names of ``vllm bench serve --save-result``, so
tools made for vLLM's benchmark files read it.

Every number is a result.yaml value (docs/exports.md has the table): LoadGen's where LoadGen measured
it (throughputs, TTFT, TPOT, end-to-end latency), the client's ``requests:`` statistics otherwise
(ITL, standard deviations, token totals, goodput). Percentiles use LoadGen's definition, not numpy's
interpolation, and only the ones LoadGen reports (p90, p99) plus the median are written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _get(data: Any, *path: str) -> Any:
    for key in path:
        data = data.get(key) if isinstance(data, Mapping) else None
    return data


def _stat(result: Mapping[str, Any], name: str, loadgen: str | None, client: str) -> dict[str, Any]:
    """mean/median/std/p90/p99 of one quantity: LoadGen's values when it has them, else the client's."""
    lg = _get(result, loadgen) if loadgen else None
    cl = _get(result, "requests", client) or {}
    src = lg if isinstance(lg, Mapping) and lg.get("p50") is not None else cl
    return {
        f"mean_{name}_ms": src.get("mean"),
        f"median_{name}_ms": src.get("p50"),
        f"std_{name}_ms": cl.get("std"),  # LoadGen reports no standard deviation
        f"p90_{name}_ms": src.get("p90"),
        f"p99_{name}_ms": src.get("p99"),
    }


def vllm_result(result: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The result.json document of one test."""
    md = metadata or {}
    engine = md.get("engine") or {}
    q = result.get("queries") or {}
    req = result.get("requests") or {}
    samples_per_s = result.get("samples_per_s")
    completed = q.get("completed")
    inputs = req.get("input_tokens_total")
    rate = result.get("rate") or {}
    settings = result.get("settings") or {}
    limits = result.get("latency_limits") or {}
    return {
        "date": md.get("finished_utc"),
        "backend": engine.get("kind"),
        "endpoint_type": engine.get("kind"),
        "label": result.get("test_id"),
        "model_id": (md.get("case") or {}).get("engine", {}).get("model") or engine.get("served_model"),
        "served_model_name": engine.get("served_model"),
        "num_prompts": q.get("issued"),
        "request_rate": (
            settings.get("target_qps") if result.get("scenario") in ("Server", "Interactive") else "inf"
        ),
        "max_concurrency": None,
        # LoadGen's rate over the completed queries: duration = completed / samples per second
        "duration": round(completed / samples_per_s, 6)
        if completed and samples_per_s
        else result.get("duration_s"),
        "completed": completed,
        "failed": q.get("failed"),
        "total_input_tokens": inputs,
        "total_output_tokens": q.get("output_tokens"),
        "request_throughput": samples_per_s,
        "request_goodput": req.get("request_goodput"),
        "output_throughput": result.get("tokens_per_s"),
        "total_token_throughput": req.get("total_token_throughput"),
        **_stat(result, "ttft", "ttft_ms", "ttft_ms"),
        **_stat(result, "tpot", "tpot_ms", "tpot_ms"),
        **_stat(result, "itl", None, "itl_ms"),
        **_stat(result, "e2el", "latency_ms", "e2el_ms"),
        "goodput_slo_ms": {
            k: v for k, v in (("ttft", limits.get("ttft_ms")), ("tpot", limits.get("tpot_ms"))) if v
        },
        "harness": {
            "scenario": result.get("scenario"),
            "mode": result.get("mode"),
            "status": result.get("status"),
            "loadgen_model": result.get("loadgen_model"),
            "rate": {
                "setting": rate.get("setting"),
                "value": rate.get("value"),
                "source": rate.get("source"),
            },
        },
    }
