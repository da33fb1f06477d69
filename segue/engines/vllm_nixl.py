"""vLLM's NixlConnector, loaded through `kv_connector_module_path` so that this module runs
in each vLLM process before the connector is built.

NIXL's Python API starts its progress thread with no delay between polls (`pthrDelay = 0`),
and on the TCP transport that thread then spins a whole core, idle or not. It cannot go:
UCX emulates the decode side's reads over TCP with messages that the prefill side must
progress, even when its vLLM is idle. So the thread stays and pauses between polls.
"""

from __future__ import annotations

import importlib
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlConnector

__all__ = ["NixlConnector"]

PROGRESS_DELAY_US = 500  # each transfer step waits at most this long for the thread


def _patch_progress_delay() -> None:
    try:
        api = importlib.import_module("nixl._api")
    except ImportError:
        return
    bind = api.nixlBind
    if getattr(bind.nixlAgentConfig, "_segue", False):
        return
    base: Any = bind.nixlAgentConfig

    class _AgentConfig(base):
        _segue = True

        @property
        def pthrDelay(self) -> int:  # noqa: N802 - NIXL's name
            return base.pthrDelay.__get__(self)

        @pthrDelay.setter
        def pthrDelay(self, us: int) -> None:  # noqa: N802
            base.pthrDelay.__set__(self, max(us, PROGRESS_DELAY_US))

    bind.nixlAgentConfig = _AgentConfig


_patch_progress_delay()
