"""Paged latent cache: block accounting, prefix sharing across samples, bytes per token, running out of blocks."""

import torch
import transformers

from align.engine import Engine, SamplingParams, kv_bytes_per_token
from align.engine.cache import BlockManager
from align.model import build_config


def _engine(model, **opts):
    return Engine.from_model(model, use_tqdm=False, **opts)


def test_block_manager_copy_on_write_and_refcounts():
    bm = BlockManager(num_blocks=6, block_size=4)
    copies = []
    prefix = []
    assert bm.reserve(prefix, 0, 6, copies) and prefix == [0, 1] and not copies  # 1 full + 1 partial block
    a, b = bm.fork(prefix), bm.fork(prefix)
    bm.free(prefix)
    assert bm.ref[:2] == [2, 2]
    assert bm.reserve(a, 6, 1, copies)  # writes into the shared partial block: private copy first
    assert copies == [(1, 2)] and a == [0, 2] and bm.ref[:3] == [2, 1, 1]
    copies.clear()
    assert bm.reserve(b, 6, 3, copies)  # now the only reader of block 1: writes in place, then grows
    assert not copies and b == [0, 1, 3]
    assert not bm.reserve(a, 7, 20, copies)  # too many: refused, nothing changed
    assert a == [0, 2] and bm.num_free == 2
    bm.free(a)
    bm.free(b)
    assert bm.num_free == 6 and bm.peak_used == 4


def test_samples_share_the_prompt_prefill_and_blocks(small_model, tiny):
    prompt = tiny.prompts(small_model.config.vocab_size, [38], seed=10)[0]  # 2 full blocks + 6 tokens
    sp = SamplingParams(n=8, temperature=1.0, max_tokens=4, seed=0, ignore_eos=True)
    shared = _engine(small_model, block_size=16)
    out = shared.generate([prompt], sp)[0]
    assert len(out.outputs) == 8
    assert shared.stats.prefill_tokens == len(prompt) and shared.stats.prefill_steps == 1
    # 2 shared full blocks + one private last block per sample (7 of them copied on write, the 8th reused)
    assert shared.stats.peak_blocks_in_use == 2 + 8 and shared.stats.cow_copies == 7
    assert shared.blocks.num_used == 0  # everything returned

    copies = _engine(small_model, block_size=16)
    copies.generate([prompt] * 8, SamplingParams(n=1, temperature=1.0, max_tokens=4, seed=0, ignore_eos=True))
    assert copies.stats.prefill_tokens == 8 * len(prompt)
    assert copies.stats.peak_blocks_in_use == 8 * 3
    assert shared.stats.peak_blocks_in_use < copies.stats.peak_blocks_in_use


def test_kv_bytes_per_token_lite_bf16():
    lite = build_config("lite")
    ours = kv_bytes_per_token(lite, torch.bfloat16)
    assert ours == 27 * 576 * 2
    # The same number from an engine built on the meta device: no 15.7B parameters are materialised.
    meta = Engine.from_config(lite, device="meta", dtype=torch.bfloat16, num_blocks=8, use_tqdm=False)
    assert meta.kv_bytes_per_token() == ours and meta.weights.embed.is_meta

    # What transformers' own cache stores per token for the same per-layer shapes (one layer, measured).
    small = build_config("lite", vocab_size=64, hidden_size=64, intermediate_size=32, moe_intermediate_size=16,
                         num_hidden_layers=1, n_routed_experts=4, num_experts_per_tok=2)
    model = transformers.DeepseekV2ForCausalLM(small).to(torch.bfloat16).eval()
    tokens = 8
    with torch.no_grad():
        out = model(torch.arange(tokens)[None], use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    stored = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    hf = stored // tokens * lite.num_hidden_layers
    mha = lite.num_hidden_layers * lite.num_attention_heads * (
        lite.qk_nope_head_dim + lite.qk_rope_head_dim + lite.v_head_dim) * 2
    print(f"\nKV cache bytes per token, DeepSeek-V2-Lite shapes, bf16: engine {ours} | transformers "
          f"{transformers.__version__} DynamicCache (measured) {hf} | per-head K/V (uncompressed MHA) {mha}")
    assert ours <= hf


def test_cache_exhaustion_preempts_and_recomputes_exactly(small_model, tiny):
    prompts = tiny.prompts(small_model.config.vocab_size, [12, 20, 16, 24, 14, 18, 22, 13, 19, 21], seed=11)
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
              SamplingParams(n=2, temperature=1.0, max_tokens=24, seed=5, ignore_eos=True)]
    for sp in params:
        big = _engine(small_model, block_size=4).generate(prompts, sp)
        tight = _engine(small_model, block_size=4, num_blocks=26, max_num_seqs=16)
        small = tight.generate(prompts, sp)
        assert tight.stats.preemptions > 0, "the test should exhaust the cache"
        assert tight.blocks.num_used == 0
        for a, b in zip(big, small):
            assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
            assert all(len(c.token_ids) == 24 for c in b.outputs)
            for ca, cb in zip(a.outputs, b.outputs):
                assert torch.allclose(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-4)
