"""The cluster token: a shared secret every request-plane call carries when it is set, so a
worker reachable from other hosts serves only its own deployment."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

HEADER = "X-Segue-Cluster-Token"
ENV = "SEGUE_CLUSTER_TOKEN"


def load_cluster_token(path: str | None) -> str | None:
    """From `--cluster-token-file` (first line), else $SEGUE_CLUSTER_TOKEN; None: no token."""
    if path:
        token = Path(path).read_text().strip()
        if not token:
            raise ValueError(f"cluster token file {path} is empty")
        return token
    return os.environ.get(ENV) or None


def client_headers(token: str | None) -> dict[str, str]:
    return {HEADER: token} if token else {}


def token_ok(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison (no timing hint about how much of a guess was right)."""
    if expected is None:
        return True
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())
