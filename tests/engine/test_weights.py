"""Weights: in-place swaps during RL, loading saved checkpoints, clear errors on mismatched state dicts."""

import pytest
import torch

from align.engine import Engine, SamplingParams


def _engine(model, **opts):
    return Engine.from_model(model, block_size=4, use_tqdm=False, **opts)


def _run(engine, prompts):
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    sampled = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=3,
                                                      ignore_eos=True))
    return [[(c.token_ids, c.logprobs) for c in o.outputs] for o in greedy + sampled]


def test_load_weights_swaps_in_place(small_model, tiny):
    new_model = tiny.model(small_model.config, seed=123)
    prompts = tiny.prompts(small_model.config.vocab_size, [5, 14, 9], seed=20)
    engine = _engine(small_model)
    before = _run(engine, prompts)
    kv, kv_ptr = engine.cache.kv, engine.cache.kv.data_ptr()
    embed, w_uk = engine.weights.embed, engine.weights.layers[0].attn.w_uk
    w_uk_old = w_uk.clone()

    engine.load_weights(new_model.state_dict(), version=7)

    assert engine.version == 7
    assert engine.cache.kv is kv and kv.data_ptr() == kv_ptr  # no cache re-allocation
    assert engine.weights.embed is embed and engine.weights.layers[0].attn.w_uk is w_uk
    assert not torch.equal(w_uk, w_uk_old)  # absorbed matrices re-derived
    after = _run(engine, prompts)
    assert after == _run(_engine(new_model), prompts)
    assert after != before


def test_load_weights_rejects_mismatches(small_model):
    engine = _engine(small_model)
    sd = dict(small_model.state_dict())
    with pytest.raises(KeyError, match="missing"):
        engine.load_weights({k: v for k, v in sd.items() if "kv_b_proj" not in k})
    with pytest.raises(KeyError, match="does not know"):
        engine.load_weights({**sd, "model.layers.0.self_attn.bogus.weight": torch.zeros(1)})
    name = "model.layers.1.mlp.experts.down_proj"
    with pytest.raises(ValueError, match=name):
        engine.load_weights({**sd, name: sd[name][:, :, :-1]})
    # A subset is fine when asked for (e.g. only the trained parameters), and bumps the version.
    engine.load_weights({"model.norm.weight": sd["model.norm.weight"]}, strict=False)
    assert engine.version == 1


def test_from_pretrained_reads_a_saved_checkpoint(small_model, tiny, tmp_path):
    small_model.save_pretrained(tmp_path)
    prompts = tiny.prompts(small_model.config.vocab_size, [6, 11], seed=21)
    loaded = Engine.from_pretrained(tmp_path, device="cpu", block_size=4, use_tqdm=False)
    assert loaded.dtype == torch.float32
    assert _run(loaded, prompts) == _run(_engine(small_model), prompts)


def test_bf16_engine_from_fp32_model(small_model, tiny):
    prompts = tiny.prompts(small_model.config.vocab_size, [6, 11], seed=22)
    engine = _engine(small_model, dtype=torch.bfloat16)
    assert engine.cache.kv.dtype == torch.bfloat16 and engine.kv_bytes_per_token() % 2 == 0
    assert engine.weights.layers[-1].mlp.router.dtype == torch.float32  # routing stays fp32, as in the reference
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    ref = _engine(small_model).score(prompts, [o.outputs[0].token_ids for o in outs])
    for o, r in zip(outs, ref):
        assert (torch.tensor(o.outputs[0].logprobs) - torch.tensor(r)).abs().max() < 0.1
