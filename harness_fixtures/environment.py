"""What ran where: host, Python, package versions, git state and an allowlisted, redacted env."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import psutil

from . import redaction

PACKAGES = (
    "harness-fixtures",
    "mlcommons-loadgen",
    "pytest",
    "pytest-xdist",
    "aiohttp",
    "pydantic",
    "prometheus-client",
    "rouge-score",
    "nltk",
    "tokenizers",
    "mlflow",
    "nvidia-ml-py",
    "uvloop",
)
ENV_ALLOWLIST = re.compile(
    r"^(CUDA_VISIBLE_DEVICES|NVIDIA_VISIBLE_DEVICES|OMP_NUM_THREADS|VLLM_[A-Z0-9_]+|HF_HUB_OFFLINE|"
    r"HARNESS_[A-Z0-9_]+|MLFLOW_TRACKING_URI|MLFLOW_EXPERIMENT_NAME|CI|GITHUB_SHA|GITHUB_RUN_ID|CI_JOB_ID)$"
)


def redact_env(variables: dict[str, str]) -> dict[str, str]:
    """Allowlisted variables only, secret-looking ones hidden (:mod:`harness_fixtures.redaction`)."""
    return redaction.env({k: v for k, v in sorted(variables.items()) if ENV_ALLOWLIST.match(k)})


def git_state(path: Path) -> dict[str, Any]:
    def run(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    sha = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus() -> tuple[list[dict[str, Any]], str]:
    """(per-GPU facts from NVML, "ok" or "unavailable (<why>)"); never raises."""
    from .metrics.nvml import NvmlCollector

    nv = NvmlCollector()
    try:
        reason = nv.probe()
        if reason is not None:
            return [], f"unavailable ({reason})"
        info = nv.gpu_info()
    except Exception as exc:
        return [], f"unavailable ({type(exc).__name__}: {exc})"
    return info, "ok" if info else "unavailable (NVML reports no GPU)"


_GPUS: tuple[list[dict[str, Any]], str] | None = None


def capture(root: Path) -> dict[str, Any]:
    global _GPUS
    if _GPUS is None:  # static facts: ask NVML once per process
        _GPUS = gpus()
    return {
        "gpus": _GPUS[0],
        "gpu": _GPUS[1],
        "os": f"{platform.system()} {platform.release()}",
        "hostname": platform.node(),
        "cpu": {
            "model": cpu_model(),
            "logical_cores": psutil.cpu_count(),
            "physical_cores": psutil.cpu_count(False),
        },
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "git": git_state(root),
        "env": redact_env(dict(os.environ)),
    }
