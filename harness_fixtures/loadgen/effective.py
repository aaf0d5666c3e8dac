"""LoadGen's effective settings for a model and scenario, before any run: what mlperf.conf plus the
user's user.conf give. Read in a short child process, because only the first ``FromConfig`` of a
process loads mlperf.conf (docs/loadgen.md)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_READER = """
import json, sys
import mlperf_loadgen as lg
path, model, scenario = sys.argv[1:4]
s = lg.TestSettings()
rc = s.FromConfig(path, model, scenario, 1)
server = scenario == "Server"
pct = s.server_target_latency_percentile if server else s.single_stream_target_latency_percentile
print(json.dumps({
    "rc": rc,
    "min_duration_ms": s.min_duration_ms,
    "min_query_count": s.min_query_count,
    "target_latency_percentile": pct,
    "ttft_latency_ms": s.ttft_latency / 1e6,
    "tpot_latency_ms": s.tpot_latency / 1e6,
    "server_target_qps": s.server_target_qps,
}))
"""


class EffectiveSettingsError(RuntimeError):
    """LoadGen could not read the user.conf; the message says which and why."""


@dataclass(frozen=True)
class EffectiveSettings:
    min_duration_ms: int
    min_query_count: int
    target_latency_percentile: float
    ttft_latency_ms: float
    tpot_latency_ms: float


@functools.lru_cache(maxsize=64)
def effective_settings(user_conf: Path, model: str, scenario: str) -> EffectiveSettings:
    """mlperf.conf + ``user_conf`` as LoadGen reads them for ``model`` and ``scenario``."""
    proc = subprocess.run(
        [sys.executable, "-c", _READER, str(user_conf), model, scenario],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise EffectiveSettingsError(
            f"LoadGen could not read {str(user_conf)!r} for {model}/{scenario}: {proc.stderr.strip()[-300:]}"
        )
    data = json.loads(lines[-1])
    if data["rc"] != 0:
        raise EffectiveSettingsError(
            f"LoadGen could not load user.conf {str(user_conf)!r} (code {data['rc']})"
        )
    return EffectiveSettings(
        min_duration_ms=int(data["min_duration_ms"]),
        min_query_count=int(data["min_query_count"]),
        target_latency_percentile=float(data["target_latency_percentile"]),
        ttft_latency_ms=float(data["ttft_latency_ms"]),
        tpot_latency_ms=float(data["tpot_latency_ms"]),
    )
