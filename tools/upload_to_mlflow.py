"""Upload recorded harness results to MLflow; the same command as the installed ``harness-upload-mlflow``
(harness_fixtures.exporters.mlflow.cli has the options)."""

from __future__ import annotations

import sys

from harness_fixtures.exporters.mlflow.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main, parser

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "main", "parser"]

if __name__ == "__main__":
    sys.exit(main())
