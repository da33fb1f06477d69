"""How a step's rows become the paged model's padded inputs: decode rows (token, position,
slot, source of the token, block table) and prompt chunks (tokens, positions, slots [rows,
width], block tables, each chunk's last row), padded to shape buckets when the steps run as
CUDA graphs, and staged into a flat buffer at the offsets their shape fixes (`step_graphs`).
Padding writes into the scratch block and is read by nobody."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Prompt chunks whose padded batch (chunks x longest chunk) is at most this many tokens run
# as captured graphs (longer ones: few, each long enough to hide the launches)
PREFILL_GRAPH_TOKENS = 2048

Decode = tuple[int, int, list[int]]  # token id, its position, the sequence's block table
Chunk = tuple[list[int], int, list[int]]  # token ids, position of the first, block table
Inputs = Callable[[Any], tuple[Any, ...]]  # views of a staged step's inputs in a buffer


def bucket(n: int, buckets: list[int]) -> int:
    return next((b for b in buckets if b >= n), n)


@dataclass
class StepLayout:
    block_size: int
    scratch: int  # the block padding writes into
    max_batch: int
    max_blocks: int
    bucketed: bool = False  # steps padded to buckets (CUDA graphs, or their test on CPU)
    batch_buckets: list[int] = field(init=False)
    block_buckets: list[int] = field(init=False)
    query_buckets: list[int] = field(init=False)

    def __post_init__(self) -> None:
        rows, blocks = self.max_batch, self.max_blocks
        self.batch_buckets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b < rows]
        self.batch_buckets.append(rows)
        self.block_buckets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < blocks]
        self.block_buckets.append(blocks)
        self.query_buckets = [1 << i for i in range(4, 12)]  # 16 to 2048 prompt tokens

    def slots(self, table: list[int], start: int, n: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, start + n)]

    @property
    def decode_size(self) -> int:
        return self.max_batch * (4 + self.max_blocks)

    @property
    def chunk_size(self) -> int:
        return 3 * PREFILL_GRAPH_TOKENS + self.max_batch * (1 + self.max_blocks)

    # -- prompt chunks -----------------------------------------------------------------------

    def chunk_shape(self, batch: list[Chunk], every: bool) -> tuple[tuple[int, int, int], bool]:
        """Prompt chunks' padded (rows, width, blocks), and whether a graph runs them (not
        with `every`: prompt logprobs read every position's hidden state)."""
        n, qmax = len(batch), max(len(ids) for ids, _, _ in batch)
        nb = max(-(-(start + len(ids)) // self.block_size) for ids, start, _ in batch)
        if self.bucketed and not every:
            b, w = bucket(n, self.batch_buckets), bucket(qmax, self.query_buckets)
            if b * w <= PREFILL_GRAPH_TOKENS:
                return (b, w, bucket(nb, self.block_buckets)), True
        return (n, qmax, nb), False

    def chunk_inputs(self, batch: list[Chunk], shape: tuple[int, int, int]) -> tuple[list, ...]:
        """tok, pos, slot [rows, width]; table [rows, blocks]; last [rows]: padded."""
        rows, width, nb = shape
        scratch = self.scratch * self.block_size
        tok: list[list[int]] = []
        pos: list[list[int]] = []
        slot: list[list[int]] = []
        table: list[list[int]] = []
        for ids, start, blocks in batch:
            pad = width - len(ids)
            tok.append(ids + [0] * pad)
            pos.append(list(range(start, start + len(ids))) + [start] * pad)
            slot.append(self.slots(blocks, start, len(ids)) + [scratch] * pad)
            table.append(blocks[:nb] + [self.scratch] * (nb - min(nb, len(blocks))))
        last = [len(ids) - 1 for ids, _, _ in batch]
        for _ in range(rows - len(batch)):  # padding rows: write to scratch, read nothing
            tok.append([0] * width)
            pos.append([0] * width)
            slot.append([scratch] * width)
            table.append([self.scratch] * nb)
            last.append(0)
        return tok, pos, slot, table, last

    def stage_chunks(
        self, st: Any, batch: list[Chunk], shape: tuple[int, int, int]
    ) -> tuple[int, Inputs]:
        """Puts the chunks' inputs into the stage `st` (numpy, flat); returns where they end
        and what views them in the static buffer: tok, pos, slot, table, last."""
        rows, width, nb = shape
        tok, pos, slot, table, last = self.chunk_inputs(batch, shape)
        cells = rows * width
        for i, x in enumerate((tok, pos, slot)):
            st[i * cells : (i + 1) * cells].reshape(rows, width)[:] = x
        o = 3 * cells
        st[o : o + rows] = last
        st[o + rows : o + rows + rows * nb].reshape(rows, nb)[:] = table

        def inputs(s: Any) -> tuple[Any, ...]:
            grid = [s[i * cells : (i + 1) * cells].view(rows, width) for i in range(3)]
            return (*grid, s[o + rows : o + rows + rows * nb].view(rows, nb), s[o : o + rows])

        return o + rows + rows * nb, inputs

    # -- decode rows -------------------------------------------------------------------------

    def decode_shape(self, batch: list[Decode]) -> tuple[int, int]:
        """Decode rows' padded (rows, blocks)."""
        nb = max(pos // self.block_size + 1 for _, pos, _ in batch)
        if not self.bucketed:
            return len(batch), nb
        return bucket(len(batch), self.batch_buckets), bucket(nb, self.block_buckets)

    def decode_inputs(
        self, batch: list[Decode], src: list[int] | None, shape: tuple[int, int]
    ) -> tuple[list, ...]:
        """tok, pos, slot, src [rows]; table [rows, blocks]: padded."""
        nb, pad, bs = shape[1], shape[0] - len(batch), self.block_size
        pad_table = [self.scratch] * nb
        tok = [t for t, _, _ in batch] + [0] * pad
        pos = [p for _, p, _ in batch] + [0] * pad
        slot = [tb[p // bs] * bs + p % bs for _, p, tb in batch] + [self.scratch * bs] * pad
        srcs = (src or [-1] * len(batch)) + [-1] * pad
        table = [(tb[:nb] + pad_table)[:nb] for _, _, tb in batch] + [pad_table] * pad
        return tok, pos, slot, srcs, table

    def stage_decodes(
        self, st: Any, batch: list[Decode], src: list[int] | None, shape: tuple[int, int]
    ) -> tuple[int, Inputs]:
        """As `stage_chunks`, for decode rows: tok, pos, slot, src as columns [rows, 1],
        then table."""
        bsz, nb = shape
        tok, pos, slot, srcs, table = self.decode_inputs(batch, src, shape)
        for i, x in enumerate((tok, pos, slot, srcs)):
            st[i * bsz : (i + 1) * bsz] = x
        st[4 * bsz : (4 + nb) * bsz].reshape(bsz, nb)[:] = table

        def inputs(s: Any) -> tuple[Any, ...]:
            cols = [s[i * bsz : (i + 1) * bsz].view(bsz, 1) for i in range(4)]
            return (*cols, s[4 * bsz : (4 + nb) * bsz].view(bsz, nb))

        return (4 + nb) * bsz, inputs
