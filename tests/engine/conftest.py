"""Tiny random DeepseekV2 models and a reference greedy loop, shared by the engine tests."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.9, "mscale_all_dim": 0.7}


def tiny_config(seed: int = 0, **overrides) -> DeepseekV2Config:
    """A randomly drawn tiny MLA + MoE config; ``overrides`` pin the features a test is about."""
    rng = random.Random(seed)
    heads = rng.choice([2, 3, 4])
    fields = dict(
        vocab_size=rng.choice([96, 128, 160]), hidden_size=heads * rng.choice([8, 12, 16]),
        intermediate_size=rng.choice([32, 48]), moe_intermediate_size=rng.choice([8, 16]),
        num_hidden_layers=rng.choice([2, 3]), num_attention_heads=heads, num_key_value_heads=heads,
        q_lora_rank=None, kv_lora_rank=rng.choice([12, 16, 24]), qk_nope_head_dim=rng.choice([4, 8]),
        qk_rope_head_dim=rng.choice([4, 8]), v_head_dim=rng.choice([4, 8, 12]), n_routed_experts=8,
        n_shared_experts=rng.choice([1, 2]), num_experts_per_tok=rng.choice([2, 3]), first_k_dense_replace=1,
        topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=128,
        rms_norm_eps=rng.choice([1e-6, 1e-5]), rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )
    fields.update(overrides)
    return DeepseekV2Config(**fields)


def random_model(config: DeepseekV2Config, seed: int = 0, std: float = 0.2) -> DeepseekV2ForCausalLM:
    """Every parameter redrawn (norms around 1, router included) so routing and logits are far from uniform."""
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.shape[0] in (config.hidden_size, config.kv_lora_rank, config.q_lora_rank):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model


@torch.no_grad()
def reference_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """(T, V) log_softmax of the reference forward over the whole sequence, no cache, no padding."""
    return torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)


@torch.no_grad()
def reference_greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared machine OpenMP spin-waiting makes them erratic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_model():
    """One shared tiny model for the tests that are not about config coverage."""
    return random_model(tiny_config(seed=7, q_lora_rank=12, n_routed_experts=8, first_k_dense_replace=1), seed=7)


@pytest.fixture(scope="session")
def tiny():
    """The helpers above, for test modules (conftest is not importable under --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(config=tiny_config, model=random_model, ref_logprobs=reference_logprobs,
                           ref_greedy=reference_greedy, prompts=random_prompts, YARN=YARN)
