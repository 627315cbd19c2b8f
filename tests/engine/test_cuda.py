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


def _tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_cuda_fp32_matches_reference_and_is_batch_invariant(tiny):
    config = tiny.config(seed=2, **ALIGNED)
    model = tiny.model(config, seed=2).cuda()
    prompts = tiny.prompts(config.vocab_size, [3, 17, 9, 30], seed=2)
    engine = Engine.from_model(model, block_size=4, use_tqdm=False)
    assert engine.device.type == "cuda" and engine.runner.moe_backend == "grouped"
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
        assert (torch.tensor(c.logprobs) - want).abs().max() < 1e-3
    sp = SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=7, ignore_eos=True)
    assert _tokens(engine.generate(prompts, sp))[1] == _tokens(engine.generate(prompts[1:2], sp))[0]


def test_cuda_bf16_graphs_match_fp32_scores(tiny):
    config = tiny.config(seed=3, **ALIGNED)
    model = tiny.model(config, seed=3)
    prompts = tiny.prompts(config.vocab_size, [5, 21, 12], seed=3)
    ref = Engine.from_model(model, block_size=4, use_tqdm=False)  # fp32 on CPU
    sp = SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=7, ignore_eos=True)
    errors = {}
    for kernels in ("triton", "torch"):
        engine = Engine.from_model(model, device="cuda", dtype=torch.bfloat16, block_size=4, use_tqdm=False,
                                   decode_kernels=kernels)
        assert engine.graphs is not None and engine.graphs.capture
        together = engine.generate(prompts, sp)
        assert engine.graphs.graphs, "decode steps should have been captured"
        assert _tokens(engine.generate(prompts, sp)) == _tokens(together)  # replays are deterministic
        errs = []
        for i in range(3):
            scored = ref.score(prompts, [o.outputs[i].token_ids for o in together])
            errs += [(torch.tensor(o.outputs[i].logprobs) - torch.tensor(s)).abs() for o, s in zip(together, scored)]
        errors[kernels] = torch.cat(errs)
        assert engine.blocks.num_used == 0
    # bf16 rounding alone moves this random model's log-probs by tenths (the reference's own bf16 too): the fused
    # kernels must stay within the torch decode path's noise.
    assert errors["triton"].mean() < 1.5 * errors["torch"].mean() + 0.01
    assert errors["triton"].max() < 0.6 and errors["torch"].max() < 0.6


def test_cuda_graphs_survive_weight_swaps(tiny):
    config = tiny.config(seed=4, **ALIGNED)
    old, new = tiny.model(config, seed=4), tiny.model(config, seed=5)
    prompts = tiny.prompts(config.vocab_size, [4, 19, 7], seed=4)
    sp = SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=1, ignore_eos=True)
    opts = dict(device="cuda", dtype=torch.bfloat16, block_size=4, use_tqdm=False)
    engine = Engine.from_model(old, **opts)
    before = _tokens(engine.generate(prompts, sp))
    captured = dict(engine.graphs.graphs)
    engine.load_weights(new.state_dict(), version=2)  # the captured graphs read the same, updated tensors
    after = engine.generate(prompts, sp)
    assert engine.graphs.graphs == captured  # replayed, not recaptured
    fresh = Engine.from_model(new, **opts).generate(prompts, sp)
    assert _tokens(after) == _tokens(fresh) != before
    for a, b in zip(after, fresh):
        assert [c.logprobs for c in a.outputs] == [c.logprobs for c in b.outputs]


def test_cuda_graphs_reset_recaptures(tiny):
    """After ``reset`` the next steps capture afresh, into a new memory pool, and decode the same tokens."""
    config = tiny.config(seed=6, **ALIGNED)
    prompts = tiny.prompts(config.vocab_size, [5, 11], seed=6)
    sp = SamplingParams(n=2, temperature=1.0, max_tokens=10, seed=2, ignore_eos=True)
    engine = Engine.from_model(tiny.model(config, seed=6), device="cuda", dtype=torch.bfloat16, block_size=4,
                               use_tqdm=False)
    first = engine.generate(prompts, sp)
    old = dict(engine.graphs.graphs)
    engine.graphs.reset()
    again = engine.generate(prompts, sp)
    assert engine.graphs.graphs and all(engine.graphs.graphs[k] is not g for k, g in old.items())
    assert _tokens(again) == _tokens(first)
    engine.graphs.reset()  # twice in a row: the dropped pool must not be captured into
    assert _tokens(engine.generate(prompts, sp)) == _tokens(first)
