"""How a vLLM worker's KV crosses from a prefill worker to a decode worker.

Two of vLLM's own KV connectors, behind one small interface the engine drives:

- `NixlKv`: vLLM's NixlConnector (UCX on CPU). The prefill request carries
  `do_remote_decode`; vLLM keeps its blocks and answers with transfer parameters (engine id,
  block ids, side-channel host/port). Those parameters are segue's KV payload; the decode
  worker's vLLM reads the blocks straight from the prefill worker's cache and then tells it
  to free them. Blocks nobody reads are freed by vLLM when their lease runs out (the lease
  is segue's --kv-ttl; the decode side renews it while it waits to read).
- `ExampleKv` (the default): vLLM's ExampleConnector, each worker with a private storage
  directory. The prefill saves its block-aligned prefix as safetensors files; segue carries
  the files (the payload) and writes them into the decode worker's directory, where its
  connector loads them ("External Cache Hit!"). Files are deleted when released or when the
  decode ends.

Either way the payload names the tokens it belongs to, and a decode refuses a payload made
for other tokens.

NIXL on this project's 2-core CPU machines: about one fresh prefill/decode pair in three
never completes its first read (the decode side logs its transfer plan, then nothing; the
prefill side frees the blocks at the lease end); later transfers on the same pair worked.
Hence ExampleConnector stays the default.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from segue.engines.base import EngineRequestError
from segue.protocol import token_digest

CONNECTORS = ("nixl", "example")


@dataclass
class _Held:
    token_ids: list[int]
    params: dict[str, Any] | None = None  # NIXL: what a decode needs to read the blocks
    pulled: bool = False


class KvTransfer:
    """Base: bookkeeping of prefilled KV by key, shared by both connectors."""

    block_size = 0  # vLLM's, set once its cache is configured
    kv_bytes_per_block = 0
    # The connector can only store a prompt's KV computed in one engine step (no chunked
    # prefill): the engine must take a whole prompt per step.
    whole_prompt_per_step = False

    def __init__(self) -> None:
        self.held: dict[str, _Held] = {}

    def transfer_config(self, role: str, kv_ttl: float, host: str):
        raise NotImplementedError

    def prefill_args(self) -> dict[str, Any]:
        """Extra sampling args of a prefill request."""
        return {}

    def prefilled(self, key: str, token_ids: list[int], params: dict | None) -> None:
        self.held[key] = _Held(list(token_ids), params)

    def payload(self, key: str) -> bytes:
        raise NotImplementedError

    def nbytes(self, key: str) -> int:
        return 0

    def release(self, key: str) -> bool:
        return self.held.pop(key, None) is not None

    def decode_args(self, token_ids: list[int], payload: bytes | None) -> dict[str, Any]:
        """Check a pulled payload against the request's tokens; extra sampling args of the
        decode request."""
        raise NotImplementedError

    def request_started(self, token_ids: list[int]) -> None:
        """A request of this worker entered vLLM."""

    def request_done(self, token_ids: list[int], engine_done: bool) -> None:
        """A request of this worker ended. `engine_done`: vLLM reported it finished; else
        it was aborted or failed, and vLLM's current engine step may still be using it."""

    def close(self) -> None:
        pass


class _NixlPayload(msgspec.Struct):
    digest: str
    params: str  # vLLM's kv_transfer_params, as JSON (plain values only)


class NixlKv(KvTransfer):
    def transfer_config(self, role: str, kv_ttl: float, host: str):
        import os

        from vllm.config import KVTransferConfig

        # vLLM reads its side-channel address from the environment; each worker needs a
        # port of its own (several may share a host).
        os.environ["VLLM_NIXL_SIDE_CHANNEL_HOST"] = host
        os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(_free_port(host))
        return KVTransferConfig(
            kv_connector="NixlConnector",
            kv_connector_module_path="segue.engines.vllm_nixl",
            kv_role="kv_both",
            kv_connector_extra_config={
                # vLLM renews the lease every lease/6 s (integer): keep it at 6 s or more.
                "kv_lease_duration": max(6, round(kv_ttl)),
            },
        )

    def prefill_args(self) -> dict[str, Any]:
        return {"kv_transfer_params": {"do_remote_decode": True}}

    def payload(self, key: str) -> bytes:
        held = self.held[key]
        held.pulled = True  # from now on the decode side frees the blocks when it reads them
        return msgspec.msgpack.encode(
            _NixlPayload(token_digest(held.token_ids), json.dumps(held.params))
        )

    def nbytes(self, key: str) -> int:
        blocks = (self.held[key].params or {}).get("remote_block_ids") or [[]]
        return sum(len(g) for g in blocks) * self.kv_bytes_per_block

    def decode_args(self, token_ids: list[int], payload: bytes | None) -> dict[str, Any]:
        try:
            kv = msgspec.msgpack.decode(payload or b"", type=_NixlPayload)
            params = json.loads(kv.params)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            raise EngineRequestError("KV payload is not a segue NIXL KV payload") from None
        if kv.digest != token_digest(token_ids):
            raise EngineRequestError("KV payload does not belong to this request's tokens")
        if not isinstance(params, dict) or not params.get("do_remote_prefill"):
            raise EngineRequestError("KV payload carries no remote prefill parameters")
        return {"kv_transfer_params": params}


class _FilesPayload(msgspec.Struct):
    digest: str  # of the tokens the KV belongs to
    files: dict[str, bytes]  # connector file name -> safetensors bytes


ABORTED_FILES_GRACE_S = 60.0
_KV_FILE_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}\.safetensors$")


def _safetensors_rows(data: bytes) -> list[int]:
    """First dimension of every tensor in a safetensors file (its JSON header)."""
    if len(data) < 8:
        raise ValueError("truncated")
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return [t["shape"][0] for k, t in header.items() if k != "__metadata__"]


class ExampleKv(KvTransfer):
    # ExampleConnector stores a prompt's KV from the blocks of its *first* engine step only;
    # a chunked prefill would save the first chunk under the whole prompt's name, and the
    # decode side's vLLM would die loading it.
    whole_prompt_per_step = True

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="segue-vllm-kv-"))
        # Requests vLLM may be running, by prompt: identical prompts share the connector's
        # files, which may go only when no request uses them and no handle holds them.
        self.in_engine: collections.Counter[tuple[int, ...]] = collections.Counter()

    def transfer_config(self, role: str, kv_ttl: float, host: str):
        from vllm.config import KVTransferConfig

        return KVTransferConfig(
            kv_connector="ExampleConnector",
            kv_role="kv_both",
            kv_connector_extra_config={"shared_storage_path": str(self.dir)},
        )

    def _folder(self, token_ids: list[int], n: int) -> Path:
        """Where ExampleConnector keeps the KV of token_ids[:n] (its own naming)."""
        import numpy as np
        from vllm.utils.hashing import safe_hash

        data = np.asarray(token_ids[:n], dtype=np.int64).tobytes()
        return self.dir / safe_hash(data, usedforsecurity=False).hexdigest()

    def _spans(self, token_ids: list[int]) -> tuple[int, int]:
        """Tokens the connector stores for a prompt, and tokens it looks up for one."""
        bs = self.block_size
        return (len(token_ids) - 1) // bs * bs, (len(token_ids) - 2) // bs * bs

    def _remove(self, token_ids: list[int]) -> None:
        for n in set(self._spans(token_ids)):
            if n > 0:
                shutil.rmtree(self._folder(token_ids, n), ignore_errors=True)

    def payload(self, key: str) -> bytes:
        ids = self.held[key].token_ids
        stored, looked_up = self._spans(ids)
        files: dict[str, bytes] = {}
        folder = self._folder(ids, stored)
        # Only a prefix the decode side will look up is worth sending.
        if stored == looked_up and stored > 0 and folder.is_dir():
            files = {f.name: f.read_bytes() for f in folder.iterdir() if _KV_FILE_RE.match(f.name)}
        return msgspec.msgpack.encode(_FilesPayload(token_digest(ids), files))

    def nbytes(self, key: str) -> int:
        ids = self.held[key].token_ids
        folder = self._folder(ids, self._spans(ids)[0])
        return sum(f.stat().st_size for f in folder.iterdir()) if folder.is_dir() else 0

    def release(self, key: str) -> bool:
        held = self.held.pop(key, None)
        if held is None:
            return False
        self._remove_if_unused(held.token_ids)
        return True

    def decode_args(self, token_ids: list[int], payload: bytes | None) -> dict[str, Any]:
        try:
            kv = msgspec.msgpack.decode(payload or b"", type=_FilesPayload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise EngineRequestError("KV payload is not a segue vLLM KV payload") from None
        if kv.digest != token_digest(token_ids):
            raise EngineRequestError("KV payload does not belong to this request's tokens")
        if any(not _KV_FILE_RE.match(name) for name in kv.files):
            raise EngineRequestError("KV payload names an unexpected file")
        looked_up = self._spans(token_ids)[1]
        for name, data in kv.files.items():
            # vLLM copies each file into the slots of `looked_up` tokens: any other size
            # would kill its engine core, not just fail this request
            try:
                rows = _safetensors_rows(data)
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                raise EngineRequestError(f"KV payload file {name} is not safetensors") from None
            if not rows or any(r != looked_up for r in rows):
                raise EngineRequestError(
                    f"KV payload file {name} holds {rows} tokens, expected {looked_up}"
                )
        if kv.files:  # else nothing block-aligned to reuse: the decode side prefills it all
            folder = self._folder(token_ids, looked_up)
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in kv.files.items():
                (folder / name).write_bytes(data)
        return {}

    def request_started(self, token_ids: list[int]) -> None:
        self.in_engine[tuple(token_ids)] += 1

    def request_done(self, token_ids: list[int], engine_done: bool) -> None:
        if engine_done:
            self._left_engine(tuple(token_ids))
        else:
            # An abort takes effect in vLLM only when its current step ends, and that step
            # may still write this prompt's files (prefill) or read them (decode); deleting
            # them under it kills vLLM's engine core (seen: ENOENT from safetensors). vLLM
            # does not say when it is done with an aborted request: wait well past any step.
            asyncio.get_running_loop().call_later(
                ABORTED_FILES_GRACE_S, self._left_engine, tuple(token_ids)
            )

    def _left_engine(self, ids: tuple[int, ...]) -> None:
        self.in_engine[ids] -= 1
        if self.in_engine[ids] <= 0:
            del self.in_engine[ids]
            self._remove_if_unused(list(ids))

    def _remove_if_unused(self, token_ids: list[int]) -> None:
        if tuple(token_ids) not in self.in_engine and not any(
            h.token_ids == token_ids for h in self.held.values()
        ):
            self._remove(token_ids)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
