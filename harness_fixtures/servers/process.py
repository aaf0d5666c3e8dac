"""Processes the suite owns: a free port, a log file, one way to stop a process group.

Every process the suite starts (engines, the LoadGen runner) runs in its own session, so its group
id is its pid; stopping it is SIGTERM to that group, a grace period, then SIGKILL to the group, which
also sweeps children that outlived their leader. Only groups we created are signalled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
from collections import deque
from pathlib import Path

log = logging.getLogger("harness_fixtures.servers")
LOG_TAIL_LINES = 50


class ProcessStartError(OSError):
    """The executable could not be started; the message names it and why."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def log_tail(path: Path | None, n: int = LOG_TAIL_LINES) -> str:
    if path is None or not path.is_file():
        return "(no engine log)"
    with path.open(errors="replace") as fh:
        return "".join(deque(fh, maxlen=n)).rstrip() or "(engine log is empty)"


def start_process(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a process in its own group with stdout+stderr to a file (never an undrained PIPE)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as fh:
        try:
            return subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group, so teardown reaches its children
            )
        except FileNotFoundError as exc:
            raise ProcessStartError(f"cannot start {argv[0]!r}: {exc.strerror}") from None
        except PermissionError as exc:
            raise ProcessStartError(f"cannot execute {argv[0]!r}: {exc.strerror}") from None


def stop_process_group(proc: subprocess.Popen[bytes] | None, grace_s: float = 20.0) -> int | None:
    """SIGTERM the process's group, wait up to ``grace_s``, then SIGKILL the group; return the exit code."""
    if proc is None:
        return None
    pgid = proc.pid  # start_new_session made the child its own group leader
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored SIGTERM for %.0f s; sending SIGKILL", proc.pid, grace_s)
    # Children (e.g. vLLM's engine core, client workers) can outlive the leader: always sweep the group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    return proc.returncode
