"""`segue chaos --netns`: workers on hosts of their own, cut off and slowed under load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from segue.netsim import available


def test_chaos_partitions_and_slow_links_are_survived_exactly(tmp_path):
    if not available():
        pytest.skip("network namespaces need root and iproute2 (CI runs as root)")
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    out = tmp_path / "report"
    r = subprocess.run(
        [
            sys.executable, "-m", "segue", "chaos", "--netns", "true", "--workers", "3",
            "--requests", "160", "--concurrency", "12", "--faults", "partition,slow",
            "--fault-every", "1.5", "--first-fault-after", "0.5", "--hang-s", "2",
            "--mocker-step-ms", "10", "--stall-timeout", "1", "--progress", "false",
            "--report-dir", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=100,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((out / "report.json").read_text())["summary"]
    assert s["exact"] == 160
    assert s["faults"]["partition"]["struck"] >= 1 and s["faults"]["slow"]["struck"] >= 1
    # A cut-off worker's streams hear nothing and move on.
    assert s["migrations"].get("stall", 0) >= 1
    assert s["leaks"] == [] and s["routable_after"] == 3
    assert all(v["unrecovered"] == 0 for v in s["recovery"].values()), s["recovery"]
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert after == before  # every simulated host removed
