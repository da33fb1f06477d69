from __future__ import annotations

import asyncio

import pytest

from segue.engines.base import EngineInput, EngineRequestError
from segue.engines.mocker import MockerConfig, MockerEngine
from segue.sampling import SamplingParams
from segue.tokenizer import BuiltinTokenizer


async def run(engine, req) -> tuple[list[int], str]:
    s = engine.add_request(req)
    out: list[int] = []
    while True:
        o = await s.get()
        out += o.token_ids
        if o.finish_reason:
            return out, o.finish_reason


@pytest.fixture
async def engine():
    e = MockerEngine(
        MockerConfig(step_ms=0.5, kv_blocks=64, block_size=16, max_num_seqs=2), BuiltinTokenizer()
    )
    await e.start()
    yield e
    await e.stop()


def req(rid, ids, n, **sampling):
    return EngineInput(
        request_id=rid, token_ids=ids, max_tokens=n, sampling=SamplingParams(**sampling)
    )


async def test_output_is_pure_function_of_context(engine):
    full, reason = await run(engine, req("a", [10, 11, 12], 20))
    assert reason == "length" and len(full) == 20
    again, _ = await run(engine, req("b", [10, 11, 12], 20))
    assert again == full
    # continuing from prompt + the first 7 tokens gives exactly the rest
    tail, _ = await run(engine, req("c", [10, 11, 12] + full[:7], 13))
    assert tail == full[7:]
    other, _ = await run(engine, req("d", [10, 11, 13], 20))
    assert other != full
    tok = BuiltinTokenizer()
    assert all(t in set(tok.output_vocab()) for t in full)


async def test_seeded_sampling_differs_from_greedy(engine):
    g, _ = await run(engine, req("a", [1, 2], 10))
    s1, _ = await run(engine, req("b", [1, 2], 10, temperature=1.0, seed=5))
    s2, _ = await run(engine, req("c", [1, 2], 10, temperature=1.0, seed=5))
    assert s1 == s2 and s1 != g


async def test_kv_blocks_reserved_and_freed(engine):
    s = engine.add_request(req("a", list(range(20)), 30))  # 50 tokens -> 4 blocks
    await s.get()
    st = engine.stats()
    assert (st.running, st.kv_blocks_used) == (1, 4)
    while not (await s.get()).finish_reason:
        pass
    st = engine.stats()
    assert (st.running, st.waiting, st.kv_blocks_used) == (0, 0, 0)


async def test_abort_frees_at_once_in_every_phase(engine):
    a = engine.add_request(req("a", [1], 300))  # 19 blocks
    engine.add_request(req("b", [1], 300))
    c = engine.add_request(req("c", [1], 10))  # waits: max_num_seqs=2
    await a.get()
    assert engine.stats().waiting == 1
    assert engine.abort("c")  # while waiting
    assert engine.abort("a")  # while decoding
    st = engine.stats()
    assert (st.running, st.waiting, st.kv_blocks_used) == (1, 0, 19)
    assert (await c.get()).finish_reason == "abort"
    assert engine.abort("b")
    assert engine.stats().kv_blocks_used == 0
    assert not engine.abort("b")


async def test_waiting_queue_admits_when_blocks_free(engine):
    big = engine.add_request(req("big", list(range(16 * 40)), 16 * 20))  # 60 of 64 blocks
    await big.get()
    small = engine.add_request(req("small", [1] * 16, 48))  # 4 blocks: fits
    late = engine.add_request(req("late", [1] * 16, 48))  # 4 more: must wait
    await small.get()
    await asyncio.sleep(0.01)
    assert engine.stats().waiting == 1
    engine.abort("big")
    out, reason = await run_stream(late)
    assert reason == "length" and len(out) == 48


async def run_stream(s):
    out = []
    while True:
        o = await s.get()
        out += o.token_ids
        if o.finish_reason:
            return out, o.finish_reason


async def test_request_larger_than_pool_is_rejected(engine):
    with pytest.raises(EngineRequestError, match="KV blocks"):
        engine.add_request(req("x", [1] * 1000, 100))


async def test_timing_model_prefill_and_decode():
    e = MockerEngine(MockerConfig(step_ms=5, prefill_tps=10_000), BuiltinTokenizer())
    await e.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    s = e.add_request(req("a", [1] * 1000, 5))  # prefill 100 ms, 4 steps of 5 ms
    await s.get()
    ttft = loop.time() - t0
    await run_stream(s)
    total = loop.time() - t0
    await e.stop()
    assert 0.09 <= ttft < 0.5
    assert total - ttft >= 0.019
