"""Temperature sampling of whole rows in one Triton kernel (CUDA only; used by ``sampler.sample``).

Same rule as the torch path: with p = softmax(logits / T), the token is the first index whose running sum of p
exceeds u * sum(p), for the row's one uniform u; its log-probability is log_softmax(logits) at that index (raw,
before temperature). The torch path builds a (rows, vocab) fp64 cumulative sum; here each program walks its row
in chunks (max, then chunk sums, then the search), so a step reads the logits three times and writes two
numbers per row. Running sums are fp64 and the chunk totals are the same numbers in the sum and in the search,
so the search always ends inside the row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 4096  # vocabulary entries per chunk


@triton.jit
def _sample_kernel(logits_ptr, u_ptr, tokens_ptr, logprobs_ptr, vocab, stride, inv_temp, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    c = tl.arange(0, BLOCK)
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    for v0 in range(0, vocab, BLOCK):
        x = tl.load(base + v0 + c, mask=v0 + c < vocab, other=float("-inf"))
        mx = tl.maximum(mx, x)
    m = tl.max(mx, axis=0)  # raw max; the tempered max is m * inv_temp (inv_temp > 0)
    total = tl.zeros([1], tl.float64)
    raw = tl.zeros([BLOCK], tl.float32)
    for v0 in range(0, vocab, BLOCK):
        x = tl.load(base + v0 + c, mask=v0 + c < vocab, other=float("-inf"))
        p = tl.exp((x - m) * inv_temp)
        total += tl.max(tl.cumsum(p, axis=0), axis=0).to(tl.float64)
        raw += tl.exp(x - m)
    target = tl.load(u_ptr + row) * total  # (1,) fp64
    run = tl.zeros([1], tl.float64)
    token = tl.full([1], -1, tl.int32)
    for v0 in range(0, vocab, BLOCK):
        x = tl.load(base + v0 + c, mask=v0 + c < vocab, other=float("-inf"))
        csum = tl.cumsum(tl.exp((x - m) * inv_temp), axis=0)
        over = (run + csum.to(tl.float64)) > target  # (BLOCK,)
        first = tl.min(tl.where(over, c, BLOCK), axis=0)
        token = tl.where((token < 0) & (first < BLOCK), v0 + first, token)
        run += tl.max(csum, axis=0).to(tl.float64)
    token = tl.where(token < 0, vocab - 1, token)
    x_tok = tl.load(base + token)
    tl.store(tokens_ptr + row + tl.arange(0, 1), token.to(tl.int64))
    tl.store(logprobs_ptr + row + tl.arange(0, 1), x_tok - m - tl.log(tl.sum(raw, axis=0)))


def sample_rows(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, V) fp32 logits, (M,) fp64 uniforms -> (M,) int64 tokens and (M,) fp32 raw log-probabilities."""
    m, vocab = logits.shape
    tokens = torch.empty(m, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(m, dtype=torch.float32, device=logits.device)
    _sample_kernel[(m,)](logits, uniforms, tokens, logprobs, vocab, logits.stride(0), 1.0 / temperature,
                         BLOCK=min(_BLOCK, triton.next_power_of_2(vocab)), num_warps=8)
    return tokens, logprobs
