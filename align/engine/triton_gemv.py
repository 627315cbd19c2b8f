"""Matmuls of a few rows against a large weight (decode at small batch), as Triton kernels (CUDA only).

At batch 1 a dense projection is a matrix-vector product: all that matters is streaming the weight at full
bandwidth. cuBLAS picks tiles of 64 output columns for these shapes, which gives a 2048-column projection only
32 programs on a 132-SM GPU, each streaming 256 KB (measured on an H200: ~6.7 µs for an 8 MB weight, ~1.3 TB/s).
These kernels give each program 16 output columns, so the weight is spread over every multiprocessor.

  linear      y = x W^T (+ b), W (N, K): (M, K) -> (M, N)
  glu         [gate | up] stacked as W (2I, K): act(x W_gate^T) * (x W_up^T) -> (M, I), silu, in one pass

Rounding follows ``F.linear`` (fp32 accumulation, bias added before the one rounding) and ``triton_ops.silu_mul``
(gate and up rounded to the activation dtype before silu and the product).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Rows handled per launch: the kernels pad rows to BLOCK_M, so they only pay off for a handful of rows.
MAX_ROWS = 16
TILES = {"one_row": dict(block_n=16, block_k=256, num_warps=4, num_stages=4),
         "rows": dict(block_n=16, block_k=256, num_warps=4, num_stages=4)}


@triton.jit
def _epilogue(acc, acc_u, b_ptr, out_ptr, n, nmask, out_offs, out_mask, up_offset, HAS_BIAS: tl.constexpr,
              GLU: tl.constexpr):
    """Bias, then silu(gate) * up for GLU, rounded as F.linear and silu_mul round; stores the tile."""
    dt = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
        if GLU:
            acc_u += tl.load(b_ptr + up_offset + n, mask=nmask, other=0.0).to(tl.float32)
    if GLU:
        gate = acc.to(dt).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dt).to(tl.float32)  # silu, rounded like F.silu's output
        acc = act * acc_u.to(dt).to(tl.float32)
    tl.store(out_ptr + out_offs, acc.to(dt), mask=out_mask)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, up_offset,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 GLU: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr):
    """Rows as a tl.dot tile: (M, K) x (K, N) per K step."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    m = tl.arange(0, BLOCK_M)
    mmask = m < M
    kk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + n[None, :].to(tl.int64) * stride_wn  # (1, N): W rows as columns of a (K, N) tile
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        kmask = (k < K) | EVEN_K
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_rows + k[:, None], mask=nmask[None, :] & kmask[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PREC)
        if GLU:
            wu = tl.load(w_rows + up_offset * stride_wn + k[:, None], mask=nmask[None, :] & kmask[:, None],
                         other=0.0)
            acc_u = tl.dot(x, wu, acc_u, input_precision=PREC)
    _epilogue(acc, acc_u, b_ptr, out_ptr, n[None, :], nmask[None, :], m[:, None] * stride_om + n[None, :],
              mmask[:, None] & nmask[None, :], up_offset, HAS_BIAS, GLU)


@triton.jit
def _gemv1_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_wn, up_offset, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, GLU: tl.constexpr, EVEN_K: tl.constexpr):
    """One row: a multiply and a row sum per (N, K) tile, loads contiguous along K."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    kk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + n[:, None].to(tl.int64) * stride_wn  # (N, 1)
    acc = tl.zeros([BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        kmask = (k < K) | EVEN_K
        x = tl.load(x_ptr + k, mask=kmask, other=0.0).to(tl.float32)[None, :]
        w = tl.load(w_rows + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x, axis=1)
        if GLU:
            wu = tl.load(w_rows + up_offset * stride_wn + k[None, :], mask=nmask[:, None] & kmask[None, :],
                         other=0.0)
            acc_u += tl.sum(wu.to(tl.float32) * x, axis=1)
    _epilogue(acc, acc_u, b_ptr, out_ptr, n, nmask, n, nmask, up_offset, HAS_BIAS, GLU)


def _launch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, n_out: int, glu: bool) -> torch.Tensor:
    m, k = x.shape
    if m > MAX_ROWS:
        raise ValueError(f"triton_gemv takes at most {MAX_ROWS} rows, got {m}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("triton_gemv needs rows with unit stride")
    out = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    fp32 = x.dtype == torch.float32
    b = bias if bias is not None else w
    if m == 1:
        t = TILES["one_row"]
        bk = min(t["block_k"], max(16, triton.next_power_of_2(k)))
        _gemv1_kernel[(triton.cdiv(n_out, t["block_n"]),)](
            x, w, b, out, n_out, k, w.stride(0), n_out, BLOCK_N=t["block_n"], BLOCK_K=bk,
            HAS_BIAS=bias is not None, GLU=glu, EVEN_K=k % bk == 0, num_warps=t["num_warps"],
            num_stages=t["num_stages"])
        return out
    t = TILES["rows"]
    bk = min(t["block_k"] // (2 if fp32 else 1), max(16, triton.next_power_of_2(k)))
    _gemv_kernel[(triton.cdiv(n_out, t["block_n"]),)](
        x, w, b, out, m, n_out, k, x.stride(0), w.stride(0), out.stride(0), n_out,
        BLOCK_M=16, BLOCK_N=t["block_n"], BLOCK_K=bk, HAS_BIAS=bias is not None, GLU=glu, EVEN_K=k % bk == 0,
        PREC="ieee" if fp32 else "tf32", num_warps=t["num_warps"], num_stages=t["num_stages"])
    return out


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) x (N, K) weight -> (M, N), M <= MAX_ROWS."""
    return _launch(x, w, bias, w.shape[0], glu=False)


def glu(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) x (2I, K) [gate | up] weight -> (M, I) silu(gate) * up, M <= MAX_ROWS."""
    return _launch(x, w, bias, w.shape[0] // 2, glu=True)
