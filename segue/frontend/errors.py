"""Why a request could not be served, as the resilient client raises it; the generation
layer turns each into the client's status (frontend/generation.py `api_error`)."""

from __future__ import annotations


class NoWorkerError(Exception):
    """No worker can take the request (503)."""


class OverloadedError(NoWorkerError):
    """Every worker that could take the request is at its admission limit (a 429)."""


class MigrationError(Exception):
    """The request broke and could not be recreated (limit reached or no worker left)."""


class RejectedError(Exception):
    """A worker refused the request for a reason re-sending cannot fix (400)."""
