"""Routing replay: the trainer's forward on the engine's experts, the mismatch count, and the records' alignment."""

import copy

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

from align.engine import Engine
from align.engine_rollout import _full_routing
from align.rollout import run_groups
from align.router_hooks import RouterHooks
from align.routing_replay import routes_tensor
from ray_jobs.records import PromptGroup, Sampling

TOP_K = 2


def tiny_moe(moe_layers: int = 2, dense: bool = False, seed: int = 0) -> DeepseekV2ForCausalLM:
    """A random MLA model with ``moe_layers`` MoE layers after one dense one (all dense with ``dense``)."""
    config = DeepseekV2Config(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=moe_layers + 1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=TOP_K, first_k_dense_replace=moe_layers + 1 if dense else 1, topk_method="greedy",
        norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(config).eval()
    with torch.no_grad():   # far from uniform routing and logits
        for p in model.parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p)) if p.dim() == 1 else p.normal_(0.0, 0.2)
    return model


def perturbed_routers(model, scale: float) -> DeepseekV2ForCausalLM:
    out = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for module in out.modules():
            if type(module).__name__ == "DeepseekV2TopkRouter":
                module.weight.add_(scale * torch.randn_like(module.weight))
    return out


@pytest.fixture(scope="module")
def policy():
    torch.set_num_threads(1)
    return tiny_moe()


def rollout_batch(engine_model):
    """Sample 3 prompts x 2 on the engine and lay the rows out as TRL does: left-padded prompts, right-padded
    completions.  Returns (input_ids, attention_mask, prompt width P, engine logprobs (B, C), completion mask, rows)."""
    engine = Engine.from_model(engine_model, block_size=4, use_tqdm=False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (3, 7, 5)]
    records = run_groups(engine, [PromptGroup(i, p, seed=i) for i, p in enumerate(prompts)],
                         Sampling(n=2, temperature=1.0, top_p=1.0, top_k=0, max_tokens=10,
                                  stop_token_ids=list(range(0, 96, 8)), return_routing=True), worker="test")
    rows = [(r, c) for r in records for c in r.completions]
    p_max = max(len(r.prompt_ids) for r, _ in rows)
    c_max = max(len(c.token_ids) for _, c in rows)
    ids = torch.zeros(len(rows), p_max + c_max, dtype=torch.long)
    mask = torch.zeros_like(ids)
    logprobs = torch.zeros(len(rows), c_max)
    comp_mask = torch.zeros(len(rows), c_max, dtype=torch.bool)
    for i, (r, c) in enumerate(rows):
        p, t = len(r.prompt_ids), len(c.token_ids)
        ids[i, p_max - p:p_max], ids[i, p_max:p_max + t] = torch.tensor(r.prompt_ids), torch.tensor(c.token_ids)
        mask[i, p_max - p:p_max + t] = 1
        logprobs[i, :t], comp_mask[i, :t] = torch.tensor(c.logprobs), True
    assert len({len(c.token_ids) for _, c in rows}) > 1, "the batch should mix completion lengths"
    return ids, mask, p_max, logprobs, comp_mask, [_full_routing(r, c) for r, c in rows]


def trainer_gap(trainer_model, batch, replay: bool):
    """Max and mean |engine - trainer| log-prob over completion tokens, and the per-layer routing mismatch."""
    ids, mask, p, engine_lp, comp_mask, rows = batch
    hooks = RouterHooks()
    n_layers = hooks.attach(trainer_model)
    hooks.replay = replay
    hooks.set_routes(routes_tensor(rows, mask[:, :p], ids.shape[1], n_layers, TOP_K), "cpu")
    with torch.no_grad(), hooks.measuring(capture=False):
        logits = trainer_model(ids, attention_mask=mask).logits[:, p - 1:-1].float()    # (B, C, V)
    hooks.detach()
    lp = logits.log_softmax(-1).gather(-1, ids[:, p:, None])[..., 0]                    # (B, C)
    gap = (lp - engine_lp).abs()[comp_mask]
    return gap.max().item(), gap.mean().item(), hooks.pop_mismatch()


def test_replayed_logprobs_match_the_engine_as_closely_as_dense_layers_do(policy):
    dense = tiny_moe(dense=True)
    dense_max, _, _ = trainer_gap(dense, rollout_batch(dense), replay=False)
    batch = rollout_batch(policy)
    replay_max, _, mismatch = trainer_gap(policy, batch, replay=True)
    assert mismatch == [0.0, 0.0]
    assert replay_max < max(1e-4, 4 * dense_max)


def test_perturbed_router_differs_without_replay_and_replay_closes_the_gap(policy):
    batch = rollout_batch(policy)                 # the engine samples with the unperturbed routers
    trainer = perturbed_routers(policy, scale=0.005)
    off_max, off_mean, off_mismatch = trainer_gap(trainer, batch, replay=False)
    on_max, on_mean, _ = trainer_gap(trainer, batch, replay=True)
    assert max(off_mismatch) > 0                  # some tokens' top-k sets moved
    assert off_max > 0.05                         # ... and those tokens' log-probs moved a lot
    # With replay only the gating weights differ (a 0.005 nudge): the worst token gets much closer.
    assert on_max < off_max / 4 and on_mean < off_mean


def test_replay_keeps_the_router_gradient(policy):
    model = copy.deepcopy(policy).train()
    batch = rollout_batch(policy)
    ids, mask, p, _, _, rows = batch
    hooks = RouterHooks()
    hooks.attach(model)
    hooks.replay = True
    hooks.set_routes(routes_tensor(rows, mask[:, :p], ids.shape[1], hooks.n_layers, TOP_K), "cpu")
    model(ids, attention_mask=mask).logits.float().logsumexp(-1).mean().backward()
    routers = [m for m in model.modules() if type(m).__name__ == "DeepseekV2TopkRouter"]
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routers)


def test_routes_tensor_places_each_record_after_the_left_padding():
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])       # prompts of 2 and 4 tokens, P = 4
    rec0 = torch.arange(4 * 2 * 2).view(4, 2, 2)                   # 2 prompt + 3 completion tokens, less one
    rec1 = 100 + torch.arange(5 * 2 * 2).view(5, 2, 2)              # 4 prompt + 2 completion tokens, less one
    out = routes_tensor([rec0, rec1], prompt_mask, seq_len=7, n_layers=2, k=2)
    assert out.shape == (2, 7, 2, 2) and out.dtype == torch.int16
    assert torch.equal(out[0, 2:6], rec0.to(torch.int16)) and (out[0, [0, 1, 6]] == -1).all()
    assert torch.equal(out[1, 0:5], rec1.to(torch.int16)) and (out[1, 5:] == -1).all()
    empty = routes_tensor([None, rec1], prompt_mask, seq_len=7, n_layers=2, k=2)
    assert (empty[0] == -1).all()                                   # a row without a record: the trainer routes
    with pytest.raises(ValueError, match="1 routing records for a batch of 2"):
        routes_tensor([rec0], prompt_mask, 7, 2, 2)
    with pytest.raises(ValueError, match=r"row 1 has shape \(5, 2, 2\), expected \(\*, 3, 2\)"):
        routes_tensor([None, rec1], prompt_mask, 7, 3, 2)


def test_hooks_refuse_records_of_another_shape(policy):
    hooks = RouterHooks()
    assert hooks.attach(policy) == 2
    assert hooks.attach(policy) == 2 and len(hooks._handles) == 2   # hooking twice adds nothing
    with pytest.raises(ValueError, match="3 MoE layers, the policy 2"):
        hooks.set_routes(torch.zeros(1, 4, 3, TOP_K, dtype=torch.int16), "cpu")
    with pytest.raises(ValueError, match="model has 1 MoE layers, the hooked policy 2"):
        hooks.attach(tiny_moe(moe_layers=1))
    hooks.set_routes(torch.zeros(1, 4, 2, TOP_K, dtype=torch.int16), "cpu")
    try:
        with pytest.raises(RuntimeError, match="routing record covers 4 tokens x 2 experts, the forward 5"):
            policy(torch.zeros(1, 5, dtype=torch.long))
    finally:
        hooks.detach()
