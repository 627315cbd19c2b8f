"""DeepSeekMoE feed-forward: fp32 router, top-k routed experts, always-on shared experts.

Routing follows transformers' DeepseekV2TopkRouter to the letter, including what it leaves out: it never
renormalises the top-k weights, whatever ``norm_topk_prob`` says (DeepSeek-V2 and -Lite ship with it False),
so neither does the engine; the weights are only multiplied by ``routed_scaling_factor``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fp8_weights import plain
from .ops import dense_mlp
from .weights import MoEWeights

log = logging.getLogger(__name__)

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@dataclass(frozen=True)
class Routing:
    num_experts: int
    top_k: int
    method: str  # "greedy" | "group_limited_greedy"
    n_group: int | None
    topk_group: int | None
    scaling: float

    @classmethod
    def from_config(cls, config) -> Routing:
        method = config.topk_method or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise NotImplementedError(f"topk_method {method!r} is not supported (greedy, group_limited_greedy)")
        if getattr(config, "norm_topk_prob", False):
            log.warning("norm_topk_prob=True is ignored, as transformers' DeepseekV2 ignores it")
        return cls(config.n_routed_experts, config.num_experts_per_tok, method, config.n_group,
                   config.topk_group, float(config.routed_scaling_factor))


def route(x: torch.Tensor, router: torch.Tensor, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H) -> top-k weights (N, k) fp32 and expert ids (N, k) int64."""
    scores = F.linear(x.float(), router.float()).softmax(dim=-1, dtype=torch.float32)  # (N, E)
    if r.method == "group_limited_greedy":
        per_group = r.num_experts // r.n_group
        group_scores = scores.view(-1, r.n_group, per_group).max(dim=-1).values  # (N, G)
        group_idx = torch.topk(group_scores, k=r.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask[..., None].expand(-1, r.n_group, per_group).reshape(-1, r.num_experts)
        scores = scores.masked_fill(~score_mask.bool(), 0.0)
    weights, idx = torch.topk(scores, k=r.top_k, dim=-1, sorted=False)
    return weights * r.scaling, idx


def experts_grouped(x, idx, weights, gate_up, down, act, fused: bool = False) -> torch.Tensor:
    """All routed experts in two grouped GEMMs over tokens sorted by expert; no host sync (graph friendly).

    ``fused`` (CUDA with Triton, SiLU experts): the activation and the weighted scatter back to tokens run as
    one Triton kernel each instead of a handful of elementwise ops over (N*k, ...) tensors (prefill sizes).
    """
    k = idx.shape[1]
    flat = idx.reshape(-1)  # (N*k,)
    order = torch.argsort(flat, stable=True)
    token = order // k  # (N*k,) source token of each sorted assignment
    # Counting with scatter_add rather than bincount: bincount sizes its output on the host (a device sync).
    counts = torch.zeros(gate_up.shape[0], dtype=torch.long, device=x.device).scatter_add_(0, flat,
                                                                                        torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)  # (E,) end of each expert's rows
    h = _GROUPED_MM(x[token], gate_up.transpose(1, 2), offs=offs)  # (N*k, 2I)
    if fused:
        from .triton_moe import weighted_sum
        from .triton_ops import silu_mul

        y = _GROUPED_MM(silu_mul(h), down.transpose(1, 2), offs=offs)  # (N*k, H)
        pos = torch.empty_like(order)
        pos[order] = torch.arange(order.numel(), device=order.device)  # sorted row of each (token, slot)
        return weighted_sum(y, pos.view(-1, k), weights.float())
    gate, up = h.chunk(2, dim=-1)
    y = _GROUPED_MM(act(gate) * up, down.transpose(1, 2), offs=offs)  # (N*k, H)
    y = (y * weights.reshape(-1)[order, None]).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, y)


def experts_loop(x, idx, weights, gate_up, down, act) -> torch.Tensor:
    """One matmul pair per expert that received tokens, as the reference computes it."""
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    out = torch.zeros_like(x)
    w = weights.reshape(-1)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = order[start:start + count]
        start += count
        token = rows // k
        gate, up = F.linear(x[token], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(act(gate) * up, down[e]) * w[rows, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def pick_backend(backend: str, config, device: torch.device, dtype: torch.dtype) -> str:
    if backend not in ("auto", "grouped", "loop"):
        raise ValueError(f"moe_backend must be 'auto', 'grouped' or 'loop', got {backend!r}")
    # Grouped GEMM kernels need every row stride to be a multiple of 16 bytes.
    aligned = all(d * dtype.itemsize % 16 == 0 for d in (config.hidden_size, config.moe_intermediate_size))
    if backend == "grouped" and (_GROUPED_MM is None or not aligned):
        raise ValueError("moe_backend='grouped' needs torch.nn.functional.grouped_mm (torch >= 2.10) and "
                         "hidden / moe_intermediate sizes whose rows are multiples of 16 bytes")
    if backend != "auto":
        return backend
    # CPU kernels take any float dtype; CUDA ones were checked in bf16 and fp32 (torch 2.11, H200).
    ok = _GROUPED_MM is not None and aligned and (device.type == "cpu" or dtype in (torch.bfloat16, torch.float32))
    return "grouped" if ok else "loop"


def moe_forward(w: MoEWeights, x: torch.Tensor, r: Routing, act, backend: str, fused: bool = False):
    """(N, H) -> (N, H) output and (N, k) routed expert ids; ``fused``: see ``experts_grouped``."""
    weights, idx = route(x, w.router, r)
    gate_up, down = plain(w.gate_up, x.dtype), plain(w.down, x.dtype)
    if backend == "grouped":
        out = experts_grouped(x, idx, weights, gate_up, down, act, fused)
    else:
        out = experts_loop(x, idx, weights, gate_up, down, act)
    if w.shared is not None:
        out = out + dense_mlp(x, w.shared, act)
    return out, idx
