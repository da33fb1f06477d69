"""Real etcd servers for tests (Debian's etcd-server): one node or a cluster on free local
ports, each in its own process group, data in the test's temp dir."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import httpx
from harness import wait_until

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdMember:
    def __init__(self, name: str, tmp: Path, host: str = "127.0.0.1") -> None:
        self.name, self.tmp, self.host = name, tmp, host
        self.client_port, self.peer_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def start(self, cluster: str, state: str = "new", prefix: list[str] | None = None) -> None:
        log = open(self.tmp / f"{self.name}.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [
                *(prefix or []),
                ETCD,
                "--name",
                self.name,
                "--data-dir",
                str(self.tmp / f"{self.name}.data"),
                "--listen-client-urls",
                self.client_url,
                "--advertise-client-urls",
                self.client_url,
                "--listen-peer-urls",
                self.peer_url,
                "--initial-advertise-peer-urls",
                self.peer_url,
                "--initial-cluster",
                cluster,
                "--initial-cluster-state",
                state,
                # a 1 s lease is granted as 1 s only with a short election timeout
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def healthy(self) -> bool:
        try:
            return httpx.get(self.client_url + "/health", timeout=1).json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Etcd:
    """One node (`Etcd(tmp)`) or a cluster (`Etcd(tmp, 3)`)."""

    def __init__(
        self, tmp: Path, nodes: int = 1, host: str = "127.0.0.1", prefix: list[str] | None = None
    ) -> None:
        self.members = [EtcdMember(f"etcd{i}", tmp, host) for i in range(nodes)]
        self.prefix = prefix
        self.cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.start(self.cluster, prefix=prefix)
        self.wait_healthy()

    def wait_healthy(self) -> None:
        wait_until(lambda: any(m.healthy() for m in self.members), 30, what="etcd healthy")

    @property
    def spec(self) -> str:
        return "etcd://" + ",".join(f"{m.host}:{m.client_port}" for m in self.members)

    def restart(self, i: int = 0) -> None:
        self.members[i].start(self.cluster, state="existing", prefix=self.prefix)
        self.wait_healthy()

    def stop(self) -> None:
        for m in self.members:
            m.kill()
