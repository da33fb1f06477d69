"""vLLM's NixlConnector, loaded through `kv_connector_module_path` so that this module runs
in each vLLM process before the connector is built.

NIXL's UCX progress thread busy-polls a whole core on the TCP transport, idle or not (the
event fd never arms). vLLM already drives transfers from its own step loop (it polls every
transfer's state each step), so the agent is created without that thread.
"""

from __future__ import annotations

from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlConnector

__all__ = ["NixlConnector"]

_agent_config = base_worker.nixl_agent_config


def _without_progress_thread(*args, **kwargs):
    return _agent_config(*args, enable_prog_thread=False, **kwargs)


if _agent_config is not None:
    base_worker.nixl_agent_config = _without_progress_thread
