"""The hf engine's KV payload: a msgpack header (token digest, shape, dtype) followed by the
raw bytes of each layer's K and V for the positions it covers, read from a sequence's paged
blocks. Decoding checks the payload against the request's tokens and this model. No pickle.
"""

from __future__ import annotations

from typing import Any

import msgspec

from segue.engines.base import EngineRequestError
from segue.protocol import token_digest


class KvHeader(msgspec.Struct):
    digest: str
    num_tokens: int  # positions the payload covers (the context but its last token)
    dtype: str
    layers: int
    kv_heads: int
    head_dim: int


def encode(torch: Any, paged: Any, dtype: str, table: list[int], ids: list[int]) -> bytes:
    """The payload of context `ids` (all but its last token) whose KV is in blocks `table`."""
    header = KvHeader(
        token_digest(ids), len(ids) - 1, dtype, paged.layers, paged.kv_heads, paged.head_dim
    )
    head = msgspec.msgpack.encode(header)
    parts = [len(head).to_bytes(4, "big"), head]
    if len(ids) > 1:
        for t in paged.read(table, len(ids) - 1):
            parts.append(t.contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return b"".join(parts)


def decode(
    torch: Any, paged: Any, dtype: str, token_ids: list[int], payload: bytes | None
) -> list[Any]:
    """The K/V tensors of a pulled payload (on the CPU), checked against these tokens and
    this model; raises EngineRequestError naming what does not match."""
    if payload is None:
        raise EngineRequestError("a decode needs a KV payload")
    try:
        n = int.from_bytes(payload[:4], "big")
        header = msgspec.msgpack.decode(payload[4 : 4 + n], type=KvHeader)
    except (TypeError, ValueError, msgspec.DecodeError):
        raise EngineRequestError("KV payload is not a segue KV payload") from None
    if header.digest != token_digest(token_ids) or header.num_tokens != len(token_ids) - 1:
        raise EngineRequestError("KV payload does not belong to this request's tokens")
    if header.dtype != dtype:
        raise EngineRequestError(f"KV payload is {header.dtype}, engine is {dtype}")
    shape = (paged.layers, paged.kv_heads, paged.head_dim)
    if (header.layers, header.kv_heads, header.head_dim) != shape:
        raise EngineRequestError("KV payload is for another model shape")
    tdtype = getattr(torch, header.dtype)
    size = (
        header.num_tokens * paged.kv_heads * paged.head_dim * torch.empty((), dtype=tdtype).itemsize
    )
    if len(payload) != 4 + n + 2 * paged.layers * size:
        raise EngineRequestError("KV payload has the wrong size")
    if header.num_tokens == 0:
        return []
    raw = torch.frombuffer(bytearray(payload[4 + n :]), dtype=torch.uint8)
    return [
        raw[i * size : (i + 1) * size]
        .view(tdtype)
        .reshape(header.num_tokens, paged.kv_heads, paged.head_dim)
        for i in range(2 * paged.layers)
    ]
