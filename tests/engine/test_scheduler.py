"""Continuous batching: limits on sequences and tokens change the schedule, never the results."""

import torch

from align.engine import Engine, SamplingParams


def _results(model, prompts, params, **opts):
    engine = Engine.from_model(model, block_size=4, use_tqdm=False, **opts)
    outs = engine.generate(prompts, params)
    assert engine.blocks.num_used == 0
    return [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outs], engine.stats


def test_sequences_join_and_leave_under_max_num_seqs(small_model, tiny):
    prompts = tiny.prompts(small_model.config.vocab_size, [5, 9, 3, 12, 7, 4], seed=30)
    params = [SamplingParams(temperature=t, max_tokens=m, seed=i, ignore_eos=True)
              for i, (t, m) in enumerate([(0.0, 3), (1.0, 11), (0.0, 6), (1.0, 2), (0.7, 9), (0.0, 5)])]
    wide, _ = _results(small_model, prompts, params, max_num_seqs=32)
    narrow, stats = _results(small_model, prompts, params, max_num_seqs=2)
    assert narrow == wide
    assert stats.peak_running <= 2
    assert [len(r[0][0]) for r in narrow] == [3, 11, 6, 2, 9, 5]


def test_chunked_prefill_under_token_budget(small_model, tiny):
    prompts = tiny.prompts(small_model.config.vocab_size, [30, 7, 19], seed=31)
    sp = SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=9, ignore_eos=True)
    whole, whole_stats = _results(small_model, prompts, sp)
    chunked, stats = _results(small_model, prompts, sp, max_num_batched_tokens=8)
    assert chunked == whole
    assert whole_stats.prefill_steps == 1 and stats.prefill_steps >= 56 // 8
    assert stats.prefill_tokens == whole_stats.prefill_tokens == 56


def test_request_with_more_samples_than_max_num_seqs(small_model, tiny):
    prompts = tiny.prompts(small_model.config.vocab_size, [6, 8], seed=32)
    sp = SamplingParams(n=5, temperature=1.0, max_tokens=4, seed=1, ignore_eos=True)
    wide, _ = _results(small_model, prompts, sp)
    narrow, _ = _results(small_model, prompts, sp, max_num_seqs=2)
    assert narrow == wide and all(len(r) == 5 for r in narrow)



def test_padded_static_decode_path(small_model, tiny):
    """The shape-bucketed decode that CUDA graphs replay, run eagerly: same tokens, routing and block use."""
    prompts = tiny.prompts(small_model.config.vocab_size, [3, 17, 9, 30, 5], seed=33)
    greedy = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, return_routing=True)
    sampled = SamplingParams(n=3, temperature=1.0, max_tokens=7, seed=2, ignore_eos=True)
    eager = Engine.from_model(small_model, block_size=4, use_tqdm=False)
    static = Engine.from_model(small_model, block_size=4, use_tqdm=False, cuda_graphs=True)
    assert eager.graphs is None and static.graphs is not None and not static.graphs.capture
    for sp in (greedy, sampled):
        want, got = eager.generate(prompts, sp), static.generate(prompts, sp)
        for a, b in zip(want, got):
            assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
            if sp.return_routing:
                assert torch.equal(a.outputs[0].routing, b.outputs[0].routing)
        assert static.blocks.num_used == 0
    for p, o in zip(prompts, static.generate(prompts, greedy)):
        assert o.outputs[0].token_ids == tiny.ref_greedy(small_model, p, 9)


def test_lookahead_decode_gives_the_same_outputs(small_model, tiny):
    """Decode steps queued before the previous step's tokens are read: same tokens, log-probs, finish reasons
    and block use, while samples stop at different steps (stop tokens, lengths), cross block boundaries, share
    their prompt's last block (copy-on-write) and wait for room (max_num_seqs)."""
    vocab = small_model.config.vocab_size
    prompts = tiny.prompts(vocab, [3, 17, 9, 30, 5, 6], seed=34)
    params = [SamplingParams(n=n, temperature=t, max_tokens=m, seed=i, stop_token_ids=list(range(0, vocab, 7)),
                             return_routing=i % 2 == 0)
              for i, (n, t, m) in enumerate([(3, 1.0, 13), (1, 0.0, 9), (4, 1.0, 21), (2, 0.8, 5), (1, 1.0, 17),
                                             (2, 1.0, 11)])]
    for max_num_seqs in (32, 4):
        runs = {}
        for ahead in (False, True):
            engine = Engine.from_model(small_model, block_size=4, use_tqdm=False, cuda_graphs=True,
                                       lookahead=ahead, max_num_seqs=max_num_seqs)
            outs = engine.generate(prompts, params)
            assert engine.blocks.num_used == 0
            runs[ahead] = ([[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outs], engine.stats,
                           torch.tensor([lp for o in outs for c in o.outputs for lp in c.logprobs]),
                           [(len(o.prompt_token_ids), len(c.token_ids), c.routing) for o in outs for c in o.outputs])
        (plain, plain_stats, plain_lp, plain_rt), (ahead, ahead_stats, ahead_lp, ahead_rt) = runs[False], runs[True]
        assert ahead == plain
        # Routing of every token read (prompt and completion but the last), where asked for: the same experts.
        assert sum(r is not None for _, _, r in plain_rt) == 3 + 4 + 1
        for (n_prompt, n_new, a), (_, _, b) in zip(plain_rt, ahead_rt):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.shape[0] == n_prompt + n_new - 1 and torch.equal(a, b)
        # Rows dropped from a step can change its padded batch size, which moves fp32 matmuls in the last bits.
        torch.testing.assert_close(ahead_lp, plain_lp, rtol=0, atol=1e-5)
        assert plain_stats.lookahead_steps == 0 and ahead_stats.lookahead_steps > 0
        reasons = {r for out in plain for _, r in out}
        assert reasons == {"stop", "length"}  # both ways of stopping happened under look-ahead
        # Look-ahead only adds the dropped rows of samples that stopped; it never skips a token.
        generated = sum(len(t) for out in plain for t, _ in out)
        assert plain_stats.decode_tokens <= ahead_stats.decode_tokens
        assert ahead_stats.decode_tokens + ahead_stats.prefill_tokens >= generated


def test_lookahead_wastes_no_row_on_samples_that_stop_by_length(small_model, tiny):
    prompts = tiny.prompts(small_model.config.vocab_size, [5, 12, 8], seed=35)
    sp = SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=3, ignore_eos=True)
    stats = {}
    for ahead in (False, True):
        engine = Engine.from_model(small_model, block_size=4, use_tqdm=False, cuda_graphs=True, lookahead=ahead)
        engine.generate(prompts, sp)
        stats[ahead] = engine.stats
    assert stats[True].lookahead_steps > 0
    assert stats[True].decode_tokens == stats[False].decode_tokens == 3 * 3 * 9  # the first token comes from prefill
