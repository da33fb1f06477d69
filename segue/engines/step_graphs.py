"""CUDA graphs of one kind of step of the paged model (decodes, or prompt chunks), one per
shape bucket, captured on first use, and the pinned staging their inputs go through.

A captured step reads its inputs from one flat device buffer of longs (`static`), at offsets
its bucket fixes; the CPU fills a pinned stage, one asynchronous copy moves it, the graph
replays: the CPU queues a step in microseconds, behind the step in flight, never waiting for
it. Two stages by turns: a step is launched before the one before it is done, so that one's
copy may not have been made yet (the one before that is complete: its tokens were read).
Without `capture` (on a CPU, for tests) the step runs eagerly on the same padded inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger("segue.paged")


class StepGraphs:
    def __init__(
        self, torch: Any, device: Any, size: int, pool: list[Any], kind: str, capture: bool
    ) -> None:
        self.torch = torch
        self.kind, self.capture = kind, capture
        self.static = torch.zeros(size, dtype=torch.long, device=device)
        self._stages = [torch.zeros(size, dtype=torch.long, pin_memory=capture) for _ in "ab"]
        self._turn = 0
        self._pool = pool  # one graph memory pool, shared by every StepGraphs of a model
        self._graphs: dict[Hashable, tuple[Any, Any]] = {}

    def stage(self) -> Any:
        """The pinned buffer (numpy, flat) to fill with the next replay's inputs."""
        self._turn ^= 1
        return self._stages[self._turn].numpy()

    def replay(
        self,
        key: Hashable,
        n: int,
        inputs: Callable[[Any], tuple[Any, ...]],
        step: Callable[..., Any],
        keep: Any,
    ) -> Any:
        """Copies the stage's first `n` values to `static` and replays `key`'s graph of
        `step(*inputs(static))`, capturing it first if new; returns its output tensor (the
        graph's own: rewritten by its next replay). `keep`: a tensor the step also writes,
        put back after a capture (capturing runs the step three times on the inputs)."""
        self.static[:n].copy_(self._stages[self._turn][:n], non_blocking=True)
        if not self.capture:
            return step(*inputs(self.static))
        found = self._graphs.get(key)
        if found is None:
            found = self._graphs[key] = self._capture(inputs(self.static), step, keep)
            log.info("captured a %s graph for %s", self.kind, key)
        graph, out = found
        graph.replay()
        return out

    def graph(self, key: Hashable) -> Any:
        return self._graphs[key][0]

    def _capture(self, args: tuple[Any, ...], step: Callable[..., Any], keep: Any) -> tuple:
        """Each run writes the same K/V to the same slots: harmless."""
        torch = self.torch
        saved = keep.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up runs, as CUDA graphs need
                keep.copy_(saved)
                step(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if not self._pool:
            self._pool.append(torch.cuda.graph_pool_handle())
        keep.copy_(saved)
        with torch.cuda.graph(graph, pool=self._pool[0]):
            out = step(*args)
        keep.copy_(saved)
        return graph, out
