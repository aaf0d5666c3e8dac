"""``python -m harness_fixtures.accuracy``: score an MLPerf accuracy log (harness_fixtures.accuracy.rouge)."""

import sys

from .rouge import main

sys.exit(main())
