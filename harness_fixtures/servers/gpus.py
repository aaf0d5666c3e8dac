"""GPU sets for engines (``--harness-gpus``): which GPUs the suite may use, and a lock per GPU.

Each engine the suite starts gets ``engine.gpus`` GPUs of the pool as its ``CUDA_VISIBLE_DEVICES``.
Allocation is a lock on the machine, not in one process: one file per GPU in a well-known folder
(``$HARNESS_GPU_LOCK_DIR``, else ``<tmp>/harness-fixtures-gpus``), locked with ``flock``. xdist
workers and concurrent sessions of any user therefore never share a GPU; the lock lives as long as
the engine, and the kernel drops it when the holding process dies, so a killed session leaves no
stale lock behind (a pidfile or a lock server would). The folder must be on a local file system:
``flock`` on NFS is not reliable.

A GPU is locked under its UUID when NVML (or the fake inventory, ``HARNESS_FAKE_GPUS``) knows it,
so ``--harness-gpus 0`` in one session and ``--harness-gpus GPU-…`` in another still exclude each
other; without NVML the index as given is the lock's name.

A MIG instance is locked under its own UUID, exclusively, and its parent GPU's lock is held shared
at the same time: two sessions on two MIG instances of one GPU run side by side, while a session
that asks for the whole GPU (an exclusive lock on the parent) waits for both, and the reverse.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..config import BenchmarkCase
from ..metrics.nvml import FAKE_GPUS_ENV, GpuDevice, inventory

log = logging.getLogger("harness_fixtures.servers")

LOCK_DIR_ENV = "HARNESS_GPU_LOCK_DIR"
POLL_S = 0.2  # between attempts while every free set is taken: cheap (one flock per GPU)
WAIT_MESSAGE_EVERY_S = 30.0  # a waiting test says so again, so a CI log shows it is not hung


class GpuError(RuntimeError):
    """The GPUs asked for do not exist, or could not be had in time; the message says which and why."""


def lock_dir() -> Path:
    """Where the per-GPU lock files live: one folder for every session on this machine."""
    configured = os.environ.get(LOCK_DIR_ENV)
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "harness-fixtures-gpus"


@dataclass(frozen=True)
class Gpu:
    """One GPU of the pool: its NVML index (nvidia-smi's number) and UUID, where known."""

    index: int | None
    uuid: str | None
    name: str | None = None
    parent_uuid: str | None = None  # a MIG instance: the UUID of the GPU it is a slice of

    @property
    def key(self) -> str:
        """The lock's name: the UUID when known (the same GPU whatever the option said)."""
        return _lock_name(self.uuid.lower() if self.uuid else f"index-{self.index}")

    @property
    def parent_key(self) -> str | None:
        """A MIG instance: the lock name of its GPU, held shared while the instance is held."""
        return _lock_name(self.parent_uuid.lower()) if self.parent_uuid else None

    @property
    def visible(self) -> str:
        """The ``CUDA_VISIBLE_DEVICES`` entry: a UUID means one GPU whatever CUDA's device order."""
        return self.uuid if self.uuid else str(self.index)

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "uuid": self.uuid}
        if self.name:
            out["name"] = self.name
        if self.parent_uuid:
            out["parent_uuid"] = self.parent_uuid
        return out


def _lock_name(raw: str) -> str:
    return re.sub(r"[^a-z0-9._-]", "_", raw)


def _match(devices: Sequence[GpuDevice], entry: str) -> GpuDevice | None:
    if entry.isdigit():
        return next((d for d in devices if d.nvml_index == int(entry)), None)
    want = entry.lower()
    for d in devices:
        if (d.uuid and d.uuid.lower() == want) or want in (m.lower() for m in d.mig_uuids):
            return d
    return None


def resolve_pool(entries: Sequence[str]) -> list[Gpu]:
    """The GPUs ``--harness-gpus`` names (``("auto",)``: every GPU in the inventory).

    Indices are NVML's (as nvidia-smi numbers them). Without NVML, indices and UUIDs are taken as
    given (CUDA decides what they mean); with it, each must name a GPU it sees.

    :raises GpuError: ``auto`` without any GPU, or an entry that names none; the message has the fix.
    """
    option = "--harness-gpus"
    try:
        devices, why_none = inventory()
    except ValueError as exc:  # a bad HARNESS_FAKE_GPUS
        raise GpuError(str(exc)) from None
    if tuple(entries) == ("auto",):
        if not devices:
            raise GpuError(
                f"{option} auto: no GPU found ({why_none}); pass a list such as {option} 0,1 or leave "
                f"{option} unset (tests can set {FAKE_GPUS_ENV}=N for N fake GPUs)"
            )
        return [Gpu(d.nvml_index, d.uuid, d.name) for d in sorted(devices, key=lambda d: d.nvml_index)]
    if not devices:
        log.info("%s: NVML unavailable (%s); using %s as given", option, why_none, ",".join(entries))
        return [Gpu(int(e), None) if e.isdigit() else Gpu(None, e) for e in entries]
    pool: list[Gpu] = []
    for entry in entries:
        found = _match(devices, entry)
        if found is None:
            seen = ", ".join(f"{d.nvml_index}: {d.uuid}" for d in devices)
            raise GpuError(
                f"{option}: {entry!r} names no GPU on this machine (NVML sees {seen}); pass indices or "
                f"UUIDs from that list, or 'auto'"
            )
        mig = entry.upper().startswith("MIG-")
        gpu = Gpu(
            found.nvml_index,
            entry if mig else found.uuid,
            found.name,
            parent_uuid=found.uuid if mig else None,
        )
        if any(g.key == gpu.key for g in pool):
            raise GpuError(f"{option}: {entry!r} is a GPU already in the list; name each GPU once")
        clash = next((g for g in pool if gpu.key in (g.parent_key, g.key) or g.key == gpu.parent_key), None)
        if clash is not None:
            raise GpuError(
                f"{option}: {entry!r} and {clash.uuid or clash.index!r} are a GPU and a MIG instance on it; "
                "an engine given the whole GPU would share it with one on the instance. Name either the "
                "GPU or its MIG instances"
            )
        pool.append(gpu)
    return pool


@dataclass
class GpuLease:
    """GPUs held for one engine; :meth:`release` (idempotent) unlocks them."""

    gpus: tuple[Gpu, ...]
    _files: list[IO[str]] = field(default_factory=list, repr=False)  # a MIG instance: its own and its GPU's

    def env(self) -> dict[str, str]:
        """The engine's ``CUDA_VISIBLE_DEVICES`` (and, for bare indices, PCI bus order, so that
        index N is the GPU nvidia-smi calls N)."""
        out = {"CUDA_VISIBLE_DEVICES": ",".join(g.visible for g in self.gpus)}
        if any(g.uuid is None for g in self.gpus):
            out["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        return out

    def records(self) -> list[dict[str, Any]]:
        return [g.record() for g in self.gpus]

    def release(self) -> None:
        files, self._files = self._files, []
        for f in files:
            with contextlib.suppress(OSError):
                f.truncate(0)  # the note goes while the lock is still held: a note means a holder
            with contextlib.suppress(OSError):
                f.close()  # closing the only descriptor drops the flock

    @property
    def held(self) -> bool:
        return bool(self._files)


def _try_lock(folder: Path, gpu: Gpu) -> list[IO[str]] | None:
    """The GPU's lock (exclusive) and, for a MIG instance, its parent GPU's (shared), or None when
    either is taken; the first file is the one that carries the holder's note."""
    files: list[IO[str]] = []
    try:
        if gpu.parent_key is not None:
            parent = _flock(folder / f"gpu-{gpu.parent_key}.lock", fcntl.LOCK_SH)
            if parent is None:
                return None
            files.append(parent)
        own = _flock(folder / f"gpu-{gpu.key}.lock", fcntl.LOCK_EX)
        if own is None:
            for f in files:
                f.close()
            return None
    except BaseException:
        for f in files:
            f.close()
        raise
    return [own, *files]


def _flock(path: Path, how: int) -> IO[str] | None:
    # Opened without O_TRUNC: the holder's note stays readable to those who wait for the lock.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f.fileno(), how | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    except BaseException:
        f.close()
        raise
    return f


def _holder(folder: Path, gpu: Gpu) -> str:
    """Who holds a GPU, from the note its holder wrote into the lock file (best effort). A MIG
    instance may be taken through its GPU (someone holds the whole GPU); a whole GPU may be taken
    by engines on its MIG instances, which write no note on it."""
    for key in (gpu.key, gpu.parent_key):
        if key is None:
            continue
        try:
            note = json.loads((folder / f"gpu-{key}.lock").read_text() or "{}")
        except (OSError, ValueError):
            continue
        if isinstance(note, dict) and note:
            return f"{note.get('owner', '?')} (pid {note.get('pid', '?')} on {note.get('host', '?')})"
    return "engines on its MIG instances, or ?" if gpu.parent_key is None else "?"


def _name(gpu: Gpu) -> str:
    return f"GPU {gpu.index}" if gpu.index is not None else str(gpu.uuid)


def acquire(
    pool: Sequence[Gpu],
    count: int,
    *,
    owner: str,
    wait_s: float,
    on_wait: Callable[[str], None] = log.info,
    folder: Path | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> GpuLease:
    """Lock ``count`` GPUs of ``pool`` (the first free ones, in pool order) for ``owner``.

    All or nothing: a partial set is given back before waiting, so two waiters never deadlock holding
    half each. While none is free it says so through ``on_wait`` (at once, then every
    ``WAIT_MESSAGE_EVERY_S``), and gives up after ``wait_s``.

    :raises GpuError: ``count`` exceeds the pool, or no set became free within ``wait_s``.
    """
    if count > len(pool):
        raise GpuError(
            f"{owner} needs {count} GPUs but --harness-gpus gives {len(pool)} "
            f"({', '.join(_name(g) for g in pool)}); pass more GPUs or lower engine.gpus"
        )
    where = folder if folder is not None else lock_dir()
    try:
        where.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            where.chmod(0o1777)  # shared by every user's sessions, like /tmp
    except OSError as exc:
        raise GpuError(
            f"cannot create the GPU lock folder {str(where)!r}: {exc.strerror or exc}; set "
            f"{LOCK_DIR_ENV} to a writable local folder"
        ) from None
    deadline = clock() + wait_s
    next_message = clock()
    while True:
        held: list[tuple[Gpu, list[IO[str]]]] = []
        busy: list[Gpu] = []
        try:
            for gpu in pool:
                if len(held) == count:
                    break
                files = _try_lock(where, gpu)
                if files is None:
                    busy.append(gpu)
                else:
                    held.append((gpu, files))
        except OSError as exc:
            _close(held)
            raise GpuError(
                f"cannot lock GPUs in {str(where)!r}: {exc.strerror or exc}; set {LOCK_DIR_ENV} to a "
                "writable local folder"
            ) from None
        except BaseException:
            _close(held)
            raise
        if len(held) == count:
            note = json.dumps(
                {
                    "owner": owner,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                }
            )
            for _, files in held:
                with contextlib.suppress(OSError):
                    own = files[0]  # the note goes into the exclusive lock's file only
                    own.seek(0)
                    own.truncate()
                    own.write(note)
                    own.flush()
            return GpuLease(tuple(g for g, _ in held), [f for _, files in held for f in files])
        _close(held)
        now = clock()
        holders = "; ".join(f"{_name(g)}: {_holder(where, g)}" for g in busy)
        if now >= deadline:
            raise GpuError(
                f"{owner}: no {count} free GPUs of {len(pool)} within {wait_s:g} s (--harness-gpu-wait-s); "
                f"held by: {holders}. Wait for those runs, run fewer xdist workers, or give this session "
                "other GPUs with --harness-gpus"
            )
        if now >= next_message:
            on_wait(
                f"[harness] {owner}: waiting for {count} free GPU(s) (up to {wait_s:g} s); held by: {holders}"
            )
            next_message = now + WAIT_MESSAGE_EVERY_S
        time.sleep(min(POLL_S, max(0.0, deadline - now)))


def _close(held: list[tuple[Gpu, list[IO[str]]]]) -> None:
    for _, files in held:
        for f in files:
            f.close()


@dataclass
class GpuAllocator:
    """The session's pool and waiting deadline; hands each engine a :class:`GpuLease`."""

    pool: list[Gpu]
    wait_s: float = 600.0
    folder: Path | None = None

    def acquire(self, owner: str, count: int, on_wait: Callable[[str], None] = log.info) -> GpuLease:
        return acquire(self.pool, count, owner=owner, wait_s=self.wait_s, on_wait=on_wait, folder=self.folder)


def check_gpu_needs(pool: GpuAllocator, cases: list[BenchmarkCase], server_url: str | None) -> None:
    """The selected cases against --harness-gpus: said before any engine starts, not after a wait.

    :raises GpuError: a case sets its own CUDA_VISIBLE_DEVICES, or needs more GPUs than the pool has.
    """
    for case in cases:
        if case.engine.kind == "external" or server_url:
            continue  # not started by the suite: no GPUs to give
        if "CUDA_VISIBLE_DEVICES" in case.engine.env:
            raise GpuError(
                f"{case.source}: engine.env sets CUDA_VISIBLE_DEVICES, but --harness-gpus assigns the "
                "engine's GPUs; remove it from engine.env (and say engine.gpus: N) or drop --harness-gpus"
            )
        layout = case.engine.nodes()
        if layout is not None and layout.local_gpus is None:
            raise GpuError(
                f"{case.source}: {case.name} runs {layout.how}, and Ray, not CUDA_VISIBLE_DEVICES, places "
                "its workers on GPUs, so --harness-gpus cannot give it a set; start Ray on the GPUs it may "
                "use (ray start --num-gpus N, or CUDA_VISIBLE_DEVICES before ray start) and drop "
                "--harness-gpus, or deselect its tests"
            )
        # every replica holds its own set for the engines' life: they must all fit at once
        need = case.engine.gpu_count() * max(1, case.engine.replicas)
        if need > len(pool.pool):
            what = f"{case.engine.replicas} engines" if case.engine.replicas > 1 else "the engine"
            verb = "need" if case.engine.replicas > 1 else "needs"
            raise GpuError(
                f"{case.source}: {what} of {case.name} {verb} {need} GPUs (engine.gpus or its parallel "
                f"sizes{', × replicas' if case.engine.replicas > 1 else ''}) but --harness-gpus gives "
                f"{len(pool.pool)}; pass more GPUs or deselect its tests"
            )
