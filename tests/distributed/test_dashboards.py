"""The Grafana dashboard and the Prometheus alert rules in deploy/, against a real Prometheus
(Debian's) scraping a running deployment: the rules pass `promtool check rules` and load
healthy, every metric the dashboard and the rules query exists, and the alert that matters
most (no routable worker for a model) holds exactly when the workers are gone."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
from client import body, complete
from etcd import free_port
from harness import wait_until

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "segue-alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "segue-dashboard.json"
NO_WORKER = next(
    line.split("expr:", 1)[1].strip()
    for line in RULES.read_text().splitlines()
    if "expr:" in line and "routable_workers" in line
)

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="Debian's prometheus is not installed"
)


def queried_metrics() -> set[str]:
    """The segue metric names the dashboard's and the rules' expressions use."""
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    exprs += [x.split("expr:", 1)[1] for x in RULES.read_text().splitlines() if "expr:" in x]
    return {m for e in exprs for m in re.findall(r"\bsegue_[a-z_]+", e)}


class Prometheus:
    def __init__(self, tmp: Path, frontend: str, workers: list[str]) -> None:
        self.port = free_port()

        def job(name: str, urls: list[str]) -> dict:
            return {
                "job_name": name,
                "static_configs": [{"targets": [u.split("//", 1)[1] for u in urls]}],
            }

        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [job("segue-frontend", [frontend]), job("segue-worker", workers)],
        }
        (tmp / "prometheus.yml").write_text(json.dumps(config))  # YAML is a superset of JSON
        log = open(tmp / "prometheus.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until(self._ready, 30, what="prometheus ready")

    def _ready(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(self.url + "/-/ready", timeout=2).status_code == 200
        return False

    def api(self, path: str, **params: str) -> object:
        r = httpx.get(self.url + "/api/v1/" + path, params=params, timeout=10)
        r.raise_for_status()
        return r.json()["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert isinstance(data, dict)
        return data["result"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def test_the_alert_rules_pass_promtool():
    out = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 5 rules found" in out.stdout


def test_prometheus_finds_every_metric_the_dashboard_and_rules_query(deploy, tmp_path):
    deploy.start_frontend()
    workers = [deploy.start_worker(), deploy.start_worker()]
    for _ in range(2):  # the histograms and the requests counter get samples
        assert complete(deploy.url, "chat", body("chat", "the sea", 8, False)).status == 200
    prom = Prometheus(tmp_path, deploy.url, [w.url for w in workers])
    try:
        wait_until(
            lambda: (
                all(
                    t["health"] == "up"
                    for t in prom.api("targets")["activeTargets"]  # type: ignore[index]
                )
                and len(prom.api("targets")["activeTargets"]) == 3
            ),  # type: ignore[index]
            30,
            what="the frontend and both workers scraped",
        )
        names = queried_metrics()
        assert len(names) >= 15
        for name in sorted(names):
            wait_until(
                lambda name=name: prom.query(f'count({{__name__="{name}"}})'),
                30,
                what=f"{name} in Prometheus",
            )
        groups = wait_until(
            lambda: [g for g in prom.api("rules")["groups"] if g["rules"]  # type: ignore[index]
                     and all(x.get("lastEvaluation", "").startswith("2") for x in g["rules"])],
            30,
            what="the rules evaluated",
        )  # fmt: skip
        rules = {x["name"]: x for g in groups for x in g["rules"]}
        assert len(rules) == 5 and all(x["health"] == "ok" for x in rules.values()), rules
        assert prom.query(NO_WORKER) == []  # two routable workers
        for w in workers:
            w.signal(signal.SIGTERM)
            w.popen.wait(30)
        hit = wait_until(lambda: prom.query(NO_WORKER), 30, what="no routable worker seen")
        assert [x["metric"]["model"] for x in hit] == ["segue-mocker"]
    finally:
        prom.stop()
