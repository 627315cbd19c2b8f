"""The engine's copy of a DeepseekV2ForCausalLM's weights, laid out for inference.

Tensors are allocated once from the config and then filled in place from a state dict that uses transformers'
parameter names, so swapping weights during RL never re-allocates (and views into these tensors stay valid).
Two layout changes from the reference:
  * dense / shared MLPs keep gate and up stacked in one (2I, H) matrix: one matmul instead of two;
  * ``kv_b_proj`` is additionally split per head into W_UK (H, Dn, R) and W_UV^T (H, R, Dv), the matrices the
    absorbed attention multiplies the query and the latent output by. They are re-derived on every load.
With ``weight_dtype='fp8'`` the projections are ``Fp8Weight``s, quantised as they are loaded (fp8_weights.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from .fp8_weights import Fp8Weight

Weight = torch.Tensor | Fp8Weight  # a projection: a plain tensor, or FP8 with block scales


@dataclass
class DenseMLPWeights:
    gate_up: Weight  # (2I, H): gate rows first, then up rows
    down: Weight  # (H, I)
    gate_up_bias: torch.Tensor | None = None  # (2I,)
    down_bias: torch.Tensor | None = None  # (H,)


@dataclass
class MoEWeights:
    router: torch.Tensor  # (E, H), always fp32: the reference routes in fp32
    gate_up: Weight  # (E, 2I, H)
    down: Weight  # (E, H, I)
    shared: DenseMLPWeights | None  # shared experts, one MLP of width n_shared * I


@dataclass
class AttentionWeights:
    q_proj: Weight | None  # (Hn*Dq, H) when q_lora_rank is None
    q_a_proj: Weight | None  # (Rq, H)
    q_a_bias: torch.Tensor | None
    q_a_norm: torch.Tensor | None  # (Rq,)
    q_b_proj: Weight | None  # (Hn*Dq, Rq)
    kv_a_proj: Weight  # (R + Dr, H): latent then shared rope key
    kv_a_bias: torch.Tensor | None
    kv_a_norm: torch.Tensor  # (R,)
    kv_b_proj: torch.Tensor  # (Hn*(Dn+Dv), R): per head, Dn key rows then Dv value rows
    o_proj: Weight  # (H, Hn*Dv)
    o_bias: torch.Tensor | None
    w_uk: torch.Tensor  # (Hn, Dn, R), derived from kv_b_proj
    w_uv_t: torch.Tensor  # (Hn, R, Dv), derived from kv_b_proj
    # The two projections of x, stacked so a decode step makes one matmul: [q_proj | kv_a_proj] (or
    # [q_a_proj | kv_a_proj]) as rows of one (Q + R + Dr, H) matrix whose row slices are those tensors.
    x_proj: Weight | None = None
    x_proj_bias: torch.Tensor | None = None  # (Q + R + Dr,) when both parts have biases


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # (H,)
    post_norm: torch.Tensor  # (H,)
    attn: AttentionWeights
    mlp: DenseMLPWeights | MoEWeights


@dataclass
class ModelWeights:
    embed: torch.Tensor  # (V, H)
    norm: torch.Tensor  # (H,)
    lm_head: torch.Tensor  # (V, H); the same tensor as embed when embeddings are tied
    layers: list[LayerWeights] = field(default_factory=list)
    tied: bool = False

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def allocate(cls, config, device, dtype: torch.dtype, weight_dtype: str = "auto") -> ModelWeights:
        """Uninitialised tensors for ``config``; use ``device='meta'`` to size a model without memory.

        ``weight_dtype='fp8'``: the attention and MLP / expert projections as ``Fp8Weight`` (128 x 128 block
        scales, see fp8_weights.py); embeddings, norms, router, kv_b_proj and the head stay in ``dtype``.
        """
        if weight_dtype not in ("auto", "fp8"):
            raise ValueError(f"weight_dtype must be 'auto' (the engine's dtype) or 'fp8', got {weight_dtype!r}")
        c = config

        def t(*shape, dt=dtype):
            return torch.empty(*shape, device=device, dtype=dt)

        def w(*shape):  # a projection matrix (or stack)
            return Fp8Weight.empty(*shape, device=device) if weight_dtype == "fp8" else t(*shape)

        hn, dn, dr, dv, r = (c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
                             c.kv_lora_rank)
        h, dq = c.hidden_size, dn + dr
        ab = bool(getattr(c, "attention_bias", False))

        def mlp(width):
            mb = bool(getattr(c, "mlp_bias", False))
            return DenseMLPWeights(w(2 * width, h), w(h, width), t(2 * width) if mb else None, t(h) if mb else None)

        layers = []
        for i in range(c.num_hidden_layers):
            q_lora = c.q_lora_rank
            q_rows = hn * dq if q_lora is None else q_lora
            # q_proj has no bias, so with attention_bias only the LoRA form ([q_a | kv_a], both biased) stacks.
            stacked = q_lora is not None or not ab
            x_proj = w(q_rows + r + dr, h) if stacked else None
            x_bias = t(q_rows + r + dr) if stacked and ab else None
            q_part = x_proj[:q_rows] if stacked else w(q_rows, h)
            attn = AttentionWeights(
                q_proj=q_part if q_lora is None else None,
                q_a_proj=q_part if q_lora is not None else None,
                q_a_bias=x_bias[:q_lora] if x_bias is not None else (t(q_lora) if q_lora is not None and ab else None),
                q_a_norm=t(q_lora) if q_lora is not None else None,
                q_b_proj=w(hn * dq, q_lora) if q_lora is not None else None,
                kv_a_proj=x_proj[q_rows:] if stacked else w(r + dr, h),
                kv_a_bias=x_bias[q_rows:] if x_bias is not None else (t(r + dr) if ab else None), kv_a_norm=t(r),
                kv_b_proj=t(hn * (dn + dv), r), o_proj=w(h, hn * dv), o_bias=t(h) if ab else None,
                w_uk=t(hn, dn, r), w_uv_t=t(hn, r, dv), x_proj=x_proj, x_proj_bias=x_bias,
            )
            if i >= c.first_k_dense_replace:
                e, im = c.n_routed_experts, c.moe_intermediate_size
                n_shared = c.n_shared_experts or 0
                ffn = MoEWeights(router=t(e, h, dt=torch.float32), gate_up=w(e, 2 * im, h), down=w(e, h, im),
                                 shared=mlp(im * n_shared) if n_shared > 0 else None)
            else:
                ffn = mlp(c.intermediate_size)
            layers.append(LayerWeights(t(h), t(h), attn, ffn))
        embed = t(c.vocab_size, h)
        tied = bool(getattr(c, "tie_word_embeddings", False))
        return cls(embed=embed, norm=t(h), lm_head=embed if tied else t(c.vocab_size, h), layers=layers, tied=tied)

    # -- name map -----------------------------------------------------------------------------------------------
    def targets(self) -> dict[str, torch.Tensor]:
        """transformers parameter name -> the tensor (or view of one) its values are copied into."""
        out = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        if not self.tied:
            out["lm_head.weight"] = self.lm_head
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = layer.input_norm
            out[p + "post_attention_layernorm.weight"] = layer.post_norm
            a, sa = layer.attn, p + "self_attn."
            named = {"q_proj.weight": a.q_proj, "q_a_proj.weight": a.q_a_proj, "q_a_proj.bias": a.q_a_bias,
                     "q_a_layernorm.weight": a.q_a_norm, "q_b_proj.weight": a.q_b_proj,
                     "kv_a_proj_with_mqa.weight": a.kv_a_proj, "kv_a_proj_with_mqa.bias": a.kv_a_bias,
                     "kv_a_layernorm.weight": a.kv_a_norm, "kv_b_proj.weight": a.kv_b_proj,
                     "o_proj.weight": a.o_proj, "o_proj.bias": a.o_bias}
            out.update({sa + k: v for k, v in named.items() if v is not None})
            mlp = layer.mlp
            if isinstance(mlp, MoEWeights):
                out[p + "mlp.gate.weight"] = mlp.router
                out[p + "mlp.experts.gate_up_proj"] = mlp.gate_up
                out[p + "mlp.experts.down_proj"] = mlp.down
                if mlp.shared is not None:
                    out.update(_mlp_targets(p + "mlp.shared_experts.", mlp.shared))
            else:
                out.update(_mlp_targets(p + "mlp.", mlp))
        return out

    # -- loading ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def load_(self, state_dict: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
              strict: bool = True) -> None:
        """Copy ``state_dict`` (transformers names) into the existing tensors, then re-derive W_UK / W_UV.

        ``strict``: every engine tensor must be given and every given name must be known; with ``strict=False``
        a subset may be given (names the engine does not know still fail: they are almost always a bug).
        """
        targets = self.targets()
        items = state_dict.items() if isinstance(state_dict, Mapping) else state_dict
        seen, unknown = set(), []
        for name, value in items:
            if name not in targets:
                if name == "lm_head.weight" and self.tied:
                    continue
                if name.endswith("rotary_emb.inv_freq"):  # a buffer some older checkpoints carry
                    continue
                unknown.append(name)
                continue
            dst = targets[name]
            if tuple(value.shape) != tuple(dst.shape):
                raise ValueError(f"load_weights: {name} has shape {tuple(value.shape)}, the engine expects "
                                 f"{tuple(dst.shape)}")
            dst.copy_(value)
            seen.add(name)
        if unknown:
            raise KeyError(f"load_weights: {len(unknown)} names the engine does not know, e.g. {unknown[:5]}")
        if strict and (missing := sorted(set(targets) - seen)):
            raise KeyError(f"load_weights: {len(missing)} weights missing from the state dict, e.g. {missing[:5]}")
        self.derive_()

    @torch.no_grad()
    def derive_(self) -> None:
        """Recompute the absorbed-attention matrices from ``kv_b_proj`` (in place)."""
        for layer in self.layers:
            a = layer.attn
            hn, dn, r = a.w_uk.shape
            kv_b = a.kv_b_proj.view(hn, -1, r)  # (Hn, Dn+Dv, R)
            a.w_uk.copy_(kv_b[:, :dn])  # (Hn, Dn, R)
            a.w_uv_t.copy_(kv_b[:, dn:].transpose(1, 2))  # (Hn, R, Dv)

    def num_bytes(self) -> int:
        seen, total = set(), 0
        for t in self.targets().values():
            for base in t.bases() if isinstance(t, Fp8Weight) else [t._base if t._base is not None else t]:
                if id(base) not in seen:
                    seen.add(id(base))
                    total += base.numel() * base.element_size()
        return total

    @property
    def fp8(self) -> bool:
        """Whether the projections are held as FP8 (``allocate(..., weight_dtype='fp8')``)."""
        return isinstance(self.layers[0].attn.o_proj, Fp8Weight) if self.layers else False


def _mlp_targets(prefix: str, mlp: DenseMLPWeights) -> dict[str, torch.Tensor]:
    width = mlp.down.shape[1]
    out = {prefix + "gate_proj.weight": mlp.gate_up[:width], prefix + "up_proj.weight": mlp.gate_up[width:],
           prefix + "down_proj.weight": mlp.down}
    if mlp.gate_up_bias is not None:
        out[prefix + "gate_proj.bias"] = mlp.gate_up_bias[:width]
        out[prefix + "up_proj.bias"] = mlp.gate_up_bias[width:]
        out[prefix + "down_proj.bias"] = mlp.down_bias
    return out
