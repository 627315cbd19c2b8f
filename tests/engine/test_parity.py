"""Parity with transformers' DeepseekV2ForCausalLM on randomly drawn tiny configs.

Each case pins the features it covers (q path, routing method, norm_topk_prob, routed scaling, rope, dense
layers, biases) and draws the remaining sizes from its seed. Checked, all in fp32 on CPU:
  * teacher-forced log-probs (prefill path, expanded and absorbed attention) within 1e-4 of the reference;
  * greedy generation of a batch of mixed-length prompts (decode path) gives the reference's greedy tokens,
    and the returned log-probs match the reference's log_softmax at those positions within 1e-4;
  * the routing record names the experts the reference router picks.
"""

import pytest
import torch

from align.engine import Engine, SamplingParams

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.9, "mscale_all_dim": 0.7}
YARN_B = {**YARN, "factor": 8.0, "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 16.0, "beta_slow": 2.0}

CASES = {
    "q_full-greedy-default_rope-all_moe": dict(
        seed=1, q_lora_rank=None, topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
        first_k_dense_replace=0),
    "q_lora-group_limited-norm_topk-yarn-bias": dict(
        seed=2, q_lora_rank=16, topk_method="group_limited_greedy", n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=2.5, rope_parameters=YARN, first_k_dense_replace=1, attention_bias=True),
    "q_lora-greedy-norm_topk-yarn-two_dense-mlp_bias": dict(
        seed=3, q_lora_rank=24, topk_method="greedy", norm_topk_prob=True, routed_scaling_factor=0.5,
        rope_parameters=YARN_B, first_k_dense_replace=2, num_hidden_layers=3, mlp_bias=True),
    "q_full-group_limited-scaled16-yarn": dict(
        seed=4, q_lora_rank=None, topk_method="group_limited_greedy", n_group=2, topk_group=1,
        norm_topk_prob=False, routed_scaling_factor=16.0, rope_parameters=YARN, first_k_dense_replace=0),
}
LENGTHS = [3, 17, 9, 30]


def _case(tiny, name):
    fields = dict(CASES[name])
    seed = fields.pop("seed")
    config = tiny.config(seed=seed, **fields)
    return seed, config, tiny.model(config, seed=seed)


@pytest.mark.parametrize("name", CASES)
def test_teacher_forced_logprobs_match_reference(tiny, name):
    seed, config, model = _case(tiny, name)
    prompts = tiny.prompts(config.vocab_size, LENGTHS, seed=seed)
    completions = tiny.prompts(config.vocab_size, [8, 5, 12, 6], seed=seed + 100)
    ref = [tiny.ref_logprobs(model, p + c) for p, c in zip(prompts, completions)]
    assert max(r.max(-1).values.exp().max() for r in ref) > 3 / config.vocab_size, "logits too flat to test"
    for mode in ("expanded", "absorbed"):
        engine = Engine.from_model(model, block_size=4, use_tqdm=False, prefill_attention=mode)
        got = engine.score(prompts, completions)
        for p, c, r, g in zip(prompts, completions, ref, got):
            want = r[len(p) - 1 + torch.arange(len(c)), torch.tensor(c)]
            err = (torch.tensor(g) - want).abs().max().item()
            assert err < 1e-4, f"{mode}: max |engine - reference| logprob = {err}"


@pytest.mark.parametrize("name", CASES)
def test_greedy_generation_matches_reference(tiny, name):
    seed, config, model = _case(tiny, name)
    prompts = tiny.prompts(config.vocab_size, LENGTHS, seed=seed)
    engine = Engine.from_model(model, block_size=4, use_tqdm=False)
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    assert engine.stats.decode_steps >= 9  # the decode (absorbed) path produced most tokens
    for p, out in zip(prompts, outs):
        c = out.outputs[0]
        assert c.token_ids == tiny.ref_greedy(model, p, 10)
        assert c.finish_reason == "length"
        r = tiny.ref_logprobs(model, p + c.token_ids)
        want = r[len(p) - 1 + torch.arange(10), torch.tensor(c.token_ids)]
        assert (torch.tensor(c.logprobs) - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["q_full-greedy-default_rope-all_moe", "q_lora-group_limited-norm_topk-yarn-bias"])
def test_loop_moe_backend_matches_reference(tiny, name):
    seed, config, model = _case(tiny, name)
    prompts = tiny.prompts(config.vocab_size, LENGTHS, seed=seed)
    engine = Engine.from_model(model, block_size=4, use_tqdm=False, moe_backend="loop")
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == tiny.ref_greedy(model, p, 6)


@pytest.mark.parametrize("name", ["q_lora-group_limited-norm_topk-yarn-bias",
                                  "q_lora-greedy-norm_topk-yarn-two_dense-mlp_bias"])
def test_routing_record_matches_reference_router(tiny, name):
    seed, config, model = _case(tiny, name)
    prompts = tiny.prompts(config.vocab_size, [5, 11], seed=seed)
    engine = Engine.from_model(model, block_size=4, use_tqdm=False)
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True,
                                                    return_routing=True))
    moe_layers = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    for p, out in zip(prompts, outs):
        c = out.outputs[0]
        tokens = p + c.token_ids[:-1]  # the last completion token is never fed to the model
        picked = []
        hooks = [m.gate.register_forward_hook(lambda mod, i, o: picked.append(o[2])) for m in moe_layers]
        with torch.no_grad():
            model(torch.tensor([tokens]))
        for h in hooks:
            h.remove()
        want = torch.stack(picked, dim=1).sort(-1).values  # (T, n_moe, k)
        assert c.routing.shape == (len(tokens), len(moe_layers), config.num_experts_per_tok)
        assert torch.equal(c.routing.long().sort(-1).values, want)
