"""The same guarantees on a CUDA device (skipped where there is none)."""

import pytest
import torch

from align.engine import Engine, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.9, "mscale_all_dim": 0.7}
# Sizes that are multiples of 8 so bf16 rows meet the grouped-GEMM alignment and the grouped path runs.
ALIGNED = dict(num_attention_heads=4, num_key_value_heads=4, hidden_size=64, moe_intermediate_size=16,
               intermediate_size=64, q_lora_rank=16, topk_method="group_limited_greedy", n_group=4, topk_group=2,
               routed_scaling_factor=2.0, rope_parameters=YARN, first_k_dense_replace=1)


def test_cuda_fp32_matches_reference(tiny):
    config = tiny.config(seed=2, **ALIGNED)
    model = tiny.model(config, seed=2).cuda()
    prompts = tiny.prompts(config.vocab_size, [3, 17, 9, 30], seed=2)
    engine = Engine.from_model(model, block_size=4, use_tqdm=False)
    assert engine.device.type == "cuda"
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        with torch.no_grad():
            ids = list(p)
            for _ in range(8):
                ids.append(int(model(torch.tensor([ids], device="cuda")).logits[0, -1].argmax()))
            ref = torch.log_softmax(model(torch.tensor([ids], device="cuda")).logits[0].float(), -1).cpu()
        assert c.token_ids == ids[len(p):]
        want = ref[len(p) - 1 + torch.arange(8), torch.tensor(c.token_ids)]
        assert (torch.tensor(c.logprobs) - want).abs().max() < 1e-3  # TF32-free fp32 on GPU, loose for cuBLAS


def test_cuda_bf16_grouped_experts_and_seeds(tiny):
    config = tiny.config(seed=3, **ALIGNED)
    model = tiny.model(config, seed=3)
    prompts = tiny.prompts(config.vocab_size, [5, 21, 12], seed=3)
    engine = Engine.from_model(model, device="cuda", dtype=torch.bfloat16, block_size=4, use_tqdm=False)
    assert engine.runner.moe_backend == "grouped"
    sp = SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=7, ignore_eos=True)
    together = engine.generate(prompts, sp)
    alone = engine.generate(prompts[1:2], sp)[0]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in together[1].outputs]
    ref = Engine.from_model(model, block_size=4, use_tqdm=False)  # fp32 on CPU
    scored = ref.score(prompts, [o.outputs[0].token_ids for o in together])
    for o, s in zip(together, scored):
        assert (torch.tensor(o.outputs[0].logprobs) - torch.tensor(s)).abs().max() < 0.15
    assert engine.blocks.num_used == 0
