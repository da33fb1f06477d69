"""deploy/k8s/, checked offline: the kustomization renders (its resources, in order), every
resource validates against the Kubernetes schemas (kubernetes-validate; the Prometheus
Operator's ServiceMonitor by hand), every `segue` command line parses with segue's own
parser, and the grace periods outlast the drains they wait for."""

from __future__ import annotations

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip("kubernetes_validate")

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
VERSION = "1.31.0"


def rendered() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    for d in docs:  # what kustomize's `namespace:` does
        d["metadata"]["namespace"] = kustomization["namespace"]
    return docs


def containers(docs: list[dict]) -> dict[str, dict]:
    return {
        c["name"]: {**c, "_pod": d["spec"]["template"]["spec"]}
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
        for c in d["spec"]["template"]["spec"]["containers"]
    }


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_every_resource_validates_against_the_kubernetes_schemas():
    docs = rendered()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["Service", "StatefulSet", "Service", "Deployment", "Deployment", "Service",
         "PodDisruptionBudget", "Deployment", "Service", "ServiceMonitor"]
    )  # fmt: skip
    for d in docs:
        if d["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked below
        kv.validate(d, VERSION, strict=True)


def test_the_service_monitor_scrapes_ports_the_services_have():
    docs = rendered()
    (sm,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    wanted = set(sm["spec"]["selector"]["matchExpressions"][0]["values"])
    ports = {p["port"] for p in sm["spec"]["endpoints"]}
    services = [
        d
        for d in docs
        if d["kind"] == "Service" and d["metadata"].get("labels", {}).get("app") in wanted
    ]
    assert {s["metadata"]["labels"]["app"] for s in services} == wanted
    for s in services:
        assert ports <= {p["name"] for p in s["spec"]["ports"]}, s["metadata"]["name"]


def test_every_segue_command_line_parses_and_grace_outlasts_the_drain():
    from segue.cli import build_parser

    found = {n: c for n, c in containers(rendered()).items() if c["args"][0] == "segue"}
    assert set(found) == {"frontend", "worker"}
    parser = build_parser()
    for c in found.values():
        args = [a.replace("$(POD_IP)", "10.0.0.7") for a in c["args"][1:]]
        parsed = parser.parse_args(args)  # an unknown flag or bad value exits
        assert parsed.cmd == c["name"]
    fe, worker = found["frontend"], found["worker"]
    assert (
        fe["_pod"]["terminationGracePeriodSeconds"]
        > float(flag(fe["args"], "--shutdown-grace")) + 3
    )  # the preStop's sleep
    assert (
        worker["_pod"]["terminationGracePeriodSeconds"]
        > float(flag(worker["args"], "--drain-timeout")) + 1
    )
    system = flag(fe["args"], "--system-port")
    assert {p["containerPort"] for p in fe["ports"]} >= {8000, int(system)}
    assert fe["readinessProbe"]["httpGet"]["port"] == "system"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert flag(fe["args"], "--store").startswith("redis://segue-redis:")
