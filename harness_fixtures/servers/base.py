"""Engines as the suite sees them: an Endpoint, the Launcher protocol, readiness and argv building.

Process ownership (ports, logs, group teardown) is in :mod:`harness_fixtures.servers.process`.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import requests

from .process import LOG_TAIL_LINES, log_tail

log = logging.getLogger("harness_fixtures.servers")


class EngineError(RuntimeError):
    """The engine could not start, died, or answered wrongly; the message carries its log tail."""


@dataclass
class Endpoint:
    """A server the benchmark talks to: started by us (pid, log) or already running (external)."""

    kind: str
    base_url: str
    served_model: str
    argv: list[str] = field(default_factory=list)
    log_path: Path | None = None
    pid: int | None = None
    version: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.log_path, n)


class Launcher(Protocol):
    """Starts one engine kind. ``start`` returns once the engine is healthy; ``stop`` is idempotent."""

    kind: str

    def start(self, ctx: LaunchContext) -> Endpoint: ...

    def stop(self, endpoint: Endpoint) -> None: ...


@dataclass(frozen=True)
class LaunchContext:
    """What a launcher needs besides the case: where to write, env, deadlines, auth."""

    case: Any  # BenchmarkCase; Any keeps this module free of config imports for plugin authors
    run_dir: Path
    api_key: str | None = field(default=None, repr=False)
    server_url: str | None = None


def wait_healthy(
    proc: subprocess.Popen[bytes] | None,
    base_url: str,
    served_model: str,
    log_path: Path | None,
    timeout_s: float,
    headers: dict[str, str] | None = None,
) -> None:
    """Poll /health then /v1/models until ready; fail at once if the process exits."""
    deadline = time.monotonic() + timeout_s
    stage = "/health"
    last = ""
    while True:
        if proc is not None and proc.poll() is not None:
            raise EngineError(
                f"engine exited with code {proc.returncode} during start-up (waiting for {stage}); "
                f"last log lines ({log_path}):\n{log_tail(log_path)}"
            )
        try:
            if stage == "/health":
                r = requests.get(base_url + "/health", timeout=2, headers=headers)
                if r.status_code == 200:
                    stage = "/v1/models"
                    continue
                last = f"/health answered {r.status_code}"
            else:
                r = requests.get(base_url + "/v1/models", timeout=5, headers=headers)
                if r.status_code == 200:
                    names = _model_ids(r, base_url)
                    if served_model in names:
                        return
                    raise EngineError(
                        f"server at {base_url} serves {names}, not {served_model!r}; set "
                        "engine.served_model_name in the model YAML"
                    )
                last = f"/v1/models answered {r.status_code}"
        except requests.RequestException as exc:
            last = f"{type(exc).__name__}"
        if time.monotonic() > deadline:
            raise EngineError(
                f"engine not healthy after {timeout_s:g} s (last: {last}); raise engine.start_timeout_s "
                f"if it is just slow; last log lines ({log_path}):\n{log_tail(log_path)}"
            )
        time.sleep(0.25)


def _model_ids(r: requests.Response, base_url: str) -> list[Any]:
    """The ids of a ``/v1/models`` answer; EngineError when it is not an OpenAI model list."""
    try:
        body = r.json()
    except ValueError:
        body = None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not all(isinstance(m, dict) for m in data):
        raise EngineError(
            f"{base_url}/v1/models answered {r.text[:200]!r}, not an OpenAI model list "
            '({"data": [{"id": ...}, ...]}); is this an OpenAI-compatible server, and the right URL?'
        )
    return [m.get("id") for m in data]


def fetch_version(base_url: str, headers: dict[str, str] | None = None) -> str | None:
    try:
        r = requests.get(base_url + "/version", timeout=3, headers=headers)
        if r.status_code == 200:
            v = r.json().get("version")
            return str(v) if v is not None else None
    except (requests.RequestException, ValueError):
        pass
    return None


def args_to_argv(args: dict[str, Any] | list[str], underscores: bool = False) -> list[str]:
    """YAML args → argv: {key: value} → --key value; true → --key; false/None → omitted.

    Keys are written as given; ``tensor_parallel_size`` becomes ``--tensor-parallel-size`` unless
    the engine spells its flags with underscores (trtllm-serve: ``--tp_size``).
    """
    if isinstance(args, list):
        return [str(a) for a in args]
    argv: list[str] = []
    for key, value in args.items():
        flag = key if key.startswith("-") else "--" + (key if underscores else key.replace("_", "-"))
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv
