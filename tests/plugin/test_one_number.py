"""One number per quantity: a run's TTFT and TPOT percentiles are the same in result.yaml,
session.yaml, the terminal table, the JUnit properties and the latency CDF's marks."""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from harness_fixtures.results import BenchmarkResult

if TYPE_CHECKING:
    from support import HarnessProject


def png_text(path: Path) -> dict[str, str]:
    """The tEXt chunks of a PNG (keyword → text)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = {}, 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"tEXt":
            key, _, text = body.partition(b"\0")
            out[key.decode("latin-1")] = text.decode("latin-1")
        pos += 12 + length
    return out


@pytest.mark.slow
def test_ttft_p99_is_one_number_everywhere(harness_project: HarnessProject) -> None:
    harness_project.model("m", ("Server",))
    result = harness_project.run("--junitxml=junit.xml")
    result.assert_outcomes(passed=1)
    (session,) = harness_project.session_dirs()
    r = BenchmarkResult.load(session / "m_server" / "result.yaml")
    ttft, tpot = r.ttft_ms, r.tpot_ms
    assert ttft.p50 is not None and ttft.p99 is not None and tpot.p50 is not None and tpot.p99 is not None

    # session.yaml: the same result.
    (in_session,) = yaml.safe_load((session / "session.yaml").read_text())["results"]
    assert in_session["ttft_ms"]["p99"] == ttft.p99 and in_session["tpot_ms"]["p99"] == tpot.p99

    # The terminal table: the same values, formatted.
    (row,) = [line for line in result.outlines if line.startswith("m_server ")]
    assert row.split() == ["m_server", "VALID", *row.split()[2:4], f"{ttft.p99:.1f}", f"{tpot.p99:.2f}", "0"]

    # JUnit: the same values as properties.
    props = {
        p.get("name"): p.get("value") for p in ET.parse(harness_project.path / "junit.xml").iter("property")
    }
    assert float(props["harness_ttft_p99_ms"]) == ttft.p99 and float(props["harness_tpot_p99_ms"]) == tpot.p99

    # The latency CDF marks LoadGen's values (written into the PNG beside the pixels).
    text = png_text(session / "m_server" / "plots" / "latency_cdf.png")["Description"]
    assert f"TTFT LoadGen p50={ttft.p50} p99={ttft.p99} ms" in text
    assert f"TPOT LoadGen p50={tpot.p50} p99={tpot.p99} ms" in text
