"""Disaggregated serving: the vocabulary the frontend and the workers share.

A strategy says which role receives a new request first and, on that side, how the prefill
and decode stages are chained:

  none           an aggregated worker does it all
  frontend       the frontend calls a prefill worker for a KV handle, then a decode worker
                 with it (frontend/frontend_driven.py)
  decode-first   a decode worker calls a prefill worker, pulls the KV, decodes
                 (worker/decode_first.py)
  prefill-first  a prefill worker prefills, calls a decode worker with the KV and relays its
                 stream (worker/prefill_first.py)

A worker knows its strategy from its role: a decode worker that receives a GENERATE call
runs decode-first, a prefill worker prefill-first. Strategy names never travel in requests;
the request's `Phase` says what is asked of the receiver.
"""

from __future__ import annotations

from enum import StrEnum

from segue.protocol import Role


class Strategy(StrEnum):
    NONE = "none"
    FRONTEND = "frontend"
    DECODE_FIRST = "decode-first"
    PREFILL_FIRST = "prefill-first"

    @property
    def first_role(self) -> Role:
        """The role of the worker the frontend sends a new request to."""
        return _FIRST_ROLE[self]

    @staticmethod
    def of_worker(role: Role) -> Strategy:
        """What a worker of `role` runs for a GENERATE call."""
        return _WORKER_STRATEGY[role]


class PrefillFallback(StrEnum):
    NONE = "none"  # no prefill worker left: 503
    LOCAL = "local"  # no prefill worker left: the decode worker prefills itself


_FIRST_ROLE = {
    Strategy.NONE: Role.AGGREGATED,
    Strategy.FRONTEND: Role.DECODE,
    Strategy.DECODE_FIRST: Role.DECODE,
    Strategy.PREFILL_FIRST: Role.PREFILL,
}
_WORKER_STRATEGY = {
    Role.AGGREGATED: Strategy.NONE,
    Role.DECODE: Strategy.DECODE_FIRST,
    Role.PREFILL: Strategy.PREFILL_FIRST,
}
