"""Rotary embedding and softmax scale, computed exactly as transformers' DeepseekV2 does.

DeepSeek-V2 rotates interleaved pairs (x0, x1), (x2, x3), ... as complex numbers, not the two halves of the
vector as Llama does; YaRN additionally multiplies every rotation by ``attention_scaling`` (so q·k picks it up
squared) and the softmax scale by mscale(factor, mscale_all_dim)^2. The inverse frequencies and
``attention_scaling`` come from transformers' own rope initialisers so every rope type it validates for this
config is reproduced bit for bit.
"""

from __future__ import annotations

import math

import torch


def _default_inv_freq(config) -> tuple[torch.Tensor, float]:
    base = config.rope_parameters["rope_theta"]
    dim = config.qk_rope_head_dim
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0


def rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0}
    return dict(params)


def softmax_scale(config) -> float:
    """1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)^2 when the rope is not default."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(config)
    if params.get("rope_type", "default") != "default":
        mscale_all_dim = params.get("mscale_all_dim", 0)
        factor = params.get("factor") or 1.0
        if mscale_all_dim and factor > 1:
            m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
            scale = scale * m * m
    return scale


class Rotary:
    """Rotations for the decoupled rope part of queries (per head) and of the single shared key."""

    def __init__(self, config, device):
        params = rope_parameters(config)
        rope_type = params.get("rope_type", "default")
        if rope_type in ("dynamic", "longrope"):
            # Both change frequencies with the sequence length; the engine has no such case to match yet.
            raise NotImplementedError(f"rope_type {rope_type!r} is not supported by the engine")
        if rope_type == "default":
            inv_freq, scaling = _default_inv_freq(config)
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device=None)
        self.inv_freq = inv_freq.to(device=device, dtype=torch.float32)  # (Dr/2,)
        self.attention_scaling = float(scaling)

    def freqs(self, positions: torch.Tensor) -> torch.Tensor:
        """(N,) int positions -> (N, Dr/2) complex rotations (scaled), shared by all layers of a step."""
        angles = positions.float()[:, None] * self.inv_freq  # (N, Dr/2)
        return torch.polar(torch.ones_like(angles), angles) * self.attention_scaling

    @staticmethod
    def apply(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (N, ..., Dr) by ``freqs`` (N, Dr/2); pairs are adjacent elements, maths in fp32."""
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (N, ..., Dr/2)
        f = freqs.view(freqs.shape[0], *([1] * (x.dim() - 2)), freqs.shape[-1])
        return torch.view_as_real(xc * f).flatten(-2).type_as(x)
