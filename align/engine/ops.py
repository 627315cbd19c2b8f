"""Small numerical building blocks shared by attention and the feed-forward layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8_weights import plain
from .weights import DenseMLPWeights, Weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """DeepseekV2RMSNorm: normalise in fp32, cast back, then scale (the order matters in bf16)."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def activation(name: str):
    """transformers' own activation table, so 'silu', 'gelu', ... mean exactly what the model was trained with."""
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a plain or an FP8 weight (dequantised to x's dtype where it is used): (N, C) -> (N, R)."""
    return F.linear(x, plain(w, x.dtype), bias)


def dense_mlp(x: torch.Tensor, w: DenseMLPWeights, act) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) with gate and up in one matmul: (N, H) -> (N, H)."""
    gate, up = linear(x, w.gate_up, w.gate_up_bias).chunk(2, dim=-1)  # (N, I) each
    return linear(act(gate) * up, w.down, w.down_bias)
