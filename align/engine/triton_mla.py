"""Triton kernels for absorbed-MLA decode over the paged latent cache (CUDA only).

  prep     per new token: RMSNorm of c_kv and rope of k_pe, written straight into the token's cache slot, and the
           rope of every head's q_pe, in place
  decode   per (sequence, split of its context): the absorbed query of all heads, [q_lat | q_pe] (Hn, R+Dr),
           against the sequence's cached [c_kv | k_pe] entries read through its block table; online softmax;
           the output stays in latent space (Hn, R). Splitting the context gives short batches enough programs
  reduce   per (sequence, head): merge the splits by their log-sum-exp into out_lat (Hn, B, R)

Nothing is gathered into a padded context tensor and keys past a sequence's length are never read, so the
cost follows the real context lengths, not the padded bucket a CUDA graph was captured for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _prep_kernel(kv_ptr, q_ptr, norm_w_ptr, rope_ptr, slots_ptr, cache_ptr, eps, stride_kv, stride_qn,
                 stride_qh, stride_cache, num_heads, R: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    n = tl.program_id(0)
    dt = cache_ptr.dtype.element_ty
    slot = tl.load(slots_ptr + n).to(tl.int64)
    row = cache_ptr + slot * stride_cache
    # c_kv: RMSNorm in fp32, round, times the weight, round (as ops.rms_norm).
    r = tl.arange(0, BLOCK_R)
    rm = r < R
    c = tl.load(kv_ptr + n * stride_kv + r, mask=rm, other=0.0).to(tl.float32)
    var = tl.sum(c * c, axis=0) / R
    normed = (c * tl.math.rsqrt(var + eps)).to(dt).to(tl.float32)
    w = tl.load(norm_w_ptr + r, mask=rm, other=0.0).to(tl.float32)
    tl.store(row + r, (w * normed).to(dt), mask=rm)
    # Rope on adjacent pairs (x0, x1) as complex numbers; rope_ptr holds (cos, sin) * attention_scaling pairs.
    j = tl.arange(0, BLOCK_HALF)
    jm = j < DR // 2
    fr = tl.load(rope_ptr + n * DR + 2 * j, mask=jm, other=0.0)
    fi = tl.load(rope_ptr + n * DR + 2 * j + 1, mask=jm, other=0.0)
    ke = tl.load(kv_ptr + n * stride_kv + R + 2 * j, mask=jm, other=0.0).to(tl.float32)
    ko = tl.load(kv_ptr + n * stride_kv + R + 2 * j + 1, mask=jm, other=0.0).to(tl.float32)
    tl.store(row + R + 2 * j, (ke * fr - ko * fi).to(dt), mask=jm)
    tl.store(row + R + 2 * j + 1, (ke * fi + ko * fr).to(dt), mask=jm)
    h = tl.arange(0, BLOCK_H)
    qm = (h < num_heads)[:, None] & jm[None, :]
    qp = q_ptr + n * stride_qn + h[:, None] * stride_qh + DN + 2 * j[None, :]  # (H, Dr/2) even elements
    qe = tl.load(qp, mask=qm, other=0.0).to(tl.float32)
    qo = tl.load(qp + 1, mask=qm, other=0.0).to(tl.float32)
    tl.store(qp, (qe * fr[None, :] - qo * fi[None, :]).to(dt), mask=qm)
    tl.store(qp + 1, (qe * fi[None, :] + qo * fr[None, :]).to(dt), mask=qm)


@triton.jit
def _decode_kernel(qlat_ptr, q_ptr, cache_ptr, tables_ptr, ctx_ptr, o_ptr, lse_ptr, scale, split_len,
                   num_heads, stride_qlh, stride_qlb, stride_qn, stride_qh, stride_cache, stride_tb,
                   stride_ob, stride_os, stride_oh, stride_lb, stride_ls,
                   R: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_N: tl.constexpr,
                   PREC: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1)
    ctx = tl.load(ctx_ptr + b).to(tl.int32)
    lo = s * split_len
    hi = tl.minimum(lo + split_len, ctx)
    h = tl.arange(0, BLOCK_H)
    hm = h < num_heads
    r = tl.arange(0, BLOCK_R)
    rm = r < R
    d = tl.arange(0, BLOCK_DR)
    dm = d < DR
    q_lat = tl.load(qlat_ptr + h[:, None] * stride_qlh + b * stride_qlb + r[None, :],
                    mask=hm[:, None] & rm[None, :], other=0.0)  # (H, R)
    q_pe = tl.load(q_ptr + b * stride_qn + h[:, None] * stride_qh + DN + d[None, :],
                   mask=hm[:, None] & dm[None, :], other=0.0)  # (H, Dr), rope applied by the prep kernel
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        tm = t < hi
        block = tl.load(tables_ptr + b * stride_tb + t // BLOCK_SIZE, mask=tm, other=0)
        key = cache_ptr + (block.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE)[:, None] * stride_cache  # (N, 1)
        k_c = tl.load(key + r[None, :], mask=tm[:, None] & rm[None, :], other=0.0)  # (N, R) latent = value
        k_pe = tl.load(key + R + d[None, :], mask=tm[:, None] & dm[None, :], other=0.0)  # (N, Dr)
        scores = tl.dot(q_lat, tl.trans(k_c), input_precision=PREC)
        scores = tl.dot(q_pe, tl.trans(k_pe), scores, input_precision=PREC) * scale  # (H, N)
        scores = tl.where(tm[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: every block holds a visible key
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(k_c.dtype), k_c, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    seen = l_i > 0  # a split past the sequence's end saw nothing
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(o_ptr + b * stride_ob + s * stride_os + h[:, None] * stride_oh + r[None, :], out,
             mask=hm[:, None] & rm[None, :])
    tl.store(lse_ptr + b * stride_lb + s * stride_ls + h, lse, mask=hm)


@triton.jit
def _reduce_kernel(o_ptr, lse_ptr, out_ptr, n_splits, stride_ob, stride_os, stride_oh, stride_lb, stride_ls,
                   stride_outh, stride_outb, R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    sm = s < n_splits
    r = tl.arange(0, BLOCK_R)
    rm = r < R
    lse = tl.load(lse_ptr + b * stride_lb + s * stride_ls + h, mask=sm, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, axis=0))  # split 0 always holds key 0, so the max is finite
    w = w / tl.sum(w, axis=0)
    o = tl.load(o_ptr + b * stride_ob + s[:, None] * stride_os + h * stride_oh + r[None, :],
                mask=sm[:, None] & rm[None, :], other=0.0)
    out = tl.sum(o * w[:, None], axis=0)
    tl.store(out_ptr + h * stride_outh + b * stride_outb + r, out.to(out_ptr.dtype.element_ty), mask=rm)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def mla_prep(kv: torch.Tensor, q: torch.Tensor, norm_w: torch.Tensor, rope: torch.Tensor, slots: torch.Tensor,
             cache: torch.Tensor, eps: float, nope_dim: int) -> None:
    """kv (N, R+Dr) = [c_kv | k_pe] before norm and rope; q (N, Hn, Dn+Dr), its q_pe rotated in place;
    rope (N, Dr/2, 2) fp32; cache (slots, R+Dr) one layer's entries, written at ``slots`` (N,)."""
    n, width = kv.shape
    num_heads, dq = q.shape[1], q.shape[2]
    dr = dq - nope_dim
    rank = width - dr
    _prep_kernel[(n,)](kv, q, norm_w, rope, slots, cache, eps, kv.stride(0), q.stride(0), q.stride(1),
                       cache.stride(0), num_heads, R=rank, DN=nope_dim, DR=dr, BLOCK_R=_pow2(rank, 1),
                       BLOCK_HALF=_pow2(dr // 2, 1), BLOCK_H=_pow2(num_heads, 1), num_warps=4)


# Tile of the decode kernel (bf16/fp16; fp32 halves block_n) and programs aimed for per SM when a batch is too
# small to fill the GPU with one program per sequence. Measured on an H200, see BENCHMARKS.md.
TILES = dict(block_n=32, num_warps=4, num_stages=2, programs_per_sm=1)


def split_len(batch: int, context: int, block_n: int, num_sms: int, per_sm: int) -> int:
    """Keys per program: short batches split their context so that about ``per_sm`` programs run per SM."""
    splits = max(1, min(triton.cdiv(context, block_n), triton.cdiv(per_sm * num_sms, batch)))
    return triton.cdiv(triton.cdiv(context, splits), block_n) * block_n


def mla_decode(q_lat: torch.Tensor, q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
               context_lens: torch.Tensor, block_size: int, max_context: int, scale: float, nope_dim: int,
               num_sms: int) -> torch.Tensor:
    """Absorbed attention of one new token per sequence.

    q_lat (Hn, B, R) = q_nope W_UK; q (B, Hn, Dn+Dr) holding rotated q_pe; cache (slots, R+Dr) one layer;
    block_tables (B, max_blocks); context_lens (B,) keys per sequence (<= max_context). -> out_lat (Hn, B, R).
    """
    num_heads, b, rank = q_lat.shape
    dr = q.shape[2] - nope_dim
    fp32 = q.dtype == torch.float32
    t = TILES
    block_n = t["block_n"] // 2 if fp32 else t["block_n"]
    per_split = split_len(b, max_context, block_n, num_sms, t["programs_per_sm"])
    splits = triton.cdiv(max_context, per_split)
    block_h, block_r = _pow2(num_heads), _pow2(rank)
    o = torch.empty(b, splits, num_heads, rank, dtype=torch.float32, device=q.device)  # (B, S, Hn, R)
    lse = torch.empty(b, splits, num_heads, dtype=torch.float32, device=q.device)  # (B, S, Hn)
    _decode_kernel[(b, splits)](
        q_lat, q, cache, block_tables, context_lens, o, lse, scale, per_split, num_heads, q_lat.stride(0),
        q_lat.stride(1), q.stride(0), q.stride(1), cache.stride(0), block_tables.stride(0), o.stride(0),
        o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), R=rank, DN=nope_dim, DR=dr, BLOCK_SIZE=block_size,
        BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_DR=_pow2(dr), BLOCK_N=block_n, PREC="ieee" if fp32 else "tf32",
        num_warps=min(t["num_warps"], 4) if block_r <= 256 else t["num_warps"], num_stages=t["num_stages"])
    out = torch.empty(num_heads, b, rank, dtype=q.dtype, device=q.device)  # (Hn, B, R)
    _reduce_kernel[(b, num_heads)](o, lse, out, splits, o.stride(0), o.stride(1), o.stride(2), lse.stride(0),
                                   lse.stride(1), out.stride(0), out.stride(1), R=rank,
                                   BLOCK_S=triton.next_power_of_2(splits), BLOCK_R=block_r, num_warps=4)
    return out
