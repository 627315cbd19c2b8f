"""The decode forward pass on CUDA from fused Triton kernels: one new token per sequence.

Same maths as ``ModelRunner.forward``'s torch path, about 20 launches per layer instead of about 75: the
residual add is fused into the next RMSNorm, the MLA cache write, norm and rope into one kernel, attention reads
the paged cache through the block tables (``triton_mla``), and the routed experts run as sorted grouped matmuls
that read each used expert's weights once (``triton_moe``). Dense matmuls stay with cuBLAS.

Only built where it can run: a CUDA device, Triton importable, SiLU experts (``available``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import LATENT_NORM_EPS, AttnBatch, MLAShape
from .cache import LatentCache
from .moe import Routing
from .ops import rms_norm
from .weights import AttentionWeights, DenseMLPWeights, ModelWeights, MoEWeights


def available(config, device: torch.device) -> str | None:
    """None when the fused decode path can run here, else why not."""
    if device.type != "cuda":
        return "not a CUDA device"
    if config.hidden_act != "silu":
        return f"hidden_act {config.hidden_act!r} (the kernels implement silu)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


class FusedDecoder:
    def __init__(self, weights: ModelWeights, cache: LatentCache, shape: MLAShape, routing: Routing, eps: float):
        from . import triton_mla, triton_moe, triton_ops

        self.mla, self.moe, self.ops = triton_mla, triton_moe, triton_ops
        self.weights = weights
        self.cache = cache
        self.shape = shape
        self.routing = routing
        self.eps = eps
        device = weights.embed.device
        # (Not CUDA only under Triton's CPU interpreter, which tests use.)
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, batch: AttnBatch, logit_rows: torch.Tensor | None,
                record_routing: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B,) one new token per sequence -> fp32 logits (M, V) at ``logit_rows`` (None: all), routing or None."""
        w, layers, eps = self.weights, self.weights.layers, self.eps
        if batch.context_lens is None or batch.query_len != 1:
            raise ValueError("the fused decode path takes decode batches (one new token per sequence)")
        rope = torch.view_as_real(batch.freqs)  # (B, Dr/2, 2) fp32: scaled cos, sin
        h = F.embedding(input_ids, w.embed)  # (B, H); updated in place by the fused residual adds
        x, _ = self.ops.add_rms_norm(h, None, layers[0].input_norm, eps)
        routes = []
        for i, layer in enumerate(layers):
            attn = self._attention(layer.attn, x, batch, rope, i)
            moe = isinstance(layer.mlp, MoEWeights)
            x, xf = self.ops.add_rms_norm(h, attn, layer.post_norm, eps, want_f32=moe)
            next_norm = layers[i + 1].input_norm if i + 1 < len(layers) else w.norm
            if moe:
                x, idx = self._moe(layer.mlp, x, xf, h, next_norm)
                if record_routing:
                    routes.append(idx)
            else:
                x, _ = self.ops.add_rms_norm(h, self._dense(layer.mlp, x), next_norm, eps)
        if logit_rows is not None:
            x = x[logit_rows]
        logits = F.linear(x, w.lm_head).float()  # x is already normalised by the final norm
        routing = torch.stack(routes, dim=1) if routes else None  # (B, n_moe, k) int32
        return logits, routing

    def _attention(self, a: AttentionWeights, x: torch.Tensor, batch: AttnBatch, rope: torch.Tensor,
                   layer: int) -> torch.Tensor:
        s = self.shape
        n, hn, dn = x.shape[0], s.num_heads, s.nope_dim
        if a.x_proj is not None:  # both projections of x in one matmul; q and kv are column slices of it
            both = F.linear(x, a.x_proj, a.x_proj_bias)  # (B, Q + R+Dr)
            q, kv = both.split([both.shape[1] - a.kv_a_proj.shape[0], a.kv_a_proj.shape[0]], dim=1)
        else:
            q = F.linear(x, a.q_proj if a.q_proj is not None else a.q_a_proj,
                         None if a.q_proj is not None else a.q_a_bias)
            kv = F.linear(x, a.kv_a_proj, a.kv_a_bias)  # (B, R+Dr)
        if a.q_proj is None:
            q = F.linear(rms_norm(q, a.q_a_norm, LATENT_NORM_EPS), a.q_b_proj)
        q = q.view(n, hn, dn + s.rope_dim)  # (B, Hn, Dq)
        entries = self.cache.kv[layer].view(-1, self.cache.kv.shape[-1])  # (slots, R+Dr)
        self.mla.mla_prep(kv, q, a.kv_a_norm, rope, batch.slots, entries, LATENT_NORM_EPS, dn)
        q_lat = torch.bmm(q[..., :dn].transpose(0, 1), a.w_uk)  # (Hn, B, Dn) @ (Hn, Dn, R) -> (Hn, B, R)
        out_lat = self.mla.mla_decode(q_lat, q, entries, batch.block_tables, batch.context_lens,
                                      self.cache.block_size, batch.context_len, s.scale, dn, self.num_sms)
        out = torch.bmm(out_lat, a.w_uv_t)  # (Hn, B, R) @ (Hn, R, Dv) -> (Hn, B, Dv)
        return F.linear(out.transpose(0, 1).reshape(n, hn * s.v_dim), a.o_proj, a.o_bias)

    def _moe(self, m: MoEWeights, x: torch.Tensor, xf: torch.Tensor, h: torch.Tensor, next_norm: torch.Tensor):
        plan = self.moe.route_and_plan(F.linear(xf, m.router), self.routing)  # fp32 logits (B, E)
        y = self.moe.routed_experts(x, plan, m.gate_up, m.down)  # (B*k, H) sorted by expert
        shared = self._dense(m.shared, x) if m.shared is not None else None
        return self.moe.combine_add_norm(y, plan, shared, h, next_norm, self.eps), plan.idx

    def _dense(self, mlp: DenseMLPWeights, x: torch.Tensor) -> torch.Tensor:
        act = self.ops.silu_mul(F.linear(x, mlp.gate_up, mlp.gate_up_bias))  # (B, I)
        return F.linear(act, mlp.down, mlp.down_bias)
