"""Simulated hosts: Linux network namespaces on one bridge, and the faults of a network
between them: a partition (a link set down, or a blackhole route between two hosts), delay
and loss (tc netem), a host that vanishes. The multi-host tests and benchmarks use it. Needs
root and iproute2; `Net.close()` removes every namespace, veth and bridge it made."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
from dataclasses import dataclass

_ids = itertools.count()


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    cmd = [*prefix, *(["ip"] if args[0] != "tc" else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r.stdout


def available() -> bool:
    if os.geteuid() != 0:
        return False
    name = f"sgprobe{os.getpid()}"
    try:
        ip("netns", "add", name)
    except (RuntimeError, FileNotFoundError):
        return False
    ip("netns", "del", name, check=False)
    return True


@dataclass
class Host:
    name: str  # the namespace
    addr: str
    veth: str  # its link's end in the root namespace (on the bridge)
    net: Net

    def partition(self) -> None:
        """Cut this host off from every other (no FIN, no RST: packets just vanish)."""
        ip("link", "set", self.veth, "down")

    def heal(self) -> None:
        ip("link", "set", self.veth, "up")

    def block(self, other: Host) -> None:
        """Cut only the path between this host and `other` (both directions)."""
        ip("route", "add", "blackhole", f"{other.addr}/32", netns=self.name)
        ip("route", "add", "blackhole", f"{self.addr}/32", netns=other.name)

    def unblock(self, other: Host) -> None:
        ip("route", "del", "blackhole", f"{other.addr}/32", netns=self.name, check=False)
        ip("route", "del", "blackhole", f"{self.addr}/32", netns=other.name, check=False)

    def slow_link(self, delay_ms: int, loss_pct: float) -> str:
        """Delay and loss on this host's link, both directions, with netem; on a kernel
        without netem, a link throttled to 2 Mbit/s with tbf instead. Returns which."""
        for kind, spec in (
            ("netem", ["netem", "delay", f"{delay_ms}ms", "loss", f"{loss_pct}%"]),
            ("tbf", ["tbf", "rate", "2mbit", "burst", "16kbit", "latency", f"{delay_ms}ms"]),
        ):
            ok = all(
                subprocess.run(
                    [
                        *(["ip", "netns", "exec", ns] if ns else []),
                        "tc",
                        "qdisc",
                        "replace",
                        "dev",
                        dev,
                        "root",
                        *spec,
                    ],
                    capture_output=True,
                ).returncode
                == 0
                for dev, ns in ((self.veth, None), ("eth0", self.name))
            )
            if ok:
                return kind
        raise RuntimeError("neither netem nor tbf is available")

    def fast_link(self) -> None:
        """Undoes `slow_link`: the link's default queueing again, both directions."""
        ip("tc", "qdisc", "del", "dev", self.veth, "root", check=False)
        ip("tc", "qdisc", "del", "dev", "eth0", "root", netns=self.name, check=False)

    def pids(self) -> list[int]:
        return [int(p) for p in ip("netns", "pids", self.name, check=False).split()]

    def vanish(self) -> None:
        """The host is gone: its link first (so nothing it had open says goodbye), then
        every process in it."""
        self.partition()
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class Net:
    """A bridge in the root namespace (which gets .1, so tests reach every host) and hosts
    on it, 10.213.N.0/24."""

    def __init__(self) -> None:
        self.n = (os.getpid() + next(_ids)) % 200 + 20
        self.tag = f"sg{self.n}"
        self.bridge = f"{self.tag}br"
        self.hosts: list[Host] = []
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"10.213.{self.n}.1/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    @property
    def gateway(self) -> str:
        """The bridge's address in the root namespace: every host reaches it."""
        return f"10.213.{self.n}.1"

    def host(self, name: str) -> Host:
        i = len(self.hosts) + 10
        ns, veth = f"{self.tag}{name}", f"{self.tag}v{i}"
        ip("netns", "add", ns)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("link", "set", veth, "master", self.bridge)
        ip("link", "set", veth, "up")
        addr = f"10.213.{self.n}.{i}"
        ip("addr", "add", f"{addr}/24", "dev", "eth0", netns=ns)
        ip("link", "set", "eth0", "up", netns=ns)
        ip("link", "set", "lo", "up", netns=ns)
        h = Host(ns, addr, veth, self)
        self.hosts.append(h)
        return h

    def close(self) -> None:
        for h in self.hosts:
            for pid in h.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            ip("netns", "del", h.name, check=False)
            # The namespace itself may outlive its name for minutes (the kernel keeps it while
            # orphaned TCP sockets in it retransmit to a cut-off peer): delete the veth pair
            # from our side now rather than with it.
            ip("link", "del", h.veth, check=False)
        ip("link", "del", self.bridge, check=False)
