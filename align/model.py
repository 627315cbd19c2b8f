"""Model presets (DeepseekV2Config builders) and loading a starting checkpoint.

Presets keep MLA (latent KV + decoupled RoPE) and DeepSeekMoE (shared + routed experts) at every size, so the
tiny CPU model exercises the same code paths as DeepSeek-V2-Lite.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV2Config, DeepseekV2ForCausalLM

log = logging.getLogger(__name__)

# DeepSeek-V2-Lite and DeepSeek-V2 use YaRN-extended RoPE (factor 40 over a 4K original context).
_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}

PRESETS: dict[str, dict] = {
    # ~1.3M parameters with a 1K vocabulary: trains on 2 CPU cores in minutes.
    "tiny": dict(
        hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, topk_method="greedy", norm_topk_prob=False,
        routed_scaling_factor=1.0, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # ~0.5B parameters (with a 32K vocabulary): one GPU.
    "small": dict(
        hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=12,
        num_attention_heads=8, num_key_value_heads=8, q_lora_rank=None, kv_lora_rank=256,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32, n_shared_experts=2,
        num_experts_per_tok=4, first_k_dense_replace=1, topk_method="greedy", norm_topk_prob=False,
        routed_scaling_factor=1.0, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # DeepSeek-V2-Lite shapes (15.7B total, 2.4B active).
    "lite": dict(
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, first_k_dense_replace=1, topk_method="greedy", norm_topk_prob=False,
        routed_scaling_factor=1.0, max_position_embeddings=163840, rope_parameters=dict(_YARN),
    ),
    # Full DeepSeek-V2 shapes (236B total, 21B active), group-limited routing.
    "v2": dict(
        hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=60,
        num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160, n_shared_experts=2,
        num_experts_per_tok=6, first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=8,
        topk_group=3, norm_topk_prob=False, routed_scaling_factor=16.0, max_position_embeddings=163840,
        rope_parameters=dict(_YARN),
    ),
}

DEFAULT_VOCAB = {"tiny": 1024, "small": 32000, "lite": 102400, "v2": 102400}


def build_config(preset: str, vocab_size: int | None = None, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, **overrides) -> DeepseekV2Config:
    """A ``DeepseekV2Config`` for a named preset; ``overrides`` replace any preset field."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = {**PRESETS[preset], **overrides}
    return DeepseekV2Config(
        vocab_size=vocab_size or DEFAULT_VOCAB[preset], bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, tie_word_embeddings=False, **fields,
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_tokenizer(path: str | Path):
    """A tokenizer from a local folder or hub id; it must carry a chat template."""
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.chat_template is None:
        raise ValueError(f"tokenizer at {path} has no chat template; build it with `align data build`")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(preset: str | None, path: str | None, tokenizer, dtype: torch.dtype = torch.float32,
                seed: int = 0, overrides: dict | None = None) -> DeepseekV2ForCausalLM:
    """Load ``path`` (local folder or hub id) or build ``preset`` from scratch, sized to ``tokenizer``."""
    if (preset is None) == (path is None):
        raise ValueError("model: set exactly one of `path` (a checkpoint) or `preset` (build from scratch)")
    if path is not None:
        log.info("loading model from %s", path)
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    config = build_config(preset, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          **(overrides or {}))
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(config).to(dtype)
    log.info("built %s preset from scratch: %.2fM parameters", preset, count_parameters(model) / 1e6)
    return model
