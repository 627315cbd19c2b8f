"""One forward pass of the model over a step's packed tokens: embeddings, layers, final norm, logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fused
from .attention import AttnBatch, MLAShape, mla_forward
from .cache import LatentCache
from .moe import Routing, moe_forward, pick_backend
from .ops import activation, dense_mlp, rms_norm
from .rope import Rotary, softmax_scale
from .weights import ModelWeights, MoEWeights


# The fused decode kernels sort a step's (token, expert) pairs with per-block counts every program reads; beyond
# this many sequences in one decode step the torch path runs instead.
MAX_FUSED_BATCH = 4096
# Prefills of up to this many tokens run on the fused kernels too: they are bound by kernel launches, which the
# fused path has a third as many of. Larger ones are bound by the expert matmuls, which cuBLAS's grouped GEMM
# (the torch path) does better.
MAX_FUSED_PREFILL = 1024


class ModelRunner:
    def __init__(self, config, weights: ModelWeights, cache: LatentCache, device: torch.device, dtype: torch.dtype,
                 prefill_attention: str = "expanded", moe_backend: str = "auto", decode_kernels: str = "auto"):
        if prefill_attention not in ("expanded", "absorbed"):
            raise ValueError(f"prefill_attention must be 'expanded' or 'absorbed', got {prefill_attention!r}")
        if decode_kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"decode_kernels must be 'auto', 'triton' or 'torch', got {decode_kernels!r}")
        self.weights = weights
        self.cache = cache
        self.device = device
        self.rotary = Rotary(config, device)
        self.shape = MLAShape.from_config(config, softmax_scale(config))
        self.routing = Routing.from_config(config)
        self.act = activation(config.hidden_act)
        self.eps = config.rms_norm_eps
        self.prefill_attention = prefill_attention
        self.moe_backend = pick_backend(moe_backend, config, device, dtype)
        self.num_moe_layers = sum(isinstance(layer.mlp, MoEWeights) for layer in weights.layers)
        # Decode batches (one new token per sequence) run on fused Triton kernels where they can (CUDA).
        why_not = fused.available(config, device) if decode_kernels != "torch" else "decode_kernels='torch'"
        if decode_kernels == "triton" and why_not:
            raise ValueError(f"decode_kernels='triton' cannot run here: {why_not}")
        self.fused = (fused.FusedDecoder(weights, cache, self.shape, self.routing, self.eps)
                      if why_not is None else None)
        self.max_fused_prefill = MAX_FUSED_PREFILL

    def batch(self, starts: list[int], lengths: list[int], tables: list[list[int]]) -> AttnBatch:
        return AttnBatch.build(starts, lengths, tables, self.cache.block_size, self.rotary, self.device)

    def static_batch(self, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                     context_lens: torch.Tensor, length: int) -> AttnBatch:
        """A decode batch (one new token per sequence) built on the device alone, so it can be graph-captured.

        ``tables`` (B, length // block_size) and ``context_lens`` (B,) live on the device; keys at or past a
        sequence's context length are masked.
        """
        mask = torch.arange(length, device=positions.device)[None, None] < context_lens[:, None, None]  # (B, 1, L)
        return AttnBatch(positions=positions, slots=slots, block_tables=tables, mask=mask, pad_index=None,
                         unpad_index=None, freqs=self.rotary.freqs(positions), num_seqs=positions.shape[0],
                         query_len=1, context_len=length, context_lens=context_lens)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, batch: AttnBatch, logit_rows: torch.Tensor | None,
                record_routing: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N,) new tokens -> fp32 logits (M, V) at packed rows ``logit_rows`` (M,; None: every row), and
        optionally the routed experts of every new token, (N, n_moe_layers, top_k)."""
        if self.fused is not None and (batch.num_seqs <= MAX_FUSED_BATCH if batch.context_lens is not None
                                       else input_ids.shape[0] <= self.max_fused_prefill
                                       and self.prefill_attention == "expanded"):
            return self.fused.forward(input_ids, batch, logit_rows, record_routing)
        w = self.weights
        absorb = batch.query_len == 1 or self.prefill_attention == "absorbed"
        h = F.embedding(input_ids, w.embed)  # (N, H)
        routes = []
        for i, layer in enumerate(w.layers):
            x = rms_norm(h, layer.input_norm, self.eps)
            h = h + mla_forward(layer.attn, x, batch, self.cache, i, self.shape, absorb)
            x = rms_norm(h, layer.post_norm, self.eps)
            if isinstance(layer.mlp, MoEWeights):
                out, idx = moe_forward(layer.mlp, x, self.routing, self.act, self.moe_backend,
                                       fused=self.fused is not None)
                if record_routing:
                    routes.append(idx)
            else:
                out = dense_mlp(x, layer.mlp, self.act)
            h = h + out
        if logit_rows is not None:
            h = h[logit_rows]  # only rows whose next token is wanted
        h = rms_norm(h, w.norm, self.eps)
        logits = F.linear(h, w.lm_head).float()
        routing = torch.stack(routes, dim=1).to(torch.int32) if routes else None  # (N, n_moe, k)
        return logits, routing
