"""``python -m harness_fixtures.sim``: start the simulator like an engine (exit 2 on bad settings)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import ssl
import sys
import time
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness_fixtures.sim.settings import SimSettings, SimSettingsError

PROG = "python -m harness_fixtures.sim"


def _is_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return bool in typing.get_args(annotation)
    return False


def build_parser() -> argparse.ArgumentParser:
    """Server flags (host, port, name, config) plus one ``--dashed-name`` flag per SimSettings field."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="OpenAI-compatible LLM server simulator with vLLM's streaming shape and metrics.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Interface to bind (default: 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8000, help="Port to bind (default: 8000).")
    parser.add_argument("--served-model-name", default="sim", help="Model name to answer to (default: sim).")
    parser.add_argument(
        "--config", type=Path, default=None, help="JSON file of SimSettings fields; flags override it."
    )
    group = parser.add_argument_group("simulator settings (override --config)")
    for name, field in SimSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} (default: {field.default!r})"
        if _is_bool(field.annotation):
            group.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            # Values go to pydantic as strings so its coercion and error messages apply unchanged.
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar="VALUE", help=help_text)
    return parser


def _fail(message: str, code: int) -> typing.NoReturn:
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


async def _serve(settings: SimSettings, host: str, port: int, served_model_name: str) -> None:
    from aiohttp import web

    from harness_fixtures.sim.server import build_app

    app = build_app(settings, served_model_name)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=75.0)
    await runner.setup()
    tls = _tls_context(settings)
    # A short shutdown_timeout: hung requests (hang_after_requests) must not hold SIGTERM up.
    site = web.TCPSite(
        runner, host, port, backlog=4096, shutdown_timeout=1.0, reuse_address=True, ssl_context=tls
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        _fail(f"cannot listen on {host}:{port}: {exc.strerror}", 1)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT,) if settings.ignore_sigterm else (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    scheme = "https" if tls else "http"
    print(
        f"{PROG}: serving {served_model_name!r} on {scheme}://{host}:{port} ({type(loop).__module__})",
        flush=True,
    )
    # What a real engine would run on (the suite's --harness-gpus assignment); also at GET /sim/env.
    print(f"{PROG}: CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}", flush=True)
    gc.freeze()  # startup objects never die: keep them out of the collector's generations
    await stop.wait()
    await runner.cleanup()


def _tls_context(settings: SimSettings) -> ssl.SSLContext | None:
    if settings.tls_certfile is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(settings.tls_certfile, settings.tls_keyfile)
        if settings.tls_client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(settings.tls_client_ca)
    except (OSError, ssl.SSLError) as exc:
        _fail(f"cannot load the TLS files: {exc}", 2)
    return ctx


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {name: getattr(args, name) for name in SimSettings.model_fields if hasattr(args, name)}
    try:
        settings = SimSettings.load(args.config, overrides)
    except SimSettingsError as exc:
        _fail(str(exc), 2)
    if settings.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if settings.fail_start:
        _fail("fail_start is set: refusing to start (simulated engine start failure)", 3)
    if settings.startup_delay_s:
        time.sleep(settings.startup_delay_s)  # an engine loading weights: nothing listens yet

    loop: asyncio.AbstractEventLoop | None = None
    if settings.uvloop:
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:
            loop = None
    loop = loop or asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve(settings, args.host, args.port, args.served_model_name))
    except SimSettingsError as exc:  # responses_file content is checked when the app is built
        _fail(str(exc), 2)
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
