"""Small fused Triton kernels of a decode step (CUDA only): residual add + RMSNorm (+ the MoE router's logits),
and act(gate) * up.

Each replaces three to five elementwise launches of the torch path with one, rounding where it rounds:
``rms_norm`` normalises in fp32, rounds to the activation dtype, then multiplies by the weight and rounds again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm(h, w_ptr, c, cm, hidden, eps, dt: tl.constexpr):
    """weight * rms_norm(h) in dtype dt, for h fp32 (BLOCK_H,) masked by cm."""
    var = tl.sum(tl.where(cm, h * h, 0.0), axis=0) / hidden
    normed = (h * tl.math.rsqrt(var + eps)).to(dt).to(tl.float32)
    w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
    return (w * normed).to(dt)


@triton.jit
def _rms_norm_store(h, w_ptr, out_ptr, c, cm, hidden, eps):
    """Store weight * rms_norm(h) (h fp32 (BLOCK_H,), masked by cm) at out_ptr + c in out's dtype; return it."""
    x = _rms_norm(h, w_ptr, c, cm, hidden, eps, out_ptr.dtype.element_ty)
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
def _add_norm_router_kernel(h_ptr, delta_ptr, w_ptr, router_ptr, h_out_ptr, x_ptr, logits_ptr, hidden, n_experts,
                            eps, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr):
    """Programs (token, chunk of experts): each computes the token's new residual and its norm, and the fp32
    router logits of BLOCK_E experts; chunk 0 stores the residual (to h_out: h is read by every chunk) and x."""
    t = tl.program_id(0)
    ec = tl.program_id(1)
    c = tl.arange(0, BLOCK_H)
    cm = c < hidden
    dt = h_ptr.dtype.element_ty
    h = (tl.load(h_ptr + t * hidden + c, mask=cm, other=0.0).to(tl.float32)
         + tl.load(delta_ptr + t * hidden + c, mask=cm, other=0.0).to(tl.float32)).to(dt)
    x = _rms_norm(h.to(tl.float32), w_ptr, c, cm, hidden, eps, dt)
    if ec == 0:
        tl.store(h_out_ptr + t * hidden + c, h, mask=cm)
        tl.store(x_ptr + t * hidden + c, x, mask=cm)
    e = ec * BLOCK_E + tl.arange(0, BLOCK_E)
    em = e < n_experts
    router = tl.load(router_ptr + e[:, None] * hidden + c[None, :], mask=em[:, None] & cm[None, :], other=0.0)
    logits = tl.sum(router.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)  # (E,) the reference's fp32 router
    tl.store(logits_ptr + t * n_experts + e, logits, mask=em)


# Steps of at most this many tokens compute the router logits in the norm kernel before the experts (each
# program recomputes its token's norm, so with many tokens cuBLAS's one fp32 matmul is cheaper).
MAX_ROUTER_ROWS = 16


def add_rms_norm_router(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, router: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h + delta, x = weight * rms_norm(h + delta), x.float() @ router.T): the new residual (a new tensor),
    the normalised input of the experts and their fp32 router logits (N, E). h, delta (N, H); router (E, H)."""
    n, hidden = h.shape
    num_e = router.shape[0]
    h_out, x = torch.empty_like(h), torch.empty_like(h)
    logits = torch.empty(n, num_e, dtype=torch.float32, device=h.device)
    block_h = triton.next_power_of_2(hidden)
    block_e = max(1, min(4, triton.next_power_of_2(num_e), 8192 // block_h))  # router tile of <= 8K fp32
    _add_norm_router_kernel[(n, triton.cdiv(num_e, block_e))](
        h, delta, weight, router, h_out, x, logits, hidden, num_e, eps, BLOCK_H=block_h, BLOCK_E=block_e,
        num_warps=4 if block_h <= 2048 else 8)
    return h_out, x, logits


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
