"""What the router knows of each worker's load: the state every routing policy reads."""

from __future__ import annotations

from dataclasses import dataclass, field

from segue.router.kv_index import KvIndex


@dataclass
class Loads:
    """What the router knows of each worker's load, for the policies to read."""

    inflight: dict[str, int] = field(default_factory=dict)  # calls from this process
    load_tokens: dict[str, int] = field(default_factory=dict)  # their context tokens
    kv_index: KvIndex = field(default_factory=KvIndex)
    kv_weights: tuple[float, float] = (1.0, 0.1)  # (overlap, load)
