"""`segue chaos` as a user runs it: a real deployment of mocker processes struck by real
signals, its verdict, and its HTML report opened in a real headless browser."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from segue.chaos.report import FAULT_COLORS, PLOT_SIZE, PLOTS

SHOT_SIZE = (1200, 2000)
# Quick faults: a stalled stream moves after 1 s, a drained worker hands back after 1 s.
FAST = ["--stall-timeout", "1", "--drain-timeout", "1", "--hang-s", "2", "--progress", "false"]


def chaos(*args: str, timeout: float = 100) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "segue", "chaos", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def summary(report_dir: Path) -> dict:
    return json.loads((report_dir / "report.json").read_text())["summary"]


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    profile = tmp / "chromium-profile"
    try:
        return subprocess.run(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def pixels_near(img: np.ndarray, color: str, tol: int = 40) -> int:
    rgb = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img[:, :, :3] * 255 - rgb).sum(axis=2) < tol).sum())


def test_chaos_run_is_exact_and_its_report_renders(tmp_path):
    out = tmp_path / "report"
    r = chaos(
        "--workers", "3", "--requests", "240", "--concurrency", "16",
        "--faults", "kill,term,stop,disconnect", "--fault-every", "1",
        "--first-fault-after", "0.5", "--mocker-step-ms", "10",
        "--prompt-words", "4-40", "--max-tokens", "8-48", "--report-dir", str(out), *FAST,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "segue chaos: PASSED" in r.stdout
    s = summary(out)
    cancelled = s["status"].get("cancelled", 0)
    assert s["exact"] + cancelled == 240
    assert s["cancelled_prefix_exact"] == cancelled >= 1
    assert all(s["faults"][k]["struck"] >= 1 for k in ("kill", "term", "stop", "disconnect"))
    assert s["restarts"] >= 2  # the killed and the drained worker came back
    assert sum(s["migrations"].values()) >= 1
    assert s["leaks"] == [] and len(s["workers_after"]) == 3 and s["routable_after"] == 3
    assert s["frontend_inflight_after"] == 0
    doc = json.loads((out / "report.json").read_text())
    struck = [f for f in doc["faults"] if not f["skipped"] and f["pid"]]
    for f in struck:  # every process the run started is gone with it
        assert not os.path.exists(f"/proc/{f['pid']}"), f

    # The report as a person sees it: the browser decoded every plot at its size...
    page = out / "report.html"
    w, h = SHOT_SIZE
    size = f"--window-size={w},{h}"
    dom = chromium(tmp_path, size, "--dump-dom", page.as_uri()).stdout
    m = re.search(r'data-plots="([^"]*)"', dom)
    assert m, dom[:500]
    plots = json.loads(html.unescape(m.group(1)))
    assert [p[:3] for p in plots] == [[f"plot-{p}", *PLOT_SIZE] for p in PLOTS]
    # ...and drew them: in a screenshot, each plot's place holds a drawing, not a blank, and
    # every plot shows each kind of fault's marker.
    shot = tmp_path / "shot.png"
    chromium(tmp_path, size, f"--screenshot={shot}", page.as_uri())
    img = imread(shot)
    assert img.shape[:2] == (h, w)
    for name, pw, ph, left, top in plots:
        assert top + ph <= h, f"{name} is below the screenshot"
        region = img[top : top + ph, left : left + pw]
        drawn = (region[:, :, :3] < 0.9).any(axis=2).mean()
        assert drawn > 0.03, f"{name}: only {drawn:.1%} of it drawn"
        for kind in ("kill", "term", "stop", "disconnect"):
            assert pixels_near(region, FAULT_COLORS[kind]) > 50, f"{name}: no {kind} marker"
    faults = {f["kind"] for f in doc["series"]["faults"]}
    assert faults == {"kill", "term", "stop", "disconnect"}


def test_chaos_fails_a_deployment_that_loses_requests(tmp_path):
    """Without migration a killed worker's requests are lost: the verdict says so and the
    exit code is non-zero."""
    out = tmp_path / "report"
    r = chaos(
        "--workers", "2", "--requests", "120", "--concurrency", "16", "--faults", "kill",
        "--fault-every", "1", "--first-fault-after", "0.5", "--mocker-step-ms", "10",
        "--migration-limit", "0", "--report-dir", str(out), *FAST,
    )  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert "segue chaos: FAILED" in r.stdout
    s = summary(out)
    lost = s["status"]["error"]
    assert lost >= 1 and s["problems"][0] == f"{lost} requests failed (lost)"
    assert s["exact"] == 120 - lost  # what was answered was still right
    assert all(f["status"] == "error" for f in s["failures"])


def test_chaos_targets_a_running_deployment_from_a_toml_file(tmp_path, deploy):
    """A deployment someone else started, behind API keys: the run's clients send the key
    file's first key, and the faults strike that deployment's worker processes."""
    keys = tmp_path / "keys"
    keys.write_text("# the operator's keys\nsk-chaos-1\nsk-other\n")
    deploy.start_frontend("--stall-timeout", "1", "--api-key-file", str(keys))
    workers = [deploy.start_worker("--mocker-step-ms", "10") for _ in range(2)]
    out = tmp_path / "report"
    conf = tmp_path / "chaos.toml"
    conf.write_text(
        f'url = "{deploy.frontend.url}"\nrequests = 120\nconcurrency = 8\n'
        f'faults = "stop,disconnect"\nfault-every = 1.0\nfirst-fault-after = 0.5\n'
        f'hang-s = 2.0\nprogress = false\nreport-dir = "{out}"\n'
        f'api-key-file = "{keys}"\n'
    )
    r = chaos("--config", str(conf))
    assert r.returncode == 0, r.stdout + r.stderr
    s = summary(out)
    assert s["exact"] + s["status"].get("cancelled", 0) == 120
    assert s["faults"]["stop"]["struck"] >= 1
    doc = json.loads((out / "report.json").read_text())
    stopped = {f["pid"] for f in doc["faults"] if f["kind"] == "stop" and not f["skipped"]}
    assert stopped <= {w.pid for w in workers}
    assert all(w.alive() for w in workers)  # stopped and continued, not restarted
    assert "stall" in s["migrations"]


def test_chaos_kills_frontends_and_background_responses_resume(tmp_path):
    """`--frontends 2` with frontend-kill and worker kill faults: background streamed
    responses resume at the other frontend and every one equals the fault-free run's;
    chat streams in flight at a killed frontend are counted as lost with it, apart from
    failures; the killed frontends come back, and nothing is left running."""
    out = tmp_path / "report"
    r = chaos(
        "--workers", "2", "--frontends", "2", "--requests", "120", "--concurrency", "12",
        "--faults", "frontend-kill,kill", "--fault-every", "1", "--first-fault-after", "0.5",
        "--mix", "response-stream,response-stream,chat-stream", "--mocker-step-ms", "10",
        "--prompt-words", "4-40", "--max-tokens", "20-60", "--report-dir", str(out), *FAST,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    s = summary(out)
    assert s["faults"]["frontend-kill"]["struck"] >= 2 and s["faults"]["kill"]["struck"] >= 1
    assert s["resumed"] >= 1, s
    assert s["exact"] + s["lost_with_frontend"] == 120
    assert s["recovery"]["frontend-kill"]["unrecovered"] == 0
    assert s["leaks"] == [] and s["routable_after"] == 2
    doc = json.loads((out / "report.json").read_text())
    resumed = [o for o in doc["outcomes"] if o["resumes"]]
    assert all(o["verdict"] == "exact" for o in resumed)
    for f in doc["faults"]:  # every process the run started is gone with it
        if not f["skipped"] and f["pid"]:
            assert not os.path.exists(f"/proc/{f['pid']}"), f
