"""A one-line live progress display for a LoadGen run: queries done / expected, tokens/s, elapsed.

Shown only on a terminal (never in CI logs, never from xdist workers); it reads the run's
requests.jsonl as it grows, so it costs the run itself nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO


class RunProgress:
    def __init__(self, test_id: str, requests_path: Path, expected: int | None, stream: TextIO) -> None:
        self.test_id = test_id
        self.path = requests_path
        self.expected = expected
        self.stream = stream
        self._offset = 0
        self.done = 0
        self.failed = 0
        self.tokens = 0

    def _read_new(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open() as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        end = chunk.rfind("\n") + 1  # a half-written last line is read next time
        self._offset += len(chunk[:end].encode())
        for line in chunk[:end].splitlines():
            try:
                row: dict[str, Any] = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.done += 1
            self.failed += row.get("status") != "ok"
            self.tokens += int(row.get("n_tokens") or 0)

    def tick(self, elapsed_s: float) -> None:
        self._read_new()
        exp = f"/~{self.expected}" if self.expected else ""
        rate = self.tokens / elapsed_s if elapsed_s > 0 else 0.0
        failed = f", {self.failed} failed" if self.failed else ""
        line = (
            f"  {self.test_id}: {self.done}{exp} queries{failed}, {rate:.1f} tok/s, {elapsed_s:.0f} s elapsed"
        )
        self.stream.write("\r" + line + "  ")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
