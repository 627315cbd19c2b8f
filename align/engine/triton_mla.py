"""Triton kernels for absorbed-MLA decode over the paged latent cache (CUDA only).

  prep     per (block of new tokens, head): RMSNorm of c_kv and rope of k_pe, written straight into the tokens'
           cache slots (head 0; an FP8 cache gets the entry divided by its scale, amax / 448, and the scale),
           the rope of the head's q_pe, in place, and for decode the absorbed query q_lat = q_nope W_UK, one
           chunk of latent columns per program (no separate batched matmul)
  decode   per (sequence, split of its context): the absorbed query of all heads, [q_lat | q_pe] (Hn, R+Dr),
           against the sequence's cached [c_kv | k_pe] entries read through its block table (FP8 entries
           times their scale, rounded to the compute dtype, as LatentCache.gather does); online softmax;
           the output stays in latent space (Hn, R). Splitting the context gives short batches enough programs
  reduce   per (block of sequences, head, value columns): merge the splits by their log-sum-exp into out_lat,
           round it, and multiply by the head's W_UV, writing (B, Hn*Dv) as o_proj reads it

Nothing is gathered into a padded context tensor and keys past a sequence's length are never read, so the
cost follows the real context lengths, not the padded bucket a CUDA graph was captured for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _prep_kernel(kv_ptr, q_ptr, norm_w_ptr, rope_ptr, slots_ptr, cache_ptr, scale_ptr, w_uk_ptr, q_lat_ptr, eps,
                 n_tokens, stride_kv, stride_qn, stride_qh, stride_cache, stride_wh, stride_wd, stride_lh, stride_ln,
                 R: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, BLOCK_DN: tl.constexpr, BLOCK_RC: tl.constexpr, Q_LAT: tl.constexpr,
                 FP8: tl.constexpr, PREC: tl.constexpr):
    """Programs (token block, head, latent column chunk). FP8: the cache holds float8_e4m3 bytes (uint8) and
    scale_ptr one float32 scale per slot."""
    h = tl.program_id(1)
    rc = tl.program_id(2)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < n_tokens
    dt = q_ptr.dtype.element_ty  # the compute dtype (a bf16/fp32 cache has it too)
    # Rope on adjacent pairs (x0, x1) as complex numbers; rope_ptr holds (cos, sin) * attention_scaling pairs.
    j = tl.arange(0, BLOCK_HALF)
    pm = tm[:, None] & (j < DR // 2)[None, :]
    fr = tl.load(rope_ptr + t[:, None] * DR + 2 * j[None, :], mask=pm, other=0.0)  # (T, Dr/2)
    fi = tl.load(rope_ptr + t[:, None] * DR + 2 * j[None, :] + 1, mask=pm, other=0.0)
    if (h == 0) & (rc == 0):  # the tokens' cache entries
        slot = tl.load(slots_ptr + t, mask=tm, other=0).to(tl.int64)  # (T,)
        row = cache_ptr + slot[:, None] * stride_cache  # (T, 1)
        kv_row = kv_ptr + t[:, None] * stride_kv
        # c_kv: RMSNorm in fp32, round, times the weight, round (as ops.rms_norm).
        r = tl.arange(0, BLOCK_R)
        cm = tm[:, None] & (r < R)[None, :]
        c = tl.load(kv_row + r[None, :], mask=cm, other=0.0).to(tl.float32)  # (T, R)
        var = tl.sum(c * c, axis=1) / R
        normed = (c * tl.math.rsqrt(var + eps)[:, None]).to(dt).to(tl.float32)
        w = tl.load(norm_w_ptr + r, mask=r < R, other=0.0).to(tl.float32)
        c_kv = (w[None, :] * normed).to(dt)  # (T, R); masked rows and columns are 0
        ke = tl.load(kv_row + R + 2 * j[None, :], mask=pm, other=0.0).to(tl.float32)
        ko = tl.load(kv_row + R + 2 * j[None, :] + 1, mask=pm, other=0.0).to(tl.float32)
        pe_e, pe_o = (ke * fr - ko * fi).to(dt), (ke * fi + ko * fr).to(dt)  # (T, Dr/2) even, odd of k_pe
        if FP8:  # cache.quantize_fp8 of the rounded entry: scale = amax / 448, values = entry / scale
            c_kv, pe_e, pe_o = c_kv.to(tl.float32), pe_e.to(tl.float32), pe_o.to(tl.float32)
            amax = tl.maximum(tl.max(tl.abs(c_kv), axis=1),
                              tl.maximum(tl.max(tl.abs(pe_e), axis=1), tl.max(tl.abs(pe_o), axis=1)))  # (T,)
            sc = tl.maximum(amax, 1e-12) / 448.0
            tl.store(scale_ptr + slot, sc, mask=tm)
            sc = sc[:, None]  # IEEE division, as torch divides: the same FP8 bytes
            c_kv = tl.math.div_rn(c_kv, sc).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
            pe_e = tl.math.div_rn(pe_e, sc).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
            pe_o = tl.math.div_rn(pe_o, sc).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        tl.store(row + r[None, :], c_kv, mask=cm)
        tl.store(row + R + 2 * j[None, :], pe_e, mask=pm)
        tl.store(row + R + 2 * j[None, :] + 1, pe_o, mask=pm)
    q_row = q_ptr + t[:, None] * stride_qn + h * stride_qh  # (T, 1) this head's query
    if rc == 0:  # this head's q_pe, rotated in place
        qe = tl.load(q_row + DN + 2 * j[None, :], mask=pm, other=0.0).to(tl.float32)
        qo = tl.load(q_row + DN + 2 * j[None, :] + 1, mask=pm, other=0.0).to(tl.float32)
        tl.store(q_row + DN + 2 * j[None, :], (qe * fr - qo * fi).to(dt), mask=pm)
        tl.store(q_row + DN + 2 * j[None, :] + 1, (qe * fi + qo * fr).to(dt), mask=pm)
    if Q_LAT:  # q_lat = q_nope W_UK, one chunk of latent columns
        d = tl.arange(0, BLOCK_DN)
        dm = d < DN
        c = rc * BLOCK_RC + tl.arange(0, BLOCK_RC)
        cm = c < R
        q_nope = tl.load(q_row + d[None, :], mask=tm[:, None] & dm[None, :], other=0.0)  # (T, Dn)
        w_uk = tl.load(w_uk_ptr + h * stride_wh + d[:, None] * stride_wd + c[None, :],
                       mask=dm[:, None] & cm[None, :], other=0.0)  # (Dn, C)
        q_lat = tl.dot(q_nope, w_uk, input_precision=PREC)  # (T, C)
        tl.store(q_lat_ptr + h * stride_lh + t[:, None] * stride_ln + c[None, :], q_lat.to(dt),
                 mask=tm[:, None] & cm[None, :])


@triton.jit
def _decode_kernel(qlat_ptr, q_ptr, cache_ptr, kv_scale_ptr, tables_ptr, ctx_ptr, o_ptr, lse_ptr, scale, split_len,
                   num_heads, stride_qlh, stride_qlb, stride_qn, stride_qh, stride_cache, stride_tb,
                   stride_ob, stride_os, stride_oh, stride_lb, stride_ls,
                   R: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_N: tl.constexpr,
                   FP8: tl.constexpr, PREC: tl.constexpr):
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
        slot = block.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE  # (N,)
        key = cache_ptr + slot[:, None] * stride_cache  # (N, 1)
        k_c = tl.load(key + r[None, :], mask=tm[:, None] & rm[None, :], other=0.0)  # (N, R) latent = value
        k_pe = tl.load(key + R + d[None, :], mask=tm[:, None] & dm[None, :], other=0.0)  # (N, Dr)
        if FP8:  # float8_e4m3 bytes times the slot's scale, rounded to the compute dtype
            ks = tl.load(kv_scale_ptr + slot, mask=tm, other=0.0)[:, None]  # (N, 1)
            k_c = (k_c.to(tl.float8e4nv, bitcast=True).to(tl.float32) * ks).to(q_lat.dtype)
            k_pe = (k_pe.to(tl.float8e4nv, bitcast=True).to(tl.float32) * ks).to(q_lat.dtype)
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
def _reduce_kernel(o_ptr, lse_ptr, w_uv_ptr, out_ptr, n_seqs, n_splits, stride_ob, stride_os, stride_oh,
                   stride_lb, stride_ls, stride_wh, stride_wr, stride_outb,
                   R: tl.constexpr, DV: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_RC: tl.constexpr, BLOCK_V: tl.constexpr, PREC: tl.constexpr):
    """Programs (block of sequences, head, value column chunk). BLOCK_B = 1: the product with W_UV as a
    broadcast sum (small batches, many splits); BLOCK_B >= 16: as tl.dot over the block's sequences."""
    h = tl.program_id(1)
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    bm = b < n_seqs
    s = tl.arange(0, BLOCK_S)
    sm = s < n_splits
    lse = tl.load(lse_ptr + b[:, None] * stride_lb + s[None, :] * stride_ls + h, mask=bm[:, None] & sm[None, :],
                  other=float("-inf"))  # (B, S)
    m = tl.where(bm, tl.max(lse, axis=1), 0.0)  # split 0 always holds key 0, so a real sequence's max is finite
    w = tl.exp(lse - m[:, None])
    w = w / tl.where(bm, tl.sum(w, axis=1), 1.0)[:, None]  # (B, S) each split's share
    v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    vm = v < DV
    dt = out_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_B, BLOCK_V], tl.float32)
    for r0 in range(0, R, BLOCK_RC):
        r = r0 + tl.arange(0, BLOCK_RC)
        rm = r < R
        o = tl.load(o_ptr + b[:, None, None] * stride_ob + s[None, :, None] * stride_os + h * stride_oh
                    + r[None, None, :], mask=(bm[:, None] & sm[None, :])[:, :, None] & rm[None, None, :],
                    other=0.0)  # (B, S, C)
        lat = tl.sum(o * w[:, :, None], axis=1).to(dt)  # (B, C) out_lat, rounded as the torch path rounds it
        w_uv = tl.load(w_uv_ptr + h * stride_wh + r[:, None] * stride_wr + v[None, :],
                       mask=rm[:, None] & vm[None, :], other=0.0)  # (C, V)
        if BLOCK_B >= 16:
            acc = tl.dot(lat, w_uv, acc, input_precision=PREC)
        else:
            acc += tl.sum(lat.to(tl.float32)[:, :, None] * w_uv.to(tl.float32)[None, :, :], axis=1)
    tl.store(out_ptr + b[:, None] * stride_outb + h * DV + v[None, :], acc.to(dt), mask=bm[:, None] & vm[None, :])


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _scales(cache: torch.Tensor, kv_scale: torch.Tensor | None) -> torch.Tensor:
    """The scale pointer the kernels take: an FP8 cache's (slots,) scales, else any tensor (never read)."""
    if kv_scale is None:
        return cache
    if cache.dtype != torch.uint8 or kv_scale.dtype != torch.float32 or kv_scale.shape != cache.shape[:1]:
        raise ValueError(f"an FP8 cache is uint8 (slots, R+Dr) with float32 (slots,) scales, got {cache.dtype} "
                         f"{tuple(cache.shape)} and {kv_scale.dtype} {tuple(kv_scale.shape)}")
    return kv_scale


def mla_prep(kv: torch.Tensor, q: torch.Tensor, norm_w: torch.Tensor, rope: torch.Tensor, slots: torch.Tensor,
             cache: torch.Tensor, eps: float, nope_dim: int, w_uk: torch.Tensor | None = None,
             kv_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """kv (N, R+Dr) = [c_kv | k_pe] before norm and rope; q (N, Hn, Dn+Dr), its q_pe rotated in place;
    rope (N, Dr/2, 2) fp32; cache (slots, R+Dr) one layer's entries, written at ``slots`` (N,): in q's dtype, or
    FP8 bytes (uint8) with ``kv_scale`` (slots,) float32 receiving each entry's scale.
    With ``w_uk`` (Hn, Dn, R) also returns the absorbed query q_lat = q_nope W_UK, (Hn, N, R)."""
    n, width = kv.shape
    num_heads, dq = q.shape[1], q.shape[2]
    dr = dq - nope_dim
    rank = width - dr
    block_t = 16  # tokens per program (the least rows of a tl.dot); 64 was twice as slow at 256 tokens
    block_rc = min(128, _pow2(rank))  # latent columns of q_lat per program
    q_lat = None if w_uk is None else torch.empty(num_heads, n, rank, dtype=q.dtype, device=q.device)  # (Hn, N, R)
    out, w = (q_lat, w_uk) if w_uk is not None else (q, q)  # (unread without w_uk)
    _prep_kernel[(triton.cdiv(n, block_t), num_heads, triton.cdiv(rank, block_rc) if w_uk is not None else 1)](
        kv, q, norm_w, rope, slots, cache, _scales(cache, kv_scale), w, out, eps, n, kv.stride(0), q.stride(0),
        q.stride(1), cache.stride(0), w.stride(0), w.stride(1), out.stride(0), out.stride(1), R=rank, DN=nope_dim,
        DR=dr, BLOCK_T=block_t, BLOCK_R=_pow2(rank, 1), BLOCK_HALF=_pow2(dr // 2, 1), BLOCK_DN=_pow2(nope_dim),
        BLOCK_RC=block_rc, Q_LAT=w_uk is not None, FP8=kv_scale is not None,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)
    return q_lat


# Tile of the decode kernel (bf16/fp16; fp32 halves block_n) and programs aimed for per SM when a batch is too
# small to fill the GPU with one program per sequence. Measured on an H200, see BENCHMARKS.md.
TILES = dict(block_n=32, num_warps=4, num_stages=2, programs_per_sm=1)


def split_len(batch: int, context: int, block_n: int, num_sms: int, per_sm: int) -> int:
    """Keys per program: short batches split their context so that about ``per_sm`` programs run per SM."""
    splits = max(1, min(triton.cdiv(context, block_n), triton.cdiv(per_sm * num_sms, batch)))
    return triton.cdiv(triton.cdiv(context, splits), block_n) * block_n


def mla_decode(q_lat: torch.Tensor, q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
               context_lens: torch.Tensor, block_size: int, max_context: int, scale: float, nope_dim: int,
               num_sms: int, w_uv_t: torch.Tensor, kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed attention of one new token per sequence, up to the value heads.

    q_lat (Hn, B, R) = q_nope W_UK; q (B, Hn, Dn+Dr) holding rotated q_pe; cache (slots, R+Dr) one layer (FP8
    bytes with ``kv_scale`` (slots,), as mla_prep writes them);
    block_tables (B, max_blocks); context_lens (B,) keys per sequence (<= max_context); w_uv_t (Hn, R, Dv).
    -> (B, Hn*Dv): per head out_lat W_UV, laid out as o_proj reads it.
    """
    num_heads, b, rank = q_lat.shape
    dr = q.shape[2] - nope_dim
    dv = w_uv_t.shape[2]
    fp32 = q.dtype == torch.float32
    prec = "ieee" if fp32 else "tf32"
    t = TILES
    block_n = t["block_n"] // 2 if fp32 else t["block_n"]
    per_split = split_len(b, max_context, block_n, num_sms, t["programs_per_sm"])
    splits = triton.cdiv(max_context, per_split)
    block_h, block_r = _pow2(num_heads), _pow2(rank)
    o = torch.empty(b, splits, num_heads, rank, dtype=torch.float32, device=q.device)  # (B, S, Hn, R)
    lse = torch.empty(b, splits, num_heads, dtype=torch.float32, device=q.device)  # (B, S, Hn)
    _decode_kernel[(b, splits)](
        q_lat, q, cache, _scales(cache, kv_scale), block_tables, context_lens, o, lse, scale, per_split, num_heads,
        q_lat.stride(0), q_lat.stride(1), q.stride(0), q.stride(1), cache.stride(0), block_tables.stride(0),
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), R=rank, DN=nope_dim, DR=dr,
        BLOCK_SIZE=block_size, BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_DR=_pow2(dr), BLOCK_N=block_n,
        FP8=kv_scale is not None, PREC=prec,
        num_warps=min(t["num_warps"], 4) if block_r <= 256 else t["num_warps"], num_stages=t["num_stages"])
    out = torch.empty(b, num_heads * dv, dtype=q.dtype, device=q.device)  # (B, Hn*Dv)
    # Small batches (many splits): a program per sequence; larger ones: 16 sequences a program, through tl.dot.
    # Tiles of o and W_UV kept near 8K elements.
    block_b = 1 if b <= 16 else 16
    block_s = triton.next_power_of_2(splits)
    block_v = min(32 if block_b == 1 else 64, _pow2(dv))
    block_rc = max(16, min(block_r, 8192 // max(block_b * block_s, block_v)))
    _reduce_kernel[(triton.cdiv(b, block_b), num_heads, triton.cdiv(dv, block_v))](
        o, lse, w_uv_t, out, b, splits, o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        w_uv_t.stride(0), w_uv_t.stride(1), out.stride(0), R=rank, DV=dv, BLOCK_B=block_b, BLOCK_S=block_s,
        BLOCK_RC=block_rc, BLOCK_V=block_v, PREC=prec, num_warps=4)
    return out
