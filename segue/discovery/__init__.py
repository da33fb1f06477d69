"""Service discovery: workers register with a lease, callers watch the live set."""

from __future__ import annotations

from segue.discovery.base import Discovery, Instance, Lease

__all__ = ["Discovery", "Instance", "Lease", "open_discovery"]


def open_discovery(spec: str, namespace: str = "default") -> Discovery:
    """`file:DIR`: one machine, no server (the only backend so far)."""
    if spec.startswith("file:"):
        from segue.discovery.file import FileDiscovery

        return FileDiscovery(spec[len("file:") :], namespace)
    raise ValueError(f"unsupported discovery {spec!r}: expected file:DIR")
