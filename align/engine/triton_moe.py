"""Triton kernels for the routed experts of a decode step (CUDA only; imported when Triton is there).

A decode step has few tokens, so the routed experts are memory-bound: what matters is that each expert the
batch uses streams its weights once, in tiles spread over every multiprocessor, and that the step launches few
kernels. Per MoE layer:

  route       fp32 router probabilities -> top-k expert ids and weights (greedy or group-limited greedy); a step
              of one routing block (up to 16 tokens at 64 experts) also places its pairs, so place is skipped
  place       a stable counting sort of the (token, expert) pairs by expert, one program per routing block
              (each reads every block's per-expert counts from route): per expert its rows' start and count,
              the list of experts in use, and each pair's row in the sorted order
  gate_up     per (expert in use, column tile): gathered token rows x W_gate / W_up, act(gate) * up
  down        per (expert in use, column tile): act rows x W_down, times the routing weight
  combine     per token: sum of its k expert rows + shared experts + residual, then the next RMSNorm

For steps of a few tokens the shared experts ride in gate_up and down as extra slots over every token, their
width cut into expert-wide ranges (columns for gate_up; for down, summed ranges of the reduction, whose fp32
partial sums combine adds), so every program streams as much weight as a routed expert's, instead of three
more launches whose cuBLAS matmuls stream a one-row weight at a fraction of the bandwidth.

On FP8 weights (``Fp8Weight``, fp8_weights.py) gate_up and down read one byte a weight and dequantise each tile
in registers with its rows' block scales, halving the bytes that bound a decode step.

Rounding follows the torch path (``moe.experts_grouped``): matmul outputs are rounded to the activation dtype
before the activation, the product and the routing weight are applied. No atomics: results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_weights import BLOCK, Fp8Weight
from .triton_fp8 import dequant_tile
from .triton_ops import _rms_norm_store
from .weights import Weight


@triton.jit
def _route_kernel(logits_ptr, idx_ptr, w_ptr, hist_ptr, n_tokens, n_experts, scaling,
                  counts_ptr, starts_ptr, active_ptr, n_active_ptr, sorted_tok_ptr, sorted_w_ptr, pos_ptr,
                  K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, N_GROUP: tl.constexpr,
                  GROUP_SIZE: tl.constexpr, TOPK_GROUP: tl.constexpr, BLOCK_G: tl.constexpr, PLACE: tl.constexpr,
                  BLOCK_A: tl.constexpr):
    """Per block of BLOCK_T tokens: top-k experts and weights, and the block's pairs per expert. ``PLACE`` (the
    step is one block): the placement too, from this block's counts, saving the second launch."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    tmask = t < n_tokens
    emask = e < n_experts
    x = tl.load(logits_ptr + t[:, None] * n_experts + e[None, :], mask=tmask[:, None] & emask[None, :], other=0.0)
    x = tl.where(emask[None, :], x, float("-inf"))
    x = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = x / tl.sum(x, axis=1)[:, None]  # (T, E) softmax, as the reference routes in fp32
    if N_GROUP > 1:
        # Keep the TOPK_GROUP groups with the largest member score; the others' experts score 0.
        gid = e // GROUP_SIZE
        g = tl.arange(0, BLOCK_G)
        gscore = tl.full([BLOCK_T, BLOCK_G], -1.0, tl.float32)
        for gi in tl.static_range(N_GROUP):
            best = tl.max(tl.where((gid == gi)[None, :] & emask[None, :], p, -1.0), axis=1)
            gscore = tl.where(g[None, :] == gi, best[:, None], gscore)
        keep = tl.zeros([BLOCK_T, BLOCK_E], tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            top = tl.max(gscore, axis=1)
            pick = tl.min(tl.where(gscore == top[:, None], g[None, :], BLOCK_G), axis=1)  # (T,)
            keep = tl.where(gid[None, :] == pick[:, None], 1, keep)
            gscore = tl.where(g[None, :] == pick[:, None], -2.0, gscore)
        p = tl.where(keep > 0, p, 0.0)
    p = tl.where(emask[None, :], p, -1.0)
    hist = tl.zeros([BLOCK_E], tl.int32)  # this block's pairs per expert, for the placement kernel
    for j in tl.static_range(K):
        top = tl.max(p, axis=1)
        pick = tl.min(tl.where(p == top[:, None], e[None, :], BLOCK_E), axis=1)
        tl.store(idx_ptr + t * K + j, pick, mask=tmask)
        tl.store(w_ptr + t * K + j, top * scaling, mask=tmask)
        p = tl.where(e[None, :] == pick[:, None], -1.0, p)
        hist += tl.sum(((pick[:, None] == e[None, :]) & tmask[:, None]).to(tl.int32), axis=0)
    tl.store(hist_ptr + tl.program_id(0) * n_experts + e, hist, mask=emask)
    if PLACE:
        tl.debug_barrier()  # the pairs stored above are read back below by other threads of this program
        _place_block(0, hist, tl.cumsum(hist, axis=0) - hist, idx_ptr, w_ptr, n_tokens * K, n_experts, counts_ptr,
                     starts_ptr, active_ptr, n_active_ptr, sorted_tok_ptr, sorted_w_ptr, pos_ptr, K, BLOCK_T * K,
                     BLOCK_A, BLOCK_E)


@triton.jit
def _place_block(c, counts, base, idx_ptr, w_ptr, n_assign, n_experts, counts_ptr, starts_ptr, active_ptr,
                 n_active_ptr, sorted_tok_ptr, sorted_w_ptr, pos_ptr, K: tl.constexpr, PER_BLOCK: tl.constexpr,
                 BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr):
    """Rows in the stable sort by expert of routing block c's pairs; ``counts`` (E,) pairs per expert in the
    step, ``base`` (E,) the first row of this block's pairs of each expert. Block 0 also writes the plan's
    per-expert counts, starts and list of experts in use."""
    e = tl.arange(0, BLOCK_E)
    emask = e < n_experts
    if c == 0:
        starts = tl.cumsum(counts, axis=0) - counts
        tl.store(counts_ptr + e, counts, mask=emask)
        tl.store(starts_ptr + e, starts, mask=emask)
        used = (counts > 0) & emask
        tl.store(active_ptr + tl.cumsum(used.to(tl.int32), axis=0) - 1, e, mask=used)
        tl.store(n_active_ptr, tl.sum(used.to(tl.int32), axis=0))
    i = tl.arange(0, BLOCK_A)
    a = c * PER_BLOCK + i
    valid = (i < PER_BLOCK) & (a < n_assign)
    ea = tl.load(idx_ptr + a, mask=valid, other=-1)
    onehot = (ea[:, None] == e[None, :]).to(tl.int32)  # (A, E)
    before = tl.cumsum(onehot, axis=0) - onehot  # same-expert pairs earlier in this block
    pos = tl.sum(onehot * (before + base[None, :]), axis=1)  # (A,)
    tl.store(pos_ptr + a, pos, mask=valid)
    tl.store(sorted_tok_ptr + pos, a // K, mask=valid)
    tl.store(sorted_w_ptr + pos, tl.load(w_ptr + a, mask=valid, other=0.0), mask=valid)


@triton.jit
def _place_kernel(idx_ptr, w_ptr, hist_ptr, n_assign, n_experts, n_blocks, counts_ptr, starts_ptr, active_ptr,
                  n_active_ptr, sorted_tok_ptr, sorted_w_ptr, pos_ptr, K: tl.constexpr, PER_BLOCK: tl.constexpr,
                  BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
    """Per block of PER_BLOCK (token, slot) pairs: their rows in the stable sort by expert."""
    c = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    emask = e < n_experts
    blk = tl.arange(0, BLOCK_B)
    hist = tl.load(hist_ptr + blk[:, None] * n_experts + e[None, :], mask=(blk < n_blocks)[:, None] & emask[None, :],
                   other=0)  # (blocks, E) pairs per routing block and expert
    counts = tl.sum(hist, axis=0)
    base = tl.cumsum(counts, axis=0) - counts + tl.sum(tl.where((blk < c)[:, None], hist, 0), axis=0)
    _place_block(c, counts, base, idx_ptr, w_ptr, n_assign, n_experts, counts_ptr, starts_ptr, active_ptr,
                 n_active_ptr, sorted_tok_ptr, sorted_w_ptr, pos_ptr, K, PER_BLOCK, BLOCK_A, BLOCK_E)


@triton.jit
def _gate_up_tile(x_ptr, rows_ptr, start, count, wg_ptr, wu_ptr, sg_ptr, su_ptr, out_ptr, hidden, stride_xm,
                  stride_om, n, nmask, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  EVEN_K: tl.constexpr, PREC: tl.constexpr, ALL_ROWS: tl.constexpr, FP8: tl.constexpr):
    """act(x W_gate) * (x W_up) for rows ``rows_ptr[start:start+count]`` of x (``ALL_ROWS``: rows 0..count-1);
    wg/wu_ptr (1, N) weight rows, out_ptr the first output column, rows written at start + r. ``FP8``: the
    weights are float8_e4m3 bytes and sg/su_ptr (1, N) their rows' block scales (``dequant_tile``)."""
    kk = tl.arange(0, BLOCK_K)
    dt = out_ptr.dtype.element_ty
    for m0 in range(0, count, BLOCK_M):
        r = m0 + tl.arange(0, BLOCK_M)
        rmask = r < count
        if ALL_ROWS:
            tok = r
        else:
            tok = tl.load(rows_ptr + start + r, mask=rmask, other=0)
        a_ptr = x_ptr + tok.to(tl.int64)[:, None] * stride_xm
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k = k0 + kk
            if EVEN_K:
                a = tl.load(a_ptr + k[None, :], mask=rmask[:, None], other=0.0)
                wg = tl.load(wg_ptr + k[:, None], mask=nmask[None, :], other=0.0)
                wu = tl.load(wu_ptr + k[:, None], mask=nmask[None, :], other=0.0)
            else:
                kmask = k < hidden
                a = tl.load(a_ptr + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                wg = tl.load(wg_ptr + k[:, None], mask=nmask[None, :] & kmask[:, None], other=0.0)
                wu = tl.load(wu_ptr + k[:, None], mask=nmask[None, :] & kmask[:, None], other=0.0)
            if FP8:
                wg = dequant_tile(wg, sg_ptr, k0, nmask, a.dtype)
                wu = dequant_tile(wu, su_ptr, k0, nmask, a.dtype)
            acc_g = tl.dot(a, wg, acc_g, input_precision=PREC)  # (M, K) x (K, N)
            acc_u = tl.dot(a, wu, acc_u, input_precision=PREC)
        gate = acc_g.to(dt).to(tl.float32)
        up = acc_u.to(dt).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dt).to(tl.float32)  # silu, rounded like F.silu's output
        tl.store(out_ptr + (start + r)[:, None] * stride_om + n[None, :], (act * up).to(dt),
                 mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, out_ptr, sorted_tok_ptr, starts_ptr, counts_ptr, active_ptr, n_active_ptr,
                    hidden, inter, stride_xm, stride_we, stride_wn, stride_om, routed_slots,
                    sw_ptr, s_out_ptr, n_tokens, shared_inter, stride_swn, stride_som,
                    ws_ptr, stride_wse, stride_wsn, sws_ptr, stride_swsn,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr, PREC: tl.constexpr, FP8: tl.constexpr):
    """Programs (slot, column tile): slots below ``routed_slots`` serve the experts in use; the ones after them
    (if launched) the shared experts, ``inter`` columns of the shared MLP each, for every token. ws/sws_ptr:
    the routed / shared weights' per-row block scales (``FP8``; otherwise never read)."""
    slot = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < inter
    if slot < routed_slots:
        if slot < tl.load(n_active_ptr):
            e = tl.load(active_ptr + slot)
            wg_ptr = w_ptr + e.to(tl.int64) * stride_we + n[None, :] * stride_wn  # (1, N) rows of W_gate
            sg_ptr = ws_ptr + e.to(tl.int64) * stride_wse + n[None, :] * stride_wsn  # and their scales
            _gate_up_tile(x_ptr, sorted_tok_ptr, tl.load(starts_ptr + e), tl.load(counts_ptr + e), wg_ptr,
                          wg_ptr + inter * stride_wn, sg_ptr, sg_ptr + inter * stride_wsn, out_ptr, hidden,
                          stride_xm, stride_om, n, nmask, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PREC, False,
                          FP8)  # W_up rows follow the gate rows
    else:
        col = (slot - routed_slots) * inter  # this slot's first column of the shared MLP
        wg_ptr = sw_ptr + (col + n[None, :]).to(tl.int64) * stride_swn
        sg_ptr = sws_ptr + (col + n[None, :]).to(tl.int64) * stride_swsn
        _gate_up_tile(x_ptr, x_ptr, 0, n_tokens, wg_ptr, wg_ptr + shared_inter * stride_swn, sg_ptr,
                      sg_ptr + shared_inter * stride_swsn, s_out_ptr + col, hidden, stride_xm, stride_som, n, nmask,
                      BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PREC, True, FP8)


@triton.jit
def _down_tile(a_ptr, start, count, kdim, wd_ptr, sd_ptr, k_base, w_rows_ptr, out_ptr, stride_am, stride_om, n,
               nmask, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
               PREC: tl.constexpr, WEIGHTED: tl.constexpr, FP8: tl.constexpr):
    """Rows start..start+count of a (kdim wide) times W_down (wd_ptr (1, N) rows), times each row's weight
    (``w_rows_ptr``, if ``WEIGHTED``). ``FP8``: sd_ptr (1, N) the rows' block scales, the tile's columns
    starting ``k_base`` columns into the weight."""
    kk = tl.arange(0, BLOCK_K)
    dt = out_ptr.dtype.element_ty
    for m0 in range(0, count, BLOCK_M):
        r = m0 + tl.arange(0, BLOCK_M)
        rmask = r < count
        row_ptr = a_ptr + (start + r).to(tl.int64)[:, None] * stride_am
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, kdim, BLOCK_K):
            k = k0 + kk
            if EVEN_K:
                a = tl.load(row_ptr + k[None, :], mask=rmask[:, None], other=0.0)
                w = tl.load(wd_ptr + k[:, None], mask=nmask[None, :], other=0.0)
            else:
                kmask = k < kdim
                a = tl.load(row_ptr + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                w = tl.load(wd_ptr + k[:, None], mask=nmask[None, :] & kmask[:, None], other=0.0)
            if FP8:
                w = dequant_tile(w, sd_ptr, k_base + k0, nmask, a.dtype)
            acc = tl.dot(a, w, acc, input_precision=PREC)
        if WEIGHTED:
            weight = tl.load(w_rows_ptr + start + r, mask=rmask, other=0.0)  # (M,) fp32 routing weights
            y = (acc.to(dt).to(tl.float32) * weight[:, None]).to(dt)
        else:
            y = acc.to(dt)
        tl.store(out_ptr + (start + r)[:, None] * stride_om + n[None, :], y, mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _down_kernel(a_ptr, w_ptr, out_ptr, sorted_w_ptr, starts_ptr, counts_ptr, active_ptr, n_active_ptr,
                 inter, hidden, stride_am, stride_we, stride_wn, stride_om, routed_slots,
                 sa_ptr, sw_ptr, s_out_ptr, n_tokens, stride_sam, stride_swn, stride_sop, stride_som,
                 ws_ptr, stride_wse, stride_wsn, sws_ptr, stride_swsn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, PREC: tl.constexpr, FP8: tl.constexpr):
    """Programs (slot, column tile): the experts in use, then (if launched) the shared experts' slots, each over
    ``inter`` of their hidden units (so every program streams as much weight), writing fp32 partial sums."""
    slot = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < hidden
    if slot < routed_slots:
        if slot < tl.load(n_active_ptr):
            e = tl.load(active_ptr + slot)
            wd_ptr = w_ptr + e.to(tl.int64) * stride_we + n[None, :] * stride_wn
            sd_ptr = ws_ptr + e.to(tl.int64) * stride_wse + n[None, :] * stride_wsn
            _down_tile(a_ptr, tl.load(starts_ptr + e), tl.load(counts_ptr + e), inter, wd_ptr, sd_ptr, 0,
                       sorted_w_ptr, out_ptr, stride_am, stride_om, n, nmask, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                       PREC, True, FP8)
    else:
        part = slot - routed_slots  # hidden units part*inter .. (part+1)*inter of the shared MLP
        wd_ptr = sw_ptr + n[None, :].to(tl.int64) * stride_swn + part * inter
        sd_ptr = sws_ptr + n[None, :].to(tl.int64) * stride_swsn
        _down_tile(sa_ptr + part * inter, 0, n_tokens, inter, wd_ptr, sd_ptr, part * inter, sa_ptr,
                   s_out_ptr + part * stride_sop, stride_sam, stride_som, n, nmask, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                   PREC, False, FP8)  # shared experts are not weighted


@triton.jit
def _combine_kernel(y_ptr, pos_ptr, shared_ptr, h_ptr, norm_w_ptr, x_ptr, hidden, eps, stride_sp,
                    K: tl.constexpr, BLOCK_H: tl.constexpr, SHARED_PARTS: tl.constexpr):
    t = tl.program_id(0)
    c = tl.arange(0, BLOCK_H)
    cm = c < hidden
    dt = h_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_H], tl.float32)
    for j in tl.static_range(K):
        row = tl.load(pos_ptr + t * K + j).to(tl.int64)
        acc += tl.load(y_ptr + row * hidden + c, mask=cm, other=0.0).to(tl.float32)
    out = acc.to(dt).to(tl.float32)
    if SHARED_PARTS > 0:  # the shared experts' output: the sum of its parts, rounded as one matmul's output
        s = tl.zeros([BLOCK_H], tl.float32)
        for p in tl.static_range(SHARED_PARTS):
            s += tl.load(shared_ptr + p * stride_sp + t * hidden + c, mask=cm, other=0.0).to(tl.float32)
        out = (out + s.to(dt).to(tl.float32)).to(dt).to(tl.float32)
    h = (tl.load(h_ptr + t * hidden + c, mask=cm, other=0.0).to(tl.float32) + out).to(dt)
    tl.store(h_ptr + t * hidden + c, h, mask=cm)
    _rms_norm_store(h.to(tl.float32), norm_w_ptr, x_ptr + t * hidden, c, cm, hidden, eps)


@triton.jit
def _weighted_sum_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, hidden, K: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum_j round(y[pos[t, j]] * w[t, j]): the torch path's weighting and rounding, summed in fp32."""
    t = tl.program_id(0)
    c = tl.arange(0, BLOCK_H)
    cm = c < hidden
    dt = out_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_H], tl.float32)
    for j in tl.static_range(K):
        row = tl.load(pos_ptr + t * K + j).to(tl.int64)
        w = tl.load(w_ptr + t * K + j)
        acc += (tl.load(y_ptr + row * hidden + c, mask=cm, other=0.0).to(tl.float32) * w).to(dt).to(tl.float32)
    tl.store(out_ptr + t * hidden + c, acc.to(dt), mask=cm)


def weighted_sum(y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N*k, H) unweighted expert rows in sorted order, pos (N, k) their rows, weights (N, k) -> (N, H)."""
    n, k = pos.shape
    hidden = y.shape[1]
    out = torch.empty(n, hidden, dtype=y.dtype, device=y.device)
    _weighted_sum_kernel[(n,)](y, pos, weights, out, hidden, K=k, BLOCK_H=triton.next_power_of_2(hidden),
                               num_warps=4)
    return out


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


class MoEPlan:
    """Device tensors of one layer's routing for ``n`` tokens (all shapes fixed by n, k, E: graph friendly)."""

    def __init__(self, n: int, k: int, num_experts: int, device):
        i32 = dict(dtype=torch.int32, device=device)
        self.idx = torch.empty(n, k, **i32)  # (N, k) expert ids, router order
        self.weights = torch.empty(n, k, dtype=torch.float32, device=device)  # (N, k) scaled probabilities
        self.counts = torch.empty(num_experts, **i32)  # rows per expert
        self.starts = torch.empty(num_experts, **i32)  # first sorted row per expert
        self.active = torch.empty(num_experts, **i32)  # experts in use, first n_active entries valid
        self.n_active = torch.empty(1, **i32)
        self.sorted_tok = torch.empty(n * k, **i32)  # (N*k,) token of each sorted row
        self.sorted_w = torch.empty(n * k, dtype=torch.float32, device=device)
        self.pos = torch.empty(n, k, **i32)  # sorted row of each (token, slot)


def route_and_plan(logits: torch.Tensor, routing) -> MoEPlan:
    """(N, E) fp32 router logits -> the step's ``MoEPlan`` (softmax, top-k, counting sort)."""
    n, num_e = logits.shape
    k = routing.top_k
    plan = MoEPlan(n, k, num_e, logits.device)
    grouped = routing.method == "group_limited_greedy"
    n_group = routing.n_group if grouped else 1
    block_e = triton.next_power_of_2(num_e)
    block_t = max(1, min(16, 4096 // block_e, triton.next_power_of_2(n)))  # tokens per routing block
    n_blocks = triton.cdiv(n, block_t)
    hist = torch.empty(n_blocks, num_e, dtype=torch.int32, device=logits.device)  # (blocks, E)
    place = n_blocks == 1  # one routing block: it places its own pairs (one launch instead of two)
    block_a = triton.next_power_of_2(block_t * k)
    _route_kernel[(n_blocks,)](
        logits, plan.idx, plan.weights, hist, n, num_e, routing.scaling, plan.counts, plan.starts, plan.active,
        plan.n_active, plan.sorted_tok, plan.sorted_w, plan.pos, K=k, BLOCK_T=block_t, BLOCK_E=block_e,
        N_GROUP=n_group, GROUP_SIZE=num_e // n_group, TOPK_GROUP=routing.topk_group if grouped else 1,
        BLOCK_G=triton.next_power_of_2(n_group), PLACE=place, BLOCK_A=block_a)
    if not place:
        _place_kernel[(n_blocks,)](
            plan.idx, plan.weights, hist, n * k, num_e, n_blocks, plan.counts, plan.starts, plan.active,
            plan.n_active, plan.sorted_tok, plan.sorted_w, plan.pos, K=k, PER_BLOCK=block_t * k, BLOCK_A=block_a,
            BLOCK_E=block_e, BLOCK_B=triton.next_power_of_2(n_blocks))
    return plan


# Tile shapes of the expert matmuls (bf16/fp16; fp32 halves block_k). Measured on an H200, see BENCHMARKS.md.
TILES = {"gate_up": dict(block_n=64, block_k=128, num_warps=4, num_stages=3),
         "down": dict(block_n=64, block_k=128, num_warps=4, num_stages=3)}


def _block_m(n: int, k: int, num_e: int) -> int:
    """Rows per tile: enough that the typical expert needs one pass over its weights."""
    avg = n * k / num_e
    return 16 if avg <= 8 else 32 if avg <= 24 else 64


# Steps of at most this many tokens run the shared experts inside the routed-expert launches (three launches and
# their cuBLAS matmuls' poor one-row bandwidth saved); every shared program walks all the step's tokens, so
# with more tokens than one row tile those programs would dominate.
MAX_SHARED_ROWS = 16


def shared_fits(shared_gate_up: Weight, shared_down: Weight, inter: int) -> bool:
    """Whether shared experts of these weights can run inside ``routed_experts``: whole multiples of ``inter``
    (and for FP8 weights, slots whose reduction ranges do not cut a 128-column scale block)."""
    s_inter = shared_gate_up.shape[0] // 2
    fits = s_inter % inter == 0 and shared_down.shape[1] == s_inter
    if isinstance(shared_down, Fp8Weight):
        fits = fits and (inter % BLOCK == 0 or s_inter <= BLOCK)
    return fits


def _operand(w: Weight, unread: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight as the kernels take it: FP8 bytes (uint8) and per-row block scales, or plain values and ``unread``
    in the scales' place (the kernels do not read scales without FP8)."""
    return (w.data.view(torch.uint8), w.scale) if isinstance(w, Fp8Weight) else (w, unread)


def routed_experts(x: torch.Tensor, plan: MoEPlan, gate_up: Weight, down: Weight,
                   shared: tuple[Weight, Weight] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, H) tokens -> (N*k, H) expert outputs in sorted order, already scaled by the routing weights, and, when
    ``shared`` = (gate_up (2*Is, H), down (H, Is)) is given (``shared_fits``), the shared experts' output from the
    same two launches, ``Is / I`` more slots in each, over every token: (Is / I, N, H) fp32 partial sums (over
    ``I`` hidden units each) whose sum is the output.

    Weights are plain tensors in x's dtype, or all ``Fp8Weight``s: then the kernels read one byte a weight and
    dequantise each tile as ``Fp8Weight.dequant`` would, so the result equals the same kernels' on the
    dequantised weights."""
    fp8 = isinstance(gate_up, Fp8Weight)
    if any(isinstance(w, Fp8Weight) != fp8 for w in (down, *(shared or ()))):
        raise ValueError("routed_experts: the expert weights must be all FP8 or all plain tensors")
    (gate_up, gu_s), (down, dn_s) = _operand(gate_up, x), _operand(down, x)
    n, hidden = x.shape
    num_e, two_i, _ = gate_up.shape
    inter = two_i // 2
    k = plan.idx.shape[1]
    slots = min(num_e, n * k)  # experts that can be in use
    fp32 = x.dtype == torch.float32
    prec = "ieee" if fp32 else "tf32"
    bm = _block_m(n, k, num_e)
    t1, t2 = TILES["gate_up"], TILES["down"]
    act = torch.empty(n * k, inter, dtype=x.dtype, device=x.device)  # (N*k, I)
    y = torch.empty(n * k, hidden, dtype=x.dtype, device=x.device)  # (N*k, H)
    # Without shared experts their arguments point at the routed tensors (unread: no program has a shared slot).
    s_gu, s_dn, s_gu_s, s_dn_s, s_act, s_y, s_slots, s_inter = gate_up, down, gu_s, dn_s, act, y[None], 0, 0
    if shared is not None:
        (s_gu, s_gu_s), (s_dn, s_dn_s) = (_operand(w, x) for w in shared)
        s_inter = s_gu.shape[0] // 2
        s_slots = s_inter // inter
        s_act = torch.empty(n, s_inter, dtype=x.dtype, device=x.device)  # (N, Is)
        s_y = torch.empty(s_slots, n, hidden, dtype=torch.float32, device=x.device)  # (Is/I, N, H)
    bn = min(t1["block_n"], _pow2(inter))
    bk = _block_k(t1, hidden, fp32, fp8)
    _gate_up_kernel[(slots + s_slots, triton.cdiv(inter, bn))](
        x, gate_up, act, plan.sorted_tok, plan.starts, plan.counts, plan.active, plan.n_active, hidden, inter,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), act.stride(0), slots,
        s_gu, s_act, n, s_inter, s_gu.stride(0), s_act.stride(0),
        gu_s, gu_s.stride(0), gu_s.stride(1), s_gu_s, s_gu_s.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=hidden % bk == 0, PREC=prec, FP8=fp8,
        num_warps=t1["num_warps"], num_stages=t1["num_stages"])
    bn = min(t2["block_n"], _pow2(hidden))
    bk = _block_k(t2, inter, fp32, fp8)
    _down_kernel[(slots + s_slots, triton.cdiv(hidden, bn))](
        act, down, y, plan.sorted_w, plan.starts, plan.counts, plan.active, plan.n_active, inter, hidden,
        act.stride(0), down.stride(0), down.stride(1), y.stride(0), slots,
        s_act, s_dn, s_y, n, s_act.stride(0), s_dn.stride(0), s_y.stride(0), s_y.stride(1),
        dn_s, dn_s.stride(0), dn_s.stride(1), s_dn_s, s_dn_s.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=inter % bk == 0, PREC=prec, FP8=fp8,
        num_warps=t2["num_warps"], num_stages=t2["num_stages"])
    return (y, s_y) if shared is not None else (y, None)


def _block_k(tile: dict, width: int, fp32: bool, fp8: bool) -> int:
    """Reduction columns per tile step (half in fp32); FP8 tiles must not cut a 128-column scale block."""
    bk = min(tile["block_k"] // (2 if fp32 else 1), _pow2(width))
    if fp8 and BLOCK % bk:
        raise ValueError(f"FP8 expert tiles must lie inside one {BLOCK}-column scale block (block_k {bk})")
    return bk


def combine_add_norm(y: torch.Tensor, plan: MoEPlan, shared: torch.Tensor | None, h: torch.Tensor,
                     norm_w: torch.Tensor, eps: float) -> torch.Tensor:
    """h += sum of each token's k expert rows (+ shared experts: (N, H), or (parts, N, H) partial sums as
    ``routed_experts`` gives them), in place; returns RMSNorm(h) * norm_w."""
    n, hidden = h.shape
    x = torch.empty_like(h)
    if shared is not None and shared.dim() == 2:
        shared = shared[None]
    _combine_kernel[(n,)](y, plan.pos, shared if shared is not None else h, h, norm_w, x, hidden, eps,
                          shared.stride(0) if shared is not None else 0, K=plan.idx.shape[1],
                          BLOCK_H=triton.next_power_of_2(hidden),
                          SHARED_PARTS=shared.shape[0] if shared is not None else 0, num_warps=4)
    return x
