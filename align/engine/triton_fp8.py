"""x @ W^T + b on an FP8 weight for the fused decode path (Triton; CUDA, or the CPU under Triton's interpreter).

A decode step multiplies a few hundred rows at most, so its projections are bound by the bytes of the weight:
reading one byte a weight (plus a 4-byte scale per 128) instead of bf16's two is the whole gain. Each program
owns a tile of output columns, streams its weight rows in 128-column blocks (one scale per row and block, see
fp8_weights.py), dequantises each tile in registers to x's dtype exactly as ``Fp8Weight.dequant`` rounds, and
accumulates in fp32; the output is rounded once, after the bias, like ``F.linear`` on the dequantised weight.
Narrower column tiles when the matrix has few columns keep every multiprocessor streaming.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_weights import BLOCK, Fp8Weight


@triton.jit
def dequant_tile(w, s_ptr, k0, nmask, dtype):
    """(K, N) float8_e4m3 bytes (uint8) of weight rows whose K columns start at column k0 -> (K, N) ``dtype``:
    each value times its row's scale for the 128-column block that holds k0 (s_ptr (1, N) the rows' scales),
    rounded to ``dtype`` as ``Fp8Weight.dequant`` rounds. The tile must lie inside that block (its width divides
    128, k0 a multiple of it)."""
    s = tl.load(s_ptr + k0 // 128, mask=nmask[None, :], other=0.0)  # (1, N) fp32
    return (w.to(tl.float8e4nv, bitcast=True).to(tl.float32) * s).to(dtype)


@triton.jit
def _fp8_linear_kernel(x_ptr, w_ptr, s_ptr, b_ptr, o_ptr, m, n_out, k_in, stride_xm, stride_wn, stride_sn,
                       stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, nmask = r < m, n < n_out
    kk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + r.to(tl.int64)[:, None] * stride_xm  # (M, 1)
    w_rows = w_ptr + n.to(tl.int64)[None, :] * stride_wn  # (1, N): weight rows are output columns
    s_rows = s_ptr + n.to(tl.int64)[None, :] * stride_sn  # (1, N) their block scales
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        k = k0 + kk
        kmask = k < k_in
        a = tl.load(x_rows + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)  # (M, K)
        w = tl.load(w_rows + k[:, None], mask=nmask[None, :] & kmask[:, None], other=0)  # (K, N) FP8 bytes
        w = dequant_tile(w, s_rows, k0, nmask, a.dtype)
        acc = tl.dot(a, w, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(o_ptr + r.to(tl.int64)[:, None] * stride_om + n[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=rmask[:, None] & nmask[None, :])


def _tiles(m: int, n_out: int, fp32: bool, num_sms: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): rows per tile up to 64, columns narrowed (down to 16) until the grid has a
    program per multiprocessor, 128 columns of the reduction (64 in fp32) so a tile never cuts a scale block."""
    bm = max(16, min(64, triton.next_power_of_2(m)))
    bn = 64
    while bn > 16 and triton.cdiv(m, bm) * triton.cdiv(n_out, bn) < num_sms:
        bn //= 2
    return bm, bn, BLOCK // 2 if fp32 else BLOCK


def fp8_linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None, num_sms: int = 132) -> torch.Tensor:
    """(M, K) x in bf16/fp16/fp32, w (N, K) FP8 with per-row block scales, bias (N,) -> (M, N) in x's dtype."""
    if w.data.dim() != 2 or x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"fp8_linear: x {tuple(x.shape)} against weight {tuple(w.shape)}")
    m, k_in = x.shape
    n_out = w.shape[0]
    out = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    fp32 = x.dtype == torch.float32
    bm, bn, bk = _tiles(m, n_out, fp32, num_sms)
    data = w.data.view(torch.uint8)
    _fp8_linear_kernel[(triton.cdiv(m, bm), triton.cdiv(n_out, bn))](
        x, data, w.scale, bias if bias is not None else x, out, m, n_out, k_in, x.stride(0), data.stride(0),
        w.scale.stride(0), out.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, HAS_BIAS=bias is not None,
        PREC="ieee" if fp32 else "tf32", num_warps=4)
    return out
