"""The workers one pick may choose from, as the policies read them."""

from __future__ import annotations

from dataclasses import dataclass

from segue.discovery import Instance


@dataclass(frozen=True, slots=True)
class Candidates:
    """Never empty: in a fixed order (for turns), and by id. The router makes it once per
    change of the routable set, not once per pick."""

    items: list[Instance]
    by_id: dict[str, Instance]

    @classmethod
    def of(cls, items: list[Instance]) -> Candidates:
        return cls(items, {i.id: i for i in items})
