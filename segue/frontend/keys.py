"""Client API keys (`--api-key-file`: one key per line, `#` comments; reloaded on SIGHUP).

Keys are kept as SHA-256 digests, so a lookup compares digests of equal length and the file's
keys do not stay in memory as strings.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

log = logging.getLogger("segue.frontend")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def read_keys(path: Path) -> list[str]:
    """The keys of an API key file: its lines but blank ones and `#` comments."""
    lines = path.read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


class ApiKeys:
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._digests: frozenset[bytes] = frozenset()
        self.load()

    def load(self) -> None:
        """(Re)reads the file; a file that cannot be read keeps the keys in force."""
        try:
            keys = read_keys(self.path)
        except OSError as e:
            if not self._digests:
                raise
            log.error("API keys not reloaded from %s: %s (the old keys stay)", self.path, e)
            return
        if not keys:
            raise ValueError(f"no API key in {self.path}")
        self._digests = frozenset(_digest(k) for k in keys)
        log.info("API keys loaded from %s: %d", self.path, len(self._digests))

    def allows(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header carries a valid `Bearer` key."""
        if not authorization or not authorization.startswith("Bearer "):
            return False
        return _digest(authorization[7:].strip()) in self._digests
