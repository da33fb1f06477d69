"""Service discovery: workers register with a lease, callers watch the live set."""

from __future__ import annotations

from segue.discovery.base import Discovery, Instance, Lease, ModelCard

__all__ = ["Discovery", "Instance", "Lease", "ModelCard", "open_discovery"]


def open_discovery(spec: str, namespace: str = "default") -> Discovery:
    """`file:DIR` (one machine, no server) or `etcd://HOST:PORT[,HOST:PORT...]`."""
    if spec.startswith("file:"):
        from segue.discovery.file import FileDiscovery

        return FileDiscovery(spec[len("file:") :], namespace)
    if spec.startswith("etcd://"):
        from segue.discovery.etcd import EtcdDiscovery

        return EtcdDiscovery(spec[len("etcd://") :].split(","), namespace)
    raise ValueError(f"unsupported discovery {spec!r}: expected file:DIR or etcd://HOST:PORT")
