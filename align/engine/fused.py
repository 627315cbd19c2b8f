"""The forward pass on CUDA from fused Triton kernels: decode steps, and prefills of a few hundred tokens.

Same maths as ``ModelRunner.forward``'s torch path, about 11 launches per layer at decode instead of about 70:
the residual add is fused into the next RMSNorm (which also computes the router's logits for steps of a few
tokens), the MLA cache write, norm, rope and the W_UK product into one kernel, the W_UV product into the
attention's split reduce, and the routed experts run as sorted grouped matmuls that read each used expert's
weights once (``triton_moe``). Dense matmuls stay with cuBLAS, except on FP8 weights, which every matmul but
the head's reads as bytes (``triton_fp8``). Decode attention reads the paged cache through the block tables
(``triton_mla``); a prefill attends in the expanded form over the gathered context, as the torch path does.
Small prefills are bound by the host launching kernels, not by the GPU (a 128-token prompt of DeepSeek-V2-Lite:
~1,800 launches, ~58 ms, ~15 ms of GPU work), so fewer launches is what speeds them up; large ones keep the
torch path, whose grouped matmuls (cuBLAS) do the expert FLOPs better than these memory-bound kernels.

Only built where it can run: a CUDA device, Triton importable, SiLU experts (``available``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import LATENT_NORM_EPS, AttnBatch, MLAShape, expanded_attention
from .cache import LatentCache
from .fp8_weights import Fp8Weight
from .moe import Routing
from .ops import rms_norm
from .weights import AttentionWeights, DenseMLPWeights, ModelWeights, MoEWeights, Weight


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
        from . import triton_fp8, triton_mla, triton_moe, triton_ops

        self.mla, self.moe, self.ops, self.fp8 = triton_mla, triton_moe, triton_ops, triton_fp8
        self.max_shared_rows = triton_moe.MAX_SHARED_ROWS  # steps this small: shared experts in the expert kernels
        self.max_router_rows = triton_ops.MAX_ROUTER_ROWS  # and router logits in the norm kernel
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
        """(N,) new tokens -> fp32 logits (M, V) at packed rows ``logit_rows`` (None: all), and the routed experts
        of every new token (N, n_moe, k) int32 or None. Decode batches (``context_lens`` set, one token per
        sequence) attend through the Triton kernel, any other batch in the expanded form."""
        w, layers, eps = self.weights, self.weights.layers, self.eps
        rope = torch.view_as_real(batch.freqs)  # (N, Dr/2, 2) fp32: scaled cos, sin
        h = F.embedding(input_ids, w.embed)  # (N, H) residual stream, updated in place by most fused adds
        x, _ = self.ops.add_rms_norm(h, None, layers[0].input_norm, eps)
        routes = []
        for i, layer in enumerate(layers):
            attn = self._attention(layer.attn, x, batch, rope, i)
            next_norm = layers[i + 1].input_norm if i + 1 < len(layers) else w.norm
            if isinstance(layer.mlp, MoEWeights):
                if h.shape[0] <= self.max_router_rows:  # router logits from the norm kernel; h is a new tensor
                    h, x, scores = self.ops.add_rms_norm_router(h, attn, layer.post_norm, layer.mlp.router, eps)
                else:
                    x, xf = self.ops.add_rms_norm(h, attn, layer.post_norm, eps, want_f32=True)
                    scores = F.linear(xf, layer.mlp.router)  # (B, E) fp32 router logits
                x, idx = self._moe(layer.mlp, x, scores, h, next_norm)
                if record_routing:
                    routes.append(idx)
            else:
                x, _ = self.ops.add_rms_norm(h, attn, layer.post_norm, eps)
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
            both = self._linear(x, a.x_proj, a.x_proj_bias)  # (B, Q + R+Dr)
            q, kv = both.split([both.shape[1] - a.kv_a_proj.shape[0], a.kv_a_proj.shape[0]], dim=1)
        else:
            q = self._linear(x, a.q_proj if a.q_proj is not None else a.q_a_proj,
                             None if a.q_proj is not None else a.q_a_bias)
            kv = self._linear(x, a.kv_a_proj, a.kv_a_bias)  # (B, R+Dr)
        if a.q_proj is None:
            q = self._linear(rms_norm(q, a.q_a_norm, LATENT_NORM_EPS), a.q_b_proj)
        q = q.view(n, hn, dn + s.rope_dim)  # (B, Hn, Dq)
        entries = self.cache.kv[layer].view(-1, self.cache.kv.shape[-1])  # (slots, R+Dr), FP8 bytes or dtype
        scales = self.cache.scale[layer].view(-1) if self.cache.fp8 else None  # (slots,) FP8 entries' scales
        decode = batch.context_lens is not None and batch.query_len == 1
        # Decode also gets the absorbed query (Hn, B, R); a prefill's q has its rope applied, the cache written.
        q_lat = self.mla.mla_prep(kv, q, a.kv_a_norm, rope, batch.slots, entries, LATENT_NORM_EPS, dn,
                                  a.w_uk if decode else None, kv_scale=scales)
        if not decode:
            ctx = self.cache.gather(layer, batch.block_tables, batch.context_len)  # (B, L, R+Dr)
            out = expanded_attention(a, q[..., :dn], q[..., dn:], ctx, batch, s)  # (N, Hn*Dv)
        else:
            out = self.mla.mla_decode(q_lat, q, entries, batch.block_tables, batch.context_lens,
                                      self.cache.block_size, batch.context_len, s.scale, dn, self.num_sms,
                                      a.w_uv_t, kv_scale=scales)  # (B, Hn*Dv)
        return self._linear(out, a.o_proj, a.o_bias)

    def _moe(self, m: MoEWeights, x: torch.Tensor, logits: torch.Tensor, h: torch.Tensor, next_norm: torch.Tensor):
        plan = self.moe.route_and_plan(logits, self.routing)
        sh = m.shared
        inside = (sh is not None and sh.gate_up_bias is None and sh.down_bias is None
                  and x.shape[0] <= self.max_shared_rows
                  and self.moe.shared_fits(sh.gate_up, sh.down, m.down.shape[2]))
        # (B*k, H) routed rows sorted by expert; (B, H) shared experts when they ran in the same launches
        y, shared = self.moe.routed_experts(x, plan, m.gate_up, m.down, (sh.gate_up, sh.down) if inside else None)
        if sh is not None and not inside:
            shared = self._dense(sh, x)
        return self.moe.combine_add_norm(y, plan, shared, h, next_norm, self.eps), plan.idx

    def _dense(self, mlp: DenseMLPWeights, x: torch.Tensor) -> torch.Tensor:
        act = self.ops.silu_mul(self._linear(x, mlp.gate_up, mlp.gate_up_bias))  # (B, I)
        return self._linear(act, mlp.down, mlp.down_bias)

    def _linear(self, x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """A projection: cuBLAS on a plain weight, the FP8-reading kernel on an ``Fp8Weight``."""
        if isinstance(w, Fp8Weight):
            return self.fp8.fp8_linear(x, w, bias, self.num_sms)
        return F.linear(x, w, bias)
