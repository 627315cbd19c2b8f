"""Temperature sampling of whole rows in three small Triton kernels (CUDA only; used by ``sampler.sample``).

Same rule as the torch path: with p = softmax(logits / T), the token is the first index whose running sum of p
exceeds u * sum(p), for the row's one uniform u; its log-probability is log_softmax(logits) at that index (raw,
before temperature). The vocabulary is cut into chunks, one program per (row, chunk), so a step of one sequence
still spreads its row over many multiprocessors:

  chunk_max    per (row, chunk): the chunk's max logit
  chunk_sums   per (row, chunk): with the row max m, the chunk's sum of exp((x - m) / T) and of exp(x - m)
  pick         per row: fp64 running sums of the chunk sums find the chunk holding u * total, a scan inside it
               finds the token; the raw sums give its log-probability

The torch path builds a (rows, vocab) fp64 cumulative sum; here the logits are read twice plus one chunk per row.
The chunk sums are the last entries of the same fp32 scan the pick kernel repeats inside its chunk, so the two
agree to fp64 rounding; a target that rounding puts past its chunk's end takes the chunk's last token of
non-zero probability.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048  # vocabulary entries per chunk


@triton.jit
def _chunk_max_kernel(logits_ptr, cmax_ptr, vocab, stride, n_chunks, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    ch = tl.program_id(1)
    c = ch * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + row.to(tl.int64) * stride + c, mask=c < vocab, other=float("-inf"))
    tl.store(cmax_ptr + row * n_chunks + ch, tl.max(x, axis=0))


@triton.jit
def _row_max(cmax_ptr, row, n_chunks, BLOCK_C: tl.constexpr):
    j = tl.arange(0, BLOCK_C)
    return tl.max(tl.load(cmax_ptr + row * n_chunks + j, mask=j < n_chunks, other=float("-inf")), axis=0)


@triton.jit
def _chunk_sums_kernel(logits_ptr, cmax_ptr, tot_ptr, raw_ptr, vocab, stride, n_chunks, inv_temp,
                       BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    ch = tl.program_id(1)
    m = _row_max(cmax_ptr, row, n_chunks, BLOCK_C)  # raw max; the tempered max is m * inv_temp (inv_temp > 0)
    c = ch * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + row.to(tl.int64) * stride + c, mask=c < vocab, other=float("-inf"))
    p = tl.exp((x - m) * inv_temp)
    tl.store(tot_ptr + row * n_chunks + ch, tl.max(tl.cumsum(p, axis=0), axis=0).to(tl.float64))
    tl.store(raw_ptr + row * n_chunks + ch, tl.sum(tl.exp(x - m), axis=0))


@triton.jit
def _pick_kernel(logits_ptr, cmax_ptr, tot_ptr, raw_ptr, u_ptr, tokens_ptr, logprobs_ptr, vocab, stride,
                 n_chunks, inv_temp, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    m = _row_max(cmax_ptr, row, n_chunks, BLOCK_C)
    j = tl.arange(0, BLOCK_C)
    jm = j < n_chunks
    tot = tl.load(tot_ptr + row * n_chunks + j, mask=jm, other=0.0)  # (C,) fp64
    incl = tl.cumsum(tot, axis=0)
    target = tl.load(u_ptr + row) * tl.max(incl, axis=0)  # u * total: the sums are >= 0, so max is the last
    ch = tl.minimum(tl.min(tl.where(jm & (incl > target), j, BLOCK_C), axis=0), n_chunks - 1)
    run = tl.sum(tl.where(j == ch, incl - tot, 0.0), axis=0)  # mass before the chunk
    c = tl.arange(0, BLOCK)
    v = ch * BLOCK + c
    x = tl.load(base + v, mask=v < vocab, other=float("-inf"))
    p = tl.exp((x - m) * inv_temp)
    over = (run + tl.cumsum(p, axis=0).to(tl.float64)) > target
    first = tl.min(tl.where(over, c, BLOCK), axis=0)
    last = tl.max(tl.where(p > 0, c, -1), axis=0)  # rounding put the target past the chunk: its last live token
    token = ch * BLOCK + tl.where(first < BLOCK, first, tl.maximum(last, 0))
    token = tl.minimum(token, vocab - 1)
    raw = tl.sum(tl.load(raw_ptr + row * n_chunks + j, mask=jm, other=0.0), axis=0)
    x_tok = tl.load(base + token)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, x_tok - m - tl.log(raw))


def sample_rows(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, V) fp32 logits, (M,) fp64 uniforms -> (M,) int64 tokens and (M,) fp32 raw log-probabilities."""
    m, vocab = logits.shape
    device = logits.device
    block = min(_BLOCK, triton.next_power_of_2(vocab))
    n_chunks = triton.cdiv(vocab, block)
    block_c = max(2, triton.next_power_of_2(n_chunks))
    cmax = torch.empty(m, n_chunks, dtype=torch.float32, device=device)  # (M, C)
    tot = torch.empty(m, n_chunks, dtype=torch.float64, device=device)  # (M, C) tempered chunk sums
    raw = torch.empty(m, n_chunks, dtype=torch.float32, device=device)  # (M, C) untempered chunk sums
    tokens = torch.empty(m, dtype=torch.long, device=device)
    logprobs = torch.empty(m, dtype=torch.float32, device=device)
    inv_temp = 1.0 / temperature
    _chunk_max_kernel[(m, n_chunks)](logits, cmax, vocab, logits.stride(0), n_chunks, BLOCK=block, num_warps=4)
    _chunk_sums_kernel[(m, n_chunks)](logits, cmax, tot, raw, vocab, logits.stride(0), n_chunks, inv_temp,
                                      BLOCK=block, BLOCK_C=block_c, num_warps=4)
    _pick_kernel[(m,)](logits, cmax, tot, raw, uniforms, tokens, logprobs, vocab, logits.stride(0), n_chunks,
                       inv_temp, BLOCK=block, BLOCK_C=block_c, num_warps=4)
    return tokens, logprobs
