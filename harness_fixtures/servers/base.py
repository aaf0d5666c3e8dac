"""Engines as the suite sees them: an Endpoint, the Launcher protocol, readiness and argv building.

Process ownership (ports, logs, group teardown) is in :mod:`harness_fixtures.servers.process`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..client.errors import CertificateError, HttpError
from ..client.httpconfig import HttpConfig, HttpConfigError, HttpSettings, ServerUrl, check_header_value
from ..client.payload import VLLM, RequestProfile, model_ids
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
    # The parsed URL with its user:password, when it had one (base_url never shows credentials).
    server: ServerUrl | None = field(default=None, repr=False)
    request_profile: RequestProfile = VLLM  # the request fields this server accepts
    # --harness-gpus: the GPUs this engine was given ({index, uuid} each) and the environment that
    # gave them (CUDA_VISIBLE_DEVICES); empty without the option.
    gpus: list[dict[str, Any]] = field(default_factory=list)
    gpu_env: dict[str, str] = field(default_factory=dict)

    def server_url(self) -> ServerUrl:
        return self.server or ServerUrl.parse(self.base_url)

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
    http: HttpConfig | None = field(default=None, repr=False)  # the session's headers, proxies, TLS
    # --harness-gpus: CUDA_VISIBLE_DEVICES (and CUDA_DEVICE_ORDER) of the GPUs locked for this engine;
    # a launcher puts it over everything else in the engine's environment. Empty: no assignment.
    gpu_env: dict[str, str] = field(default_factory=dict)
    # Which of the case's engines this is (engine.replicas, or the n-th URL): 0 for the first. A
    # launcher that gives each replica its own GPUs or port range keys them on it.
    replica: int = 0

    def http_config(self) -> HttpConfig:
        if self.http is not None:
            return self.http
        # No session configuration (a launcher used on its own): the API key alone.
        return _config({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})


def _config(http: HttpConfig | Mapping[str, str] | None) -> HttpConfig:
    """The HTTP configuration to use; a bare header mapping (older callers) becomes one."""
    if isinstance(http, HttpConfig):
        return http
    headers = dict(http or {})
    for name, value in headers.items():
        check_header_value(value, f"header {name}", show_value=False)
    return HttpConfig(HttpSettings(), headers, os.environ)


def wait_healthy(
    proc: subprocess.Popen[bytes] | None,
    base_url: str | ServerUrl,
    served_model: str,
    log_path: Path | None,
    timeout_s: float,
    http: HttpConfig | Mapping[str, str] | None = None,
    waiting_for: str = "",
) -> None:
    """Poll /health then /v1/models until ready; fail at once if the process exits.

    :param http: the session's HTTP configuration (headers, credentials, proxies, TLS), the same one
        the streaming client and the /metrics scraper use.
    :param waiting_for: what else readiness depends on (a multi-node engine's other nodes), said
        when the deadline passes.
    """
    try:
        config = _config(http)
        url = base_url if isinstance(base_url, ServerUrl) else ServerUrl.parse(base_url)
    except HttpConfigError as exc:
        raise EngineError(str(exc)) from None
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
                r = config.get(url, "/health", timeout_s=2)
                if r.status == 200:
                    stage = "/v1/models"
                    continue
                last = f"{url.url('/health')} answered HTTP {r.status}{_auth_hint(r.status)}"
                if r.status in _DEFINITIVE:
                    raise EngineError(f"engine not usable: {last}")
            else:
                r = config.get(url, "/v1/models", timeout_s=5)
                if r.status == 200:
                    names = model_ids(r.text)
                    if names is None:
                        raise EngineError(
                            f"{url.url('/v1/models')} answered {r.text[:200]!r}, not an OpenAI model list "
                            '({"data": [{"id": ...}]}); is this an OpenAI-compatible server?'
                        )
                    if served_model in names:
                        return
                    raise EngineError(
                        f"server at {url.display} serves {names}, not {served_model!r}; set "
                        "engine.served_model_name in the model YAML"
                    )
                last = f"{url.url('/v1/models')} answered HTTP {r.status}{_auth_hint(r.status)}"
                if r.status in _DEFINITIVE:
                    raise EngineError(f"engine not usable: {last}")
        except CertificateError as exc:
            raise EngineError(str(exc)) from None  # a certificate does not become trusted by waiting
        except HttpError as exc:
            last = str(exc)
        except HttpConfigError as exc:
            raise EngineError(str(exc)) from None
        if time.monotonic() > deadline:
            raise EngineError(
                f"engine not healthy after {timeout_s:g} s (last: {last}); "
                + (f"{waiting_for}; " if waiting_for else "")
                + f"raise engine.start_timeout_s if it is just slow; last log lines ({log_path}):\n"
                f"{log_tail(log_path)}"
            )
        time.sleep(0.25)


# Answers that waiting cannot change: wrong or missing credentials (server or proxy).
_DEFINITIVE = (401, 403, 407)


def _auth_hint(status: int) -> str:
    if status in (401, 403):
        return (
            " (credentials missing or refused: --harness-api-key-env, user:password@ in the URL, or "
            "--harness-header NAME=env:VAR)"
        )
    if status == 407:
        return " (the proxy wants credentials: user:password@ in the HTTPS_PROXY / HTTP_PROXY URL)"
    return ""


def fetch_version(
    base_url: str | ServerUrl, http: HttpConfig | Mapping[str, str] | None = None
) -> str | None:
    try:
        url = base_url if isinstance(base_url, ServerUrl) else ServerUrl.parse(base_url)
        r = _config(http).get(url, "/version", timeout_s=3)
        if r.status == 200:
            v = json.loads(r.text).get("version")
            return str(v) if v is not None else None
    except (HttpError, HttpConfigError, ValueError, AttributeError):
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
