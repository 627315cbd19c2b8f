"""Reading a step's sampled tokens back to the host without waiting behind the steps queued after it.

A copy to pageable host memory returns only once it is done, and it is done only once everything queued
before it on the stream is: with the engine's look-ahead that includes the *next* decode step, so the host
would learn step k's tokens only after step k+1 had run, and the device would then idle while the host did its
per-step work. ``Readback`` queues the copies into pinned memory right after the step's sampling, before the
next step is queued, and records an event; ``result`` waits for that event alone.
"""

from __future__ import annotations

import torch


class Readback:
    """(M,) tokens, (M,) log-probs and optional (M, n_moe, k) routing, on their way to the host."""

    def __init__(self, tokens: torch.Tensor, logprobs: torch.Tensor, routing: torch.Tensor | None = None):
        both = torch.stack([tokens.double(), logprobs.double()])  # (2, M): ids are exact in fp64
        self._done = None
        if both.is_cuda:
            self._both = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
            self._both.copy_(both, non_blocking=True)
            self._routing = None
            if routing is not None:  # a graph's routing output is overwritten by its next replay: copy it now
                self._routing = torch.empty(routing.shape, dtype=routing.dtype, pin_memory=True)
                self._routing.copy_(routing, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._both = both
            self._routing = None if routing is None else routing.clone()

    def result(self) -> tuple[list[int], list[float], torch.Tensor | None]:
        """Token ids, log-probs (Python lists) and routing (host tensor or None); waits for the copies only."""
        if self._done is not None:
            self._done.synchronize()
        return self._both[0].long().tolist(), self._both[1].float().tolist(), self._routing
