"""The prefix cache of the engines' SeqTable (the mocker's): reuse, the last-token rule,
LRU eviction, the events it reports, and the mocker's output unchanged by it."""

from __future__ import annotations

from segue.blocks import block_hashes
from segue.engines.base import EngineFinish, EngineInput
from segue.engines.mocker import MockerConfig, MockerEngine
from segue.engines.seqtable import SeqBlocks, SeqTable

BS = 4


class Seq:
    def __init__(self, rid: str, tokens: list[int], max_tokens: int = 0) -> None:
        self.req = EngineInput(rid, tokens, max_tokens)
        self.blocks = -(-(len(tokens) + max_tokens) // BS)
        self.kv = SeqBlocks([])


class Sink:
    """Records the events a table reports."""

    def __init__(self) -> None:
        self.stored_: list[int] = []
        self.removed_: list[int] = []

    def start(self, block_size: int, capacity: int, blocks: list[int]) -> None:
        pass

    def stored(self, hashes: list[int]) -> None:
        self.stored_ += hashes

    def removed(self, hashes: list[int]) -> None:
        self.removed_ += hashes


def run(table: SeqTable, seq: Seq, out: list[int] | None = None) -> Seq:
    """Admit, compute the prompt (and `out`), finish."""
    table.add(seq)
    assert table.admit() == [seq]
    table.computed(seq, seq.req.token_ids + (out or []))
    table.remove(seq)
    return seq


def table(blocks: int = 16) -> tuple[SeqTable, Sink]:
    t = SeqTable(blocks, BS, 8, prefix_caching=True)
    t.events = ev = Sink()
    return t, ev


def test_a_later_prompt_with_the_same_prefix_reuses_its_blocks():
    t, ev = table()
    first = run(t, Seq("a", list(range(10))))
    assert first.kv.cached_tokens == 0
    assert ev.stored_ == block_hashes(list(range(10)), BS)  # the two full blocks
    second = run(t, Seq("b", list(range(10)) + [50, 51, 52]))
    assert second.kv.cached_tokens == 8
    assert ev.removed_ == [] and t.stats().kv_blocks_used == 0


def test_the_last_prompt_token_is_always_computed():
    t, _ = table()
    run(t, Seq("a", list(range(12))))
    again = run(t, Seq("b", list(range(12))))  # the same 3 full blocks
    assert again.kv.cached_tokens == 8  # not 12: the last block holds the last token


def test_generated_tokens_fill_cached_blocks_too():
    t, _ = table()
    run(t, Seq("a", [1, 2, 3, 4, 5, 6], max_tokens=4), out=[7, 8, 9, 10])
    turn2 = run(t, Seq("b", list(range(1, 11)) + [99]))
    assert turn2.kv.cached_tokens == 8


def test_eviction_takes_the_least_recently_used_block_when_space_is_needed():
    t, ev = table(blocks=4)
    run(t, Seq("a", [1, 1, 1, 1, 9]))  # caches block A (4 tokens); 2 blocks while running
    run(t, Seq("b", [2, 2, 2, 2, 9]))  # caches block B
    (a,) = block_hashes([1, 1, 1, 1], BS)
    (b,) = block_hashes([2, 2, 2, 2], BS)
    assert set(t.cache) == {a, b} and t.free == 4  # cached blocks are free to take
    run(t, Seq("c", [3] * 13))  # needs all 4 blocks: both cached ones go, oldest first
    assert ev.removed_ == [a, b]
    assert a not in t.cache and b not in t.cache and t.stats().kv_blocks_used == 0


def test_a_block_in_use_is_never_evicted():
    t, _ = table(blocks=4)
    run(t, Seq("a", [1, 1, 1, 1, 9]))
    user = Seq("b", [1, 1, 1, 1, 5])  # shares block A and keeps running
    t.add(user)
    assert t.admit() == [user] and user.kv.cached_tokens == 4
    big = Seq("c", [3] * 8)  # the 2 blocks left: A (in use) and b's own are not free
    t.add(big)
    assert t.admit() == [big]
    assert t.cache[block_hashes([1, 1, 1, 1], BS)[0]] == 1  # A survived
    assert t.free == 0
    bigger = Seq("d", [4] * 4)
    t.add(bigger)
    assert t.admit() == []  # waits: nothing evictable


async def test_mocker_output_is_the_same_with_and_without_caching():
    class Tok:
        eos_token_ids: set[int] = set()

        def output_vocab(self) -> list[int]:
            return list(range(100, 200))

    async def generate(engine: MockerEngine, rid: str, prompt: list[int]) -> tuple[list, int]:
        """The tokens made, and the prompt tokens the engine found cached."""
        stream = engine.add_request(EngineInput(rid, prompt, 6))
        out: list[int] = []
        while True:
            o = await stream.get()
            assert o is not None
            out += o.token_ids
            if o.finish_reason is not None:
                assert o.finish_reason is EngineFinish.LENGTH
                return out, stream.cached_tokens

    prompt = list(range(40))
    results = []
    for caching in (True, False):
        cfg = MockerConfig(speedup=1e6, block_size=BS, prefix_caching=caching)
        engine = MockerEngine(cfg, Tok())
        await engine.start()
        first, _ = await generate(engine, "a", prompt)
        second, cached = await generate(engine, "b", prompt)
        results.append((first, second, cached))
        stats = engine.stats()
        assert stats.kv_blocks_used == 0 and stats.running == 0
        await engine.stop()
    (a1, b1, cached), (a2, b2, uncached) = results
    assert a1 == b1 == a2 == b2  # greedy output is a function of the context alone
    assert cached == 36 and uncached == 0
