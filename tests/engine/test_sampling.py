"""Sampling: seeds are batch invariant, log-probs are raw, top-k/top-p/temperature/stop tokens behave."""

import pytest
import torch

from align.engine import Engine, SamplingParams
from align.engine.sampler import make_generator, sample


def _engine(model, **opts):
    return Engine.from_model(model, block_size=4, use_tqdm=False, **opts)


def _tokens(out):
    return [c.token_ids for c in out.outputs]


def test_seeded_request_is_batch_invariant(small_model, tiny):
    vocab = small_model.config.vocab_size
    target = tiny.prompts(vocab, [13], seed=1)[0]
    sp = SamplingParams(n=3, temperature=1.0, top_p=0.9, top_k=40, max_tokens=12, seed=1234, ignore_eos=True)
    alone = _engine(small_model).generate([target], sp)[0]
    others = tiny.prompts(vocab, [5, 21, 8, 30], seed=2)
    other_sp = SamplingParams(n=2, temperature=1.0, max_tokens=9, ignore_eos=True)  # unseeded
    crowd = _engine(small_model, seed=99).generate(others[:2] + [target] + others[2:],
                                                   [other_sp, other_sp, sp, other_sp, other_sp])[2]
    # A small batch limit changes when the request joins and who it shares steps with.
    squeezed = _engine(small_model, max_num_seqs=4, max_num_batched_tokens=16).generate(
        [target] + others, [sp] + [other_sp] * 4)[0]
    assert _tokens(alone) == _tokens(crowd) == _tokens(squeezed)
    assert len({tuple(t) for t in _tokens(alone)}) > 1, "the n samples of one prompt should differ"
    for a, b in zip(alone.outputs, crowd.outputs):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_seed_controls_samples(small_model, tiny):
    prompt = tiny.prompts(small_model.config.vocab_size, [10], seed=3)
    engine = _engine(small_model)

    def run(seed):
        return _tokens(engine.generate(prompt, SamplingParams(temperature=1.0, max_tokens=16, seed=seed,
                                                              ignore_eos=True))[0])

    assert run(5) == run(5)
    assert run(5) != run(6)
    unseeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    # Unseeded requests draw their seeds from the engine's generator: reproducible per engine seed.
    assert (_tokens(_engine(small_model, seed=1).generate(prompt, unseeded)[0])
            == _tokens(_engine(small_model, seed=1).generate(prompt, unseeded)[0]))


def test_logprobs_are_raw_model_logprobs(small_model, tiny):
    prompts = tiny.prompts(small_model.config.vocab_size, [6, 15], seed=4)
    engine = _engine(small_model)
    sp = SamplingParams(temperature=0.6, top_k=8, top_p=0.8, max_tokens=10, seed=0, ignore_eos=True)
    outs = engine.generate(prompts, sp)
    for p, out in zip(prompts, outs):
        c = out.outputs[0]
        ref = tiny.ref_logprobs(small_model, p + c.token_ids)
        pos = len(p) - 1 + torch.arange(len(c.token_ids))
        want = ref[pos, torch.tensor(c.token_ids)]
        assert (torch.tensor(c.logprobs) - want).abs().max() < 1e-4
        # top-k: every sampled token is among the 8 most likely under the raw distribution
        rank = (ref[pos] > want[:, None]).sum(-1)
        assert int(rank.max()) < 8


def test_greedy_limits_agree(small_model, tiny):
    prompts = tiny.prompts(small_model.config.vocab_size, [7, 12], seed=5)
    engine = _engine(small_model)
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    top1 = engine.generate(prompts, SamplingParams(temperature=1.0, top_k=1, max_tokens=8, seed=3,
                                                   ignore_eos=True))
    tiny_p = engine.generate(prompts, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=8, seed=4,
                                                     ignore_eos=True))
    assert [_tokens(o) for o in greedy] == [_tokens(o) for o in top1] == [_tokens(o) for o in tiny_p]


def test_stop_tokens_eos_and_lengths(small_model, tiny):
    prompt = tiny.prompts(small_model.config.vocab_size, [9], seed=6)
    free = _engine(small_model).generate(prompt, SamplingParams(temperature=0.0, max_tokens=12,
                                                                ignore_eos=True))[0].outputs[0].token_ids
    stop = free[4]
    first = free.index(stop)
    out = _engine(small_model).generate(prompt, SamplingParams(temperature=0.0, max_tokens=12,
                                                               stop_token_ids=[stop]))[0].outputs[0]
    assert out.token_ids == free[:first + 1] and out.finish_reason == "stop"  # the stop token is kept
    eos_engine = _engine(small_model, eos_token_id=stop)
    out = eos_engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12))[0].outputs[0]
    assert out.token_ids == free[:first + 1] and out.finish_reason == "stop"
    out = eos_engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == free and out.outputs[0].finish_reason == "length"


def test_per_prompt_params_and_shapes(small_model, tiny):
    prompts = tiny.prompts(small_model.config.vocab_size, [4, 8, 6], seed=7)
    params = [SamplingParams(n=1, max_tokens=3, seed=1), SamplingParams(n=4, max_tokens=5, seed=2),
              SamplingParams(n=2, max_tokens=1, temperature=0.0, logprobs=False)]
    outs = _engine(small_model).generate(prompts, params)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert [len(o.outputs) for o in outs] == [1, 4, 2]
    assert [c.index for c in outs[1].outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == len(c.logprobs) <= 5 for c in outs[1].outputs)
    assert outs[2].outputs[0].logprobs is None and len(outs[2].outputs[0].token_ids) == 1


def test_bad_input_is_rejected(small_model):
    engine = _engine(small_model)
    with pytest.raises(TypeError):
        engine.generate([1, 2, 3])
    with pytest.raises(ValueError, match="prompt 1"):
        engine.generate([[1], [small_model.config.vocab_size]])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="2 SamplingParams for 1"):
        engine.generate([[1]], [SamplingParams(), SamplingParams()])


def test_sampler_follows_the_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 6) * 1.5
    rows = 4000
    gens = [make_generator(11, i) for i in range(rows)]
    tokens, _ = sample(logits.expand(rows, 6), [SamplingParams(temperature=1.0)] * rows, gens)
    freq = torch.bincount(torch.tensor(tokens), minlength=6).float() / rows
    assert (freq - logits.softmax(-1)[0]).abs().max() < 0.03
    tokens, _ = sample(logits.expand(rows, 6), [SamplingParams(temperature=1.0, top_k=2)] * rows, gens)
    assert set(tokens) == set(logits[0].topk(2).indices.tolist())
    p = logits.softmax(-1)[0].sort(descending=True)
    keep = int((p.values.cumsum(0) - p.values < 0.7).sum())
    tokens, _ = sample(logits.expand(rows, 6), [SamplingParams(temperature=1.0, top_p=0.7)] * rows, gens)
    assert set(tokens) == set(p.indices[:keep].tolist())
