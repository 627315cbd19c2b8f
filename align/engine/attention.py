"""Multi-head Latent Attention over the paged latent cache.

Each step writes the new tokens' [c_kv | k_pe] into the cache, gathers every scheduled sequence's context by
its block table into one padded batch, and attends in one batched call. Two equivalent ways to attend:

  * absorbed (decode): W_UK is folded into the query (q_lat = q_nope W_UK, width R) so scores are a single
    matmul against the cached [c_kv | k_pe]; the output stays in latent space and W_UV maps it back per head.
    Per key this reads R+Dr values once for all heads, which is what makes MLA decode cheap.
  * expanded (prefill): keys/values are rebuilt per head with kv_b_proj, as the reference does. With many
    queries per sequence this costs fewer FLOPs than the absorbed form (Dn+Dr+Dv instead of 2R+Dr per key).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from .cache import LatentCache
from .ops import linear, rms_norm
from .rope import Rotary
from .weights import AttentionWeights

# The reference builds q_a_layernorm / kv_a_layernorm with RMSNorm's default eps, not config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


@dataclass
class AttnBatch:
    """Where a step's tokens sit: N packed new tokens from B sequences, each with its own cached context."""

    positions: torch.Tensor  # (N,) int64
    slots: torch.Tensor  # (N,) flat cache slot of each new token
    block_tables: torch.Tensor  # (B, max_blocks) int64, padded with block 0 (masked out)
    mask: torch.Tensor  # (B, Tq, L) bool: key j visible to the t-th query of sequence b
    pad_index: torch.Tensor | None  # (B, Tq) packed row for each padded query slot; None when N == B*Tq
    unpad_index: torch.Tensor | None  # (N,) padded slot (b*Tq + t) of each packed token
    freqs: torch.Tensor  # (N, Dr/2) complex rope rotations
    num_seqs: int  # B
    query_len: int  # Tq, the longest chunk
    context_len: int  # L, the longest context (cached + new)
    context_lens: torch.Tensor | None = None  # (B,) int64 keys per sequence; set for decode batches (Tq == 1)

    @classmethod
    def build(cls, starts: list[int], lengths: list[int], tables: list[list[int]], block_size: int,
              rotary: Rotary, device) -> AttnBatch:
        b = len(starts)
        tq, ctx = max(lengths), [s + n for s, n in zip(starts, lengths)]
        length = max(ctx)
        nb = -(-length // block_size)
        table = torch.tensor([t[:nb] + [0] * (nb - len(t[:nb])) for t in tables], dtype=torch.long)  # (B, nb)
        start_t = torch.tensor(starts)
        len_t = torch.tensor(lengths)
        if tq == 1:
            seq_of = torch.arange(b)
            positions = start_t
            offset = torch.zeros(b, dtype=torch.long)
        else:
            seq_of = torch.repeat_interleave(torch.arange(b), len_t)  # (N,)
            first = torch.cumsum(len_t, 0) - len_t  # packed index of each sequence's first new token
            offset = torch.arange(int(len_t.sum())) - first[seq_of]  # (N,) index within its chunk
            positions = start_t[seq_of] + offset
        slots = table[seq_of, positions // block_size] * block_size + positions % block_size
        qpos = start_t[:, None] + torch.arange(tq)[None]  # (B, Tq)
        # Padded query slots look at their sequence's real keys only, so no row is fully masked (no NaN).
        limit = torch.minimum(qpos, torch.tensor(ctx)[:, None] - 1)  # (B, Tq) last visible key
        pad_index = unpad_index = None
        if bool((len_t != tq).any()):
            first = torch.cumsum(len_t, 0) - len_t
            pad_index = first[:, None] + torch.minimum(torch.arange(tq)[None], len_t[:, None] - 1)  # (B, Tq)
            unpad_index = seq_of * tq + offset  # (N,)
        to = dict(device=device, non_blocking=True)
        context_lens = torch.tensor(ctx).to(**to) if tq == 1 else None
        positions = positions.to(**to)
        mask = torch.arange(length, device=device)[None, None] <= limit.to(**to)[..., None]  # (B, Tq, L)
        return cls(positions=positions, slots=slots.to(**to), block_tables=table.to(**to), mask=mask,
                   pad_index=None if pad_index is None else pad_index.to(**to),
                   unpad_index=None if unpad_index is None else unpad_index.to(**to),
                   freqs=rotary.freqs(positions), num_seqs=b, query_len=tq, context_len=length,
                   context_lens=context_lens)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) packed -> (B, Tq, ...) padded."""
        if self.pad_index is None:
            return x.view(self.num_seqs, self.query_len, *x.shape[1:])
        return x[self.pad_index]

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Tq, ...) padded -> (N, ...) packed."""
        flat = x.reshape(self.num_seqs * self.query_len, *x.shape[2:])
        return flat if self.unpad_index is None else flat[self.unpad_index]

    @cached_property
    def not_visible(self) -> torch.Tensor:
        return ~self.mask


@dataclass(frozen=True)
class MLAShape:
    num_heads: int
    nope_dim: int  # Dn
    rope_dim: int  # Dr
    v_dim: int  # Dv
    kv_lora_rank: int  # R
    scale: float

    @classmethod
    def from_config(cls, config, scale: float) -> MLAShape:
        return cls(config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                   config.v_head_dim, config.kv_lora_rank, scale)


def mla_forward(a: AttentionWeights, x: torch.Tensor, batch: AttnBatch, cache: LatentCache, layer: int,
                shape: MLAShape, absorb: bool) -> torch.Tensor:
    """(N, H) normalised hidden states of the new tokens -> (N, H) attention output; writes the cache."""
    n = x.shape[0]
    hn, dn, dr, r = shape.num_heads, shape.nope_dim, shape.rope_dim, shape.kv_lora_rank
    if a.q_proj is not None:
        q = linear(x, a.q_proj)
    else:
        q = linear(rms_norm(linear(x, a.q_a_proj, a.q_a_bias), a.q_a_norm, LATENT_NORM_EPS), a.q_b_proj)
    q = q.view(n, hn, dn + dr)  # (N, Hn, Dq)
    q_nope, q_pe = q.split([dn, dr], dim=-1)
    c_kv, k_pe = linear(x, a.kv_a_proj, a.kv_a_bias).split([r, dr], dim=-1)  # (N, R), (N, Dr)
    c_kv = rms_norm(c_kv, a.kv_a_norm, LATENT_NORM_EPS)
    q_pe = Rotary.apply(q_pe, batch.freqs)
    k_pe = Rotary.apply(k_pe, batch.freqs)
    cache.write(layer, batch.slots, torch.cat([c_kv, k_pe], dim=-1))
    ctx = cache.gather(layer, batch.block_tables, batch.context_len)  # (B, L, R+Dr)
    if absorb:
        out = _absorbed(a, q_nope, q_pe, ctx, batch, shape)
    else:
        out = expanded_attention(a, q_nope, q_pe, ctx, batch, shape)
    return linear(out, a.o_proj, a.o_bias)


def _absorbed(a, q_nope, q_pe, ctx, batch: AttnBatch, shape: MLAShape) -> torch.Tensor:
    n, hn, r = q_nope.shape[0], shape.num_heads, shape.kv_lora_rank
    b, tq, length = batch.num_seqs, batch.query_len, batch.context_len
    q_lat = torch.bmm(q_nope.transpose(0, 1), a.w_uk)  # (Hn, N, Dn) @ (Hn, Dn, R) -> (Hn, N, R)
    q_cat = torch.cat([q_lat.transpose(0, 1), q_pe], dim=-1)  # (N, Hn, R+Dr)
    q_cat = batch.pad(q_cat).reshape(b, tq * hn, -1)  # (B, Tq*Hn, R+Dr)
    scores = torch.bmm(q_cat, ctx.transpose(1, 2)).float() * shape.scale  # (B, Tq*Hn, L)
    scores = scores.view(b, tq, hn, length).masked_fill(batch.not_visible[:, :, None], float("-inf"))
    probs = scores.softmax(dim=-1).to(ctx.dtype).view(b, tq * hn, length)
    out_lat = torch.bmm(probs, ctx[..., :r])  # (B, Tq*Hn, R)
    out_lat = batch.unpad(out_lat.view(b, tq, hn, r))  # (N, Hn, R)
    out = torch.bmm(out_lat.transpose(0, 1), a.w_uv_t)  # (Hn, N, R) @ (Hn, R, Dv) -> (Hn, N, Dv)
    return out.transpose(0, 1).reshape(n, hn * shape.v_dim)


def expanded_attention(a, q_nope, q_pe, ctx, batch: AttnBatch, shape: MLAShape) -> torch.Tensor:
    """Per-head keys and values rebuilt from the latent context; q_nope (N, Hn, Dn), q_pe (N, Hn, Dr) rotated,
    ctx (B, L, R+Dr) -> (N, Hn*Dv)."""
    n, hn, dn, dr, dv, r = (q_nope.shape[0], shape.num_heads, shape.nope_dim, shape.rope_dim, shape.v_dim,
                            shape.kv_lora_rank)
    b, length = batch.num_seqs, batch.context_len
    c_ctx, pe_ctx = ctx.split([r, dr], dim=-1)  # (B, L, R), (B, L, Dr)
    kv = F.linear(c_ctx, a.kv_b_proj).view(b, length, hn, dn + dv).transpose(1, 2)  # (B, Hn, L, Dn+Dv)
    k_nope, v = kv.split([dn, dv], dim=-1)
    k = torch.cat([k_nope, pe_ctx[:, None].expand(b, hn, length, dr)], dim=-1)  # (B, Hn, L, Dq)
    q = batch.pad(torch.cat([q_nope, q_pe], dim=-1)).transpose(1, 2)  # (B, Hn, Tq, Dq)
    out = _attend(q, k, v, batch.mask[:, None], shape.scale)  # (B, Hn, Tq, Dv)
    return batch.unpad(out.transpose(1, 2)).reshape(n, hn * dv)  # (N, Hn*Dv)


def _attend(q, k, v, mask, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over visible keys; (B, Hn, Tq, D) x (B, Hn, L, D) -> (B, Hn, Tq, Dv)."""
    if q.device.type == "cpu" or min(q.shape[-1], v.shape[-1]) >= 32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # SDPA's CUDA kernels returned wrong bf16 results at head dim 8 (torch 2.11, H200) while real MLA head dims
    # (192/128) matched; tiny heads take this plain path, which is cheap at their size.
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v)
