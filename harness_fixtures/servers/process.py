"""Processes the suite owns: a free port, a log file, one way to stop a process group, and what makes
them die with pytest however pytest ends.

Every process the suite starts (engines, the LoadGen runner) runs in its own session, so its group
id is its pid; stopping it is SIGTERM to that group, a grace period, then SIGKILL to the group, which
also sweeps children that outlived their leader. Only groups we created are signalled.

pytest can end without running any teardown (SIGKILL by the OOM killer or a CI timeout). Two things
cover that: on Linux each process asks the kernel for SIGTERM when the thread that started it exits
(``PR_SET_PDEATHSIG``; the suite starts them from the main thread, whose end is the process's), and
each is recorded in a pidfile in the session folder (``pids/<pytest pid>.json``: pid, start time and
a digest of the command line) that the next session reads to stop what is still running — only a
process whose pid, start time and command line all match the record, whose recorder is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from .. import redaction
from ..results import write_text_atomic

log = logging.getLogger("harness_fixtures.servers")
LOG_TAIL_LINES = 50
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PIDFILE_DIR = "pids"
LEFTOVER_GRACE_S = 5.0


class ProcessStartError(OSError):
    """The executable could not be started, or not where asked; the message names it and why."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now: an IPv4 or IPv6 address of this machine, or a name of one."""
    try:
        infos = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind(address)
            return int(s.getsockname()[1])
    except OSError as exc:  # socket.gaierror included
        raise ProcessStartError(
            f"engine.host {host!r} cannot be bound here ({exc.strerror or exc}); set engine.host in the "
            "model YAML to an address of this machine (127.0.0.1, ::1, 0.0.0.0)"
        ) from None


def connect_host(host: str) -> str:
    """The host part of the URL the harness connects to for an engine bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def log_tail(path: Path | None, n: int = LOG_TAIL_LINES) -> str:
    if path is None or not path.is_file():
        return "(no engine log)"
    with path.open(errors="replace") as fh:
        return "".join(deque(fh, maxlen=n)).rstrip() or "(engine log is empty)"


def scrub_file(path: Path) -> None:
    """Rewrite a log file with every secret hidden, if it holds one (never raises)."""
    try:
        raw = path.read_text(errors="replace")
        clean = redaction.text(raw)
        if clean != raw:
            write_text_atomic(path, clean)
    except OSError as exc:
        log.warning("cannot scrub secrets from %s: %s", path, exc)


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking the kernel for SIGTERM when this thread ends (Linux), else None.

    Only from the main thread: the signal follows the thread that forked, and a worker thread's end
    is not the end of pytest. SIGTERM, not SIGKILL: an engine stops its own children on SIGTERM, and
    the LoadGen runner writes what it measured.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody will send the signal
            os._exit(1)

    return preexec


def start_process(
    argv: list[str],
    env: dict[str, str] | None,
    log_path: Path,
    role: str = "engine",
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start a process in its own group with stdout+stderr to a file (never an undrained PIPE); it
    dies with this process and is recorded in the session's pidfile until stopped."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as fh:
        try:
            proc = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,  # its own process group, so teardown reaches its children
                preexec_fn=_die_with_parent(),  # only prctl and getppid run between fork and exec
            )
        except FileNotFoundError as exc:
            raise ProcessStartError(f"cannot start {argv[0]!r}: {exc.strerror}") from None
        except PermissionError as exc:
            raise ProcessStartError(f"cannot execute {argv[0]!r}: {exc.strerror}") from None
    try:
        OWNED.add(proc, role)
    except BaseException:
        _kill_group(proc)
        raise
    return proc


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def stop_process_group(proc: subprocess.Popen[bytes] | None, grace_s: float = 20.0) -> int | None:
    """SIGTERM the process's group, wait up to ``grace_s``, then SIGKILL the group; return the exit code.

    A second Ctrl-C during the grace period ends the wait, not the stop: the group is killed first.
    """
    if proc is None:
        return None
    pgid = proc.pid  # start_new_session made the child its own group leader
    try:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("pid %d ignored SIGTERM for %.0f s; sending SIGKILL", proc.pid, grace_s)
    finally:
        # Children (e.g. vLLM's engine core, client workers) can outlive the leader: always sweep the group.
        _kill_group(proc)
        OWNED.remove(proc.pid)
    return proc.returncode


# -- the pidfile ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcessRecord:
    """Enough to tell, later, that a running process is this one and not a reuse of its pid."""

    pid: int
    create_time: float
    cmdline_sha256: str  # a digest: the command line may hold secrets
    exe: str
    role: str
    command: str  # redacted, for people

    @classmethod
    def of(cls, pid: int, role: str) -> ProcessRecord:
        p = psutil.Process(pid)
        with p.oneshot():
            cmdline, created, exe = p.cmdline(), p.create_time(), _exe(p)
        return cls(pid, created, _digest(cmdline), exe, role, " ".join(redaction.argv(cmdline))[:500])

    def matches(self, p: psutil.Process) -> bool:
        """The process this record describes: same pid, same start time (to 50 ms), and the same
        command line — or, for a process that retitled itself (vLLM's workers do), the same
        executable."""
        try:
            with p.oneshot():
                return (
                    p.pid == self.pid
                    and abs(p.create_time() - self.create_time) < 0.05
                    and (
                        _digest(p.cmdline()) == self.cmdline_sha256
                        or (bool(self.exe) and _exe(p) == self.exe)
                    )
                )
        except psutil.Error:
            return False


def _exe(p: psutil.Process) -> str:
    try:
        return p.exe()
    except psutil.Error:
        return ""


def _digest(cmdline: list[str]) -> str:
    return hashlib.sha256("\0".join(cmdline).encode()).hexdigest()


class _Owned:
    """This process's record of what it started, mirrored to its pidfile when one is set."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[int, ProcessRecord] = {}
        self._path: Path | None = None
        self._owner: ProcessRecord | None = None

    def track_in(self, session_dir: Path | None) -> None:
        """Keep the pidfile in ``session_dir/pids/`` (None: keep none, as tools do)."""
        with self._lock:
            self._path = None if session_dir is None else session_dir / PIDFILE_DIR / f"{os.getpid()}.json"
            self._owner = ProcessRecord.of(os.getpid(), "pytest") if session_dir is not None else None
            self._write()

    def add(self, proc: subprocess.Popen[bytes], role: str) -> None:
        try:
            record = ProcessRecord.of(proc.pid, role)
        except psutil.Error:
            return  # it already exited: nothing to leave behind
        with self._lock:
            self._records[proc.pid] = record
            self._write()

    def remove(self, pid: int) -> None:
        with self._lock:
            if self._records.pop(pid, None) is not None:
                self._write()

    def pids(self) -> list[int]:
        with self._lock:
            return list(self._records)

    def _write(self) -> None:
        if self._path is None or self._owner is None:
            return
        try:
            if not self._records:
                self._path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self._path.parent.rmdir()  # only when empty
                return
            self._path.parent.mkdir(parents=True, exist_ok=True)
            doc = {
                "about": "processes a harness-fixtures session started and has not stopped yet; the "
                "next session stops those still running once this one's pytest is gone",
                "owner": asdict(self._owner),
                "updated_utc": dt.datetime.now(dt.timezone.utc).isoformat(),
                "processes": [asdict(r) for r in self._records.values()],
            }
            write_text_atomic(self._path, json.dumps(doc, indent=1))
        except OSError as exc:
            log.warning("cannot update the pidfile %s: %s", self._path, exc)


OWNED = _Owned()


def _alive(record: dict[str, Any]) -> psutil.Process | None:
    try:
        r = ProcessRecord(**record)
        p = psutil.Process(r.pid)
    except (TypeError, psutil.Error):
        return None
    return p if r.matches(p) else None


def stop_leftovers(output_root: Path, grace_s: float = LEFTOVER_GRACE_S) -> list[str]:
    """Stop processes earlier sessions under ``output_root`` left running (their pytest was killed).

    Reads every ``<session>/pids/*.json`` whose recorder is gone; a recorded process is stopped (its
    group: SIGTERM, ``grace_s``, SIGKILL) only when its pid, start time and command line all match.
    Returns one line per pidfile that named a process, saying what was done; never raises.
    """
    messages: list[str] = []
    for pidfile in sorted(output_root.glob(f"*/{PIDFILE_DIR}/*.json")):
        try:
            doc = json.loads(pidfile.read_text())
            owner, records = doc["owner"], list(doc["processes"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            messages.append(f"unreadable pidfile {pidfile} left alone ({exc})")
            continue
        if _alive(owner) is not None:
            continue  # a session still running (e.g. another terminal): its processes are its own
        stopped: list[str] = []
        kept: list[dict[str, Any]] = []
        for record in records:
            p = _alive(record)
            if p is None:
                continue  # exited, or the pid now belongs to another process: not ours to touch
            what = f"pid {p.pid} ({record.get('role')}: {record.get('command', '')[:120]})"
            if _stop_group(p, grace_s):
                stopped.append(what)
            else:
                kept.append(record)
                messages.append(
                    f"cannot stop leftover {what} of {pidfile.parent.parent.name}; stop it by hand"
                )
        if stopped:
            messages.append(
                f"stopped {len(stopped)} process(es) left running by session {pidfile.parent.parent.name} "
                f"(its pytest ended without stopping them; {pidfile}): " + "; ".join(stopped)
            )
        try:
            if kept:
                write_text_atomic(pidfile, json.dumps({**doc, "processes": kept}, indent=1))
            else:
                pidfile.unlink()
                with contextlib.suppress(OSError):
                    pidfile.parent.rmdir()
        except OSError as exc:
            messages.append(f"cannot update {pidfile}: {exc}")
    return messages


def _stop_group(p: psutil.Process, grace_s: float) -> bool:
    """SIGTERM, wait, SIGKILL: to the group when ``p`` leads its own (as everything we start does)."""
    try:
        group = os.getpgid(p.pid) == p.pid
    except ProcessLookupError:
        return True

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
            if group:
                os.killpg(p.pid, sig)
            else:
                p.send_signal(sig)

    try:
        send(signal.SIGTERM)
        _wait_dead(p, grace_s)
        send(signal.SIGKILL)  # always: it also sweeps the group's other members
    except (PermissionError, psutil.AccessDenied):
        return False
    return _wait_dead(p, 5.0)


def _wait_dead(p: psutil.Process, timeout_s: float) -> bool:
    """Poll until ``p`` is gone or a zombie (its reaper is not us); True when it is."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
