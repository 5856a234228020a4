"""The smoke profile of ``make loadtest``: the whole system on loopback, 5,000 events through Locust,
every expected notice delivered exactly once. Speed is not asserted (benchmarks measure it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.run import RESULTS

LATEST = RESULTS / "loadtest-summary.json"


def _stamp(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


@pytest.mark.timeout(300)
def test_quick_load_test_delivers_every_notice_exactly_once(tmp_path: Path) -> None:
    latest_before = _stamp(LATEST)
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary["events_accepted"] == 5000
    assert summary["events_rejected"] == 0
    assert summary["batch_failures"] == 0
    assert summary["streams_broken"] == 0
    assert summary["notices_withdrawn_delivered"] == 0
    assert summary["drained"]
    assert summary["exactly_once"]
    assert summary["notices_delivered"] == summary["notices_expected"] > 0
    assert summary["ack_latency"]["requests"] > 0
    assert (tmp_path / "locust.html").exists()
    assert (tmp_path / "locust_stats.csv").exists()
    assert "PASSED" in proc.stdout
    # A run with its own --out is not the latest real run: the default summary is left alone.
    assert _stamp(LATEST) == latest_before
