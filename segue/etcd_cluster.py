"""Real etcd servers started by segue's tools (chaos, the fleet benchmark) and tests: one node
or a cluster on free local ports, each member in its own process group, data under a
directory the caller owns. Debian's etcd-server (`etcd` on PATH)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from segue.discovery.etcd import b64, prefix_end

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict[str, Any], timeout: float = 1.0) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        out: dict[str, Any] = json.loads(r.read())
        return out


class EtcdMember:
    def __init__(self, name: str, tmp: Path, host: str = "127.0.0.1") -> None:
        self.name, self.tmp, self.host = name, tmp, host
        self.client_port, self.peer_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False  # SIGSTOPped

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
        log.close()  # the child holds its own copy
        self.stopped = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=1) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def status(self) -> tuple[str, str] | None:
        """(this member's id, its leader's id), or None when it does not answer."""
        try:
            st = _post(self.client_url + "/v3/maintenance/status", {})
            return str(st["header"]["member_id"]), str(st["leader"])
        except (OSError, ValueError, KeyError):
            return None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            self.stopped = sig == signal.SIGSTOP

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.stopped = False


class Etcd:
    """One node (`Etcd(tmp)`) or a cluster (`Etcd(tmp, 3)`), healthy on return."""

    def __init__(
        self, tmp: Path, nodes: int = 1, host: str = "127.0.0.1", prefix: list[str] | None = None
    ) -> None:
        self.members = [EtcdMember(f"etcd{i}", tmp, host) for i in range(nodes)]
        self.prefix = prefix
        self.cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.start(self.cluster, prefix=prefix)
        try:
            self.wait_healthy()
        except Exception:
            self.stop()
            raise

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(m.healthy() for m in self.members if m.running and not m.stopped):
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd not healthy within {timeout:g} s")
            time.sleep(0.05)

    @property
    def endpoints(self) -> str:
        return ",".join(f"{m.host}:{m.client_port}" for m in self.members)

    @property
    def spec(self) -> str:
        return "etcd://" + self.endpoints

    def leader(self) -> int | None:
        """The index of the member that leads now, as the running members see it."""
        ids = {}
        lead = None
        for i, m in enumerate(self.members):
            st = m.status() if m.running and not m.stopped else None
            if st is not None:
                ids[st[0]] = i
                if st[1] not in ("", "0"):
                    lead = st[1]
        return ids.get(lead) if lead is not None else None

    def restart(self, i: int = 0, wait: bool = True) -> None:
        self.members[i].start(self.cluster, state="existing", prefix=self.prefix)
        if wait:
            self.wait_healthy()

    def count_keys(self, prefix: str) -> int:
        """Keys under `prefix` (0 when no member answers)."""
        body = {"key": b64(prefix), "range_end": prefix_end(prefix), "count_only": True}
        for m in self.members:
            if m.running and not m.stopped:
                with contextlib.suppress(OSError, ValueError, urllib.error.URLError):
                    return int(_post(m.client_url + "/v3/kv/range", body).get("count", 0))
        return 0

    def count_leases(self) -> int:
        """Leases granted and not yet expired or revoked (0 when no member answers)."""
        for m in self.members:
            if m.running and not m.stopped:
                with contextlib.suppress(OSError, ValueError, urllib.error.URLError):
                    return len(_post(m.client_url + "/v3/lease/leases", {}).get("leases", []))
        return 0

    def stop(self) -> None:
        for m in self.members:
            m.kill()
