"""``harness-upload-mlflow`` (also ``tools/upload_to_mlflow.py``): upload recorded harness results to
MLflow, one run per test under one parent run per session.

Reads a test folder's metadata.yaml + result.yaml (``--metadata-file``) or every test of a session
folder (``--results-dir``); writes nothing. Uploading the same result again finds its run by a
stable result id instead of creating a second one; a run left half-logged is completed. Credentials
come only from the environment (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD), read by
MLflow itself. Exit codes: 0 all uploaded (or already there) · 1 an upload failed · 2 bad command
line or unreadable files.

    harness-upload-mlflow --results-dir harness_output/20261126-074946 \\
        --mlflow-host localhost --mlflow-port 5000 --mlflow-experiment-name my-experiment
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .records import UploadError
from .upload import UploadSettings, find_metadata, tracking_uri_from, upload

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key.strip(), value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harness-upload-mlflow",
        description="Upload harness results (metadata.yaml + result.yaml per test) to MLflow.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--metadata-file", type=Path, help="One test's metadata.yaml.")
    src.add_argument(
        "--results-dir", type=Path, help="A session folder (harness_output/<stamp>): all */metadata.yaml."
    )
    p.add_argument("--mlflow-host", help="MLflow host (http:// added if no scheme). Default: localhost.")
    p.add_argument("--mlflow-port", type=int, help="MLflow port. Default: 5000.")
    p.add_argument(
        "--mlflow-tracking-uri",
        help="Tracking URI; wins over --mlflow-host/--mlflow-port. "
        "Default: the metadata's mlflow.tracking_uri, else $MLFLOW_TRACKING_URI.",
    )
    p.add_argument(
        "--mlflow-experiment-name",
        help="Experiment. Default: the metadata's, else $MLFLOW_EXPERIMENT_NAME, else harness-fixtures.",
    )
    p.add_argument(
        "--tag",
        action="append",
        type=_tag,
        default=[],
        metavar="KEY=VALUE",
        help="Extra run tag (logged as user.KEY); repeatable. Default: none.",
    )
    p.add_argument("--dry-run", action="store_true", help="Print what would be logged; send nothing.")
    p.add_argument(
        "--retries",
        type=int,
        default=3,
        help="Tries again after 1, 2, 4 ... s on connection errors. Default: 3.",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.retries < 0:
        parser().error(f"--retries must be >= 0, got {args.retries!r}")
    settings = UploadSettings(
        tracking_uri=args.mlflow_tracking_uri or tracking_uri_from(args.mlflow_host, args.mlflow_port),
        experiment_name=args.mlflow_experiment_name,
        tags=dict(args.tag),
        dry_run=args.dry_run,
        retries=args.retries,
    )
    try:
        files = find_metadata(args.metadata_file, args.results_dir)
        return upload(files, settings)
    except UploadError as exc:
        print(f"harness-upload-mlflow: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
