"""segue's side of vLLM's ExampleConnector: a decode worker checks a KV payload's files
before vLLM loads them (a file of the wrong size would kill vLLM's engine core)."""

from __future__ import annotations

import msgspec
import pytest

from segue.engines.base import EngineRequestError
from segue.engines.vllm_kv import ExampleKv, _FilesPayload
from segue.protocol import token_digest

safetensors_torch = pytest.importorskip("safetensors.torch")
torch = pytest.importorskip("torch")

NAME = "model.layers.0.self_attn.attn.safetensors"


def _payload(ids: list[int], rows: int) -> bytes:
    data = safetensors_torch.save({"kv_cache": torch.zeros(rows, 2, 4)})
    return msgspec.msgpack.encode(_FilesPayload(token_digest(ids), {NAME: data}))


@pytest.fixture
def kv():
    k = ExampleKv()
    k.block_size = 128
    yield k
    k.close()


def test_payload_of_the_looked_up_size_is_written_for_vllm(kv):
    ids = list(range(300))  # vLLM looks up the first (300 - 2) // 128 * 128 = 256 tokens
    assert kv.decode_args(ids, _payload(ids, 256)) == {}
    assert (kv._folder(ids, 256) / NAME).is_file()


@pytest.mark.parametrize("rows", [128, 0, 384])
def test_payload_of_another_size_is_refused_before_vllm_sees_it(kv, rows):
    """A prefill that stored only its first chunk (chunked prefill) made such a file."""
    ids = list(range(300))
    with pytest.raises(EngineRequestError, match=f"holds \\[{rows}\\] tokens, expected 256"):
        kv.decode_args(ids, _payload(ids, rows))
    assert not kv._folder(ids, 256).exists()


def test_payload_that_is_not_safetensors_is_refused(kv):
    ids = list(range(300))
    bad = msgspec.msgpack.encode(_FilesPayload(token_digest(ids), {NAME: b"\xff" * 20}))
    with pytest.raises(EngineRequestError, match="not safetensors"):
        kv.decode_args(ids, bad)


def test_chunked_prefill_is_refused_with_the_example_connector():
    from segue.engines.vllm import VllmConfig, VllmEngine

    class Tok:
        eos_token_ids = {2}

    with pytest.raises(ValueError, match="--max-num-batched-tokens must be at least"):
        VllmEngine(
            VllmConfig("m", max_model_len=4096, max_num_batched_tokens=512, role="prefill"), Tok()
        )
    e = VllmEngine(VllmConfig("m", max_model_len=4096, role="decode"), Tok())
    assert e.cfg.max_num_batched_tokens == 4096
    e.kv.close()


def _files(kv, ids):
    """The files ExampleConnector would have saved for ids (in its folder naming)."""
    folder = kv._folder(ids, kv._spans(ids)[0])
    folder.mkdir(parents=True)
    (folder / NAME).write_bytes(b"kv")
    return folder


def test_files_stay_while_a_request_with_the_same_prompt_uses_them(kv):
    ids = list(range(300))
    folder = _files(kv, ids)
    kv.request_started(ids)
    kv.request_started(ids)  # an identical prompt from another client
    kv.request_done(ids, engine_done=True)
    assert folder.is_dir()
    kv.prefilled("k", ids, None)  # the other one is a finished prefill: held for a pull
    kv.request_done(ids, engine_done=True)
    assert folder.is_dir()
    kv.release("k")
    assert not folder.exists()


def test_files_of_an_aborted_request_outlive_vllms_current_step(kv, monkeypatch):
    """vLLM's step may still write (prefill) or read (decode) them after the abort."""
    import asyncio
    import time

    import segue.engines.vllm_kv as vkv

    monkeypatch.setattr(vkv, "ABORTED_FILES_GRACE_S", 0.2)
    ids = list(range(300))
    folder = _files(kv, ids)

    async def scenario():
        kv.request_started(ids)
        kv.request_done(ids, engine_done=False)
        assert folder.is_dir()  # not at once
        deadline = time.monotonic() + 5
        while folder.exists():
            assert time.monotonic() < deadline, "files of an aborted request never freed"
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
