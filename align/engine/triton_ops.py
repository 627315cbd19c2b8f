"""Small fused Triton kernels of a decode step (CUDA only): residual add + RMSNorm, and act(gate) * up.

Each replaces three to five elementwise launches of the torch path with one, rounding where it rounds:
``rms_norm`` normalises in fp32, rounds to the activation dtype, then multiplies by the weight and rounds again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_store(h, w_ptr, out_ptr, c, cm, hidden, eps):
    """Store weight * rms_norm(h) (h fp32 (BLOCK_H,), masked by cm) at out_ptr + c in out's dtype; return it."""
    dt = out_ptr.dtype.element_ty
    var = tl.sum(tl.where(cm, h * h, 0.0), axis=0) / hidden
    normed = (h * tl.math.rsqrt(var + eps)).to(dt).to(tl.float32)
    w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
    x = (w * normed).to(dt)
    tl.store(out_ptr + c, x, mask=cm)
    return x


@triton.jit
def _add_rms_norm_kernel(h_ptr, delta_ptr, w_ptr, x_ptr, xf_ptr, hidden, eps, BLOCK_H: tl.constexpr,
                         HAS_DELTA: tl.constexpr, WRITE_F32: tl.constexpr):
    t = tl.program_id(0)
    c = tl.arange(0, BLOCK_H)
    cm = c < hidden
    h = tl.load(h_ptr + t * hidden + c, mask=cm, other=0.0)
    if HAS_DELTA:
        h = (h.to(tl.float32) + tl.load(delta_ptr + t * hidden + c, mask=cm, other=0.0).to(tl.float32)).to(
            h_ptr.dtype.element_ty)
        tl.store(h_ptr + t * hidden + c, h, mask=cm)
    x = _rms_norm_store(h.to(tl.float32), w_ptr, x_ptr + t * hidden, c, cm, hidden, eps)
    if WRITE_F32:  # the router reads the normalised input in fp32 (the reference upcasts it first)
        tl.store(xf_ptr + t * hidden + c, x.to(tl.float32), mask=cm)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 want_f32: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h += delta (in place, when given); returns (weight * rms_norm(h), its fp32 copy or None). h: (N, H)."""
    n, hidden = h.shape
    x = torch.empty_like(h)
    xf = torch.empty(n, hidden, dtype=torch.float32, device=h.device) if want_f32 else None
    _add_rms_norm_kernel[(n,)](h, delta if delta is not None else h, weight, x, xf if want_f32 else x, hidden,
                               eps, BLOCK_H=triton.next_power_of_2(hidden), HAS_DELTA=delta is not None,
                               WRITE_F32=want_f32, num_warps=4)
    return x, xf


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cm = c < inter
    dt = out_ptr.dtype.element_ty
    gate = tl.load(gu_ptr + t * 2 * inter + c, mask=cm, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + t * 2 * inter + inter + c, mask=cm, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(dt).to(tl.float32)
    tl.store(out_ptr + t * inter + c, (act * up).to(dt), mask=cm)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(N, 2I) [gate | up] -> (N, I) silu(gate) * up."""
    n, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty(n, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inter))
    _silu_mul_kernel[(n, triton.cdiv(inter, block))](gate_up, out, inter, BLOCK=block, num_warps=4)
    return out
