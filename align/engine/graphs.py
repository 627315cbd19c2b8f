"""Decode steps replayed from CUDA graphs.

A decode step launches a couple of thousand small kernels for a DeepSeek-V2-Lite-sized model; replaying them
from a captured graph removes the launch and Python overhead that otherwise dominates. Graphs need fixed
shapes and fixed tensor addresses, so a decode step is padded to a bucket: the batch to a power of two and the
context to a power of two of blocks. Inputs are copied into static buffers that the graphs read; padded rows
write their latent entry to a scratch block no sequence owns and attend to one key. One graph is captured per
bucket on first use and replayed afterwards. The weights and cache are updated in place (``load_weights``
never re-allocates), so captured graphs stay valid across weight swaps.

Without CUDA (``capture=False``) the same padded static path runs eagerly, which is how it is tested on CPU.
"""

from __future__ import annotations

import logging

import torch

from .runner import ModelRunner

log = logging.getLogger(__name__)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_num_seqs: int, max_blocks_per_seq: int, scratch_block: int,
                 capture: bool):
        device = runner.device
        self.runner = runner
        self.block_size = runner.cache.block_size
        self.max_batch = _next_pow2(max_num_seqs)
        self.max_blocks = _next_pow2(max_blocks_per_seq)
        self.scratch_slot = scratch_block * self.block_size
        self.capture = capture
        b = self.max_batch
        # Token ids, positions, cache slots and context lengths: rows of one tensor, filled by one copy a step.
        self.inputs = torch.zeros(4, b, dtype=torch.long, device=device)  # (4, B)
        self.ids, self.positions, self.slots, self.context_lens = self.inputs.unbind(0)
        self.slots.fill_(self.scratch_slot)
        self.context_lens.fill_(1)
        self.tables = torch.zeros(b, self.max_blocks, dtype=torch.long, device=device)
        # Host copies of the block tables; a row is rewritten only when its sequence's table changed (a new block
        # every block_size tokens, or another sequence in that row), then all rows go over in one copy. Two
        # copies, used in turn: with the engine's look-ahead a step is queued while the one before it is still
        # on the device, so a buffer is rewritten only once the step before last, its last reader, has finished.
        self.host_tables = [torch.zeros(b, self.max_blocks, dtype=torch.long, pin_memory=capture) for _ in range(2)]
        self.host_rows: list[list[list[int]]] = [[[] for _ in range(b)] for _ in range(2)]
        self.turn = 0
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.pool = None

    def reset(self) -> None:
        """Drop every captured graph and their memory pool; the next steps capture afresh (after a change to
        the code a step runs, e.g. a kernel switched on or off)."""
        if self.capture:
            torch.cuda.synchronize(self.runner.device)
        self.graphs.clear()
        self.outputs.clear()
        self.pool = None

    def fits(self, num_seqs: int, max_context: int) -> bool:
        return num_seqs <= self.max_batch and -(-max_context // self.block_size) <= self.max_blocks

    def run(self, ids: list[int] | torch.Tensor, positions: list[int], tables: list[list[int]]):
        """One decode step; returns fp32 logits (B, V) and routed experts (B, n_moe, k) (or None).

        ``ids`` may be a (B,) device tensor (the previous step's sampled tokens, not yet read by the host).
        """
        b = len(positions)
        ctx = [p + 1 for p in positions]
        nb = _next_pow2(-(-max(ctx) // self.block_size))
        bp = _next_pow2(b)
        key = (bp, nb)
        bs = self.block_size
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions)]
        # Padded rows: token 0 at position 0, written to the scratch slot, attending to one key of block 0.
        pad = bp - b
        rows, host = self.host_rows[self.turn], self.host_tables[self.turn]
        self.turn ^= 1
        for i, t in enumerate(tables):
            if rows[i] != t:
                row = t[:self.max_blocks]
                host[i, :len(row)] = torch.tensor(row, dtype=torch.long)
                rows[i] = list(t)
        for i in range(b, bp):
            if rows[i]:
                host[i].zero_()
                rows[i] = []
        self.tables[:bp].copy_(host[:bp], non_blocking=True)
        on_device = isinstance(ids, torch.Tensor)
        packed = torch.tensor([([0] * b if on_device else ids) + [0] * pad, positions + [0] * pad,
                               slots + [self.scratch_slot] * pad, ctx + [1] * pad], dtype=torch.long)  # (4, Bp)
        self.inputs[:, :bp].copy_(packed, non_blocking=True)  # pageable source: staged before this returns
        if on_device:
            self.ids[:b].copy_(ids)
        if not self.capture:
            logits, routing = self._forward(bp, nb)
        else:
            if key not in self.graphs:
                self._capture(key)
            self.graphs[key].replay()
            logits, routing = self.outputs[key]
        return logits[:b], None if routing is None else routing[:b]

    def _forward(self, bp: int, nb: int):
        r = self.runner
        batch = r.static_batch(self.positions[:bp], self.slots[:bp], self.tables[:bp, :nb],
                               self.context_lens[:bp], nb * self.block_size)
        # Routing is always recorded: a graph cannot decide per step, and it is one small tensor.
        return r.forward(self.ids[:bp], batch, None, record_routing=True)

    def _capture(self, key: tuple[int, int]) -> None:
        # Warm up on a side stream (lazy inits, workspace allocations) before capturing. Both the warm-up and
        # the capture run on this step's real inputs: their cache writes are the ones the step makes anyway.
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):
            self._forward(*key)
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a trainer thread may run kernels beside a capture on a background rollout's stream.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = self._forward(*key)
        except RuntimeError as e:
            raise RuntimeError(f"capturing a decode step failed ({e}); build the engine with cuda_graphs=False "
                               "to decode eagerly") from e
        self.pool = graph.pool()
        self.graphs[key] = graph
        self.outputs[key] = out
        log.debug("captured a decode graph for batch %d x %d blocks", *key)
