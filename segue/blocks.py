"""KV block identity: a full block of `block_size` tokens is named by a hash chained over
every block before it, so one hash stands for a whole prefix. Engines name the blocks of
their prefix cache this way and publish them as KV events; the frontend's KV index
(segue.router.kv_index) hashes a request's tokens the same way to see which worker holds
how much of its prefix. Only full blocks have a name (a partial last block is never shared).
"""

from __future__ import annotations

import hashlib
from array import array

ROOT = 0  # the parent of a sequence's first block


def chain(parent: int, tokens: list[int]) -> int:
    """The hash of one block after `parent` (64 bits, the same in every process)."""
    return _hash(parent, array("I", tokens).tobytes())


def _hash(parent: int, block: bytes) -> int:
    digest = hashlib.blake2b(parent.to_bytes(8, "little") + block, digest_size=8).digest()
    return int.from_bytes(digest, "little")


def block_hashes(token_ids: list[int], block_size: int, parent: int = ROOT) -> list[int]:
    """Hashes of the full blocks of `token_ids`, chained on from `parent`."""
    n = len(token_ids) // block_size
    data = array("I", token_ids[: n * block_size]).tobytes()
    step = 4 * block_size
    out: list[int] = []
    for i in range(0, n * step, step):
        parent = _hash(parent, data[i : i + step])
        out.append(parent)
    return out
