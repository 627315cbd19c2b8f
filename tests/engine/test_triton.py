"""The fused Triton decode kernels against the torch path (CUDA only; skipped elsewhere).

Kernels are checked in fp32 (exact dot products) against plain torch maths on fresh random inputs, at sizes
that exercise every loop: several chunks in the routing sort, several row tiles per expert, several context
splits per sequence, unaligned widths. The whole fused decode step is checked against the torch decode path.
"""

import pytest
import torch
import torch.nn.functional as F

from align.engine import Engine, SamplingParams
from align.engine.moe import Routing, experts_grouped, route

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.9, "mscale_all_dim": 0.7}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("n,e,k,h,inter,method", [(1, 64, 6, 256, 128, "greedy"), (37, 16, 3, 96, 48, "group"),
                                                  (300, 8, 2, 128, 64, "greedy")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_experts_match_torch(n, e, k, h, inter, method, dtype):
    from align.engine import triton_moe

    torch.manual_seed(n)
    grouped = method == "group"
    r = Routing(e, k, "group_limited_greedy" if grouped else "greedy", 4 if grouped else None,
                2 if grouped else None, 1.5)
    x = torch.randn(n, h, device="cuda").to(dtype)
    router = torch.randn(e, h, device="cuda")
    gu = (torch.randn(e, 2 * inter, h, device="cuda") * 0.1).to(dtype)
    dn = (torch.randn(e, h, inter, device="cuda") * 0.1).to(dtype)
    w_ref, idx_ref = route(x, router, r)
    plan = triton_moe.route_and_plan(F.linear(x.float(), router), r)
    got, want = plan.idx.long().sort(-1), idx_ref.sort(-1)
    assert torch.equal(got.values, want.values)
    assert torch.allclose(plan.weights.gather(1, got.indices), w_ref.gather(1, want.indices), atol=1e-6)
    assert int(plan.n_active) == len(idx_ref.unique())
    # Shared experts (two of width inter) inside the same launches, or given as a ready (N, H) tensor.
    s_gu = (torch.randn(4 * inter, h, device="cuda") * 0.1).to(dtype)
    s_dn = (torch.randn(h, 2 * inter, device="cuda") * 0.1).to(dtype)
    assert triton_moe.shared_fits(s_gu, s_dn, inter) and not triton_moe.shared_fits(s_gu[:-2], s_dn[:, :-1], inter)
    y, none = triton_moe.routed_experts(x, plan, gu, dn)
    y_in, s_y = triton_moe.routed_experts(x, plan, gu, dn, (s_gu, s_dn))
    assert none is None and torch.equal(y, y_in)
    gate, up = F.linear(x.float(), s_gu.float()).chunk(2, dim=-1)
    s_ref = F.linear(F.silu(gate) * up, s_dn.float())  # (N, H)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert s_y.shape == (2, n, h) and _rel(s_y.sum(0), s_ref) < tol  # two partial sums, over inter units each
    h_res, norm_w = torch.randn(n, h, device="cuda").to(dtype), (torch.rand(h, device="cuda") + 0.5).to(dtype)
    h_new = h_res.clone()
    x_next = triton_moe.combine_add_norm(y, plan, s_y, h_new, norm_w, 1e-6)
    ref = experts_grouped(x.float(), idx_ref, w_ref, gu.float(), dn.float(), F.silu) + s_ref
    assert _rel(h_new, h_res.float() + ref) < tol
    assert _rel(x_next, norm_w.float() * F.rms_norm(h_res.float() + ref, (h,), eps=1e-6)) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [3, 19])  # one and two blocks of sequences in the reduce
def test_mla_decode_matches_dense_attention(dtype, b, monkeypatch):
    from align.engine import triton_mla

    torch.manual_seed(b)
    monkeypatch.setattr(triton_mla, "split_len", lambda b, c, bn, sms, per_sm: bn)  # as many splits as possible
    hn, rank, dr, dn, dv, bs = 16, 40, 8, 16, 12, 4
    ctx = torch.randint(1, 98, (b,), device="cuda")
    ctx[0] = 97
    n_blocks = 80
    cache = torch.randn(n_blocks * bs, rank + dr, device="cuda").to(dtype)
    tables = torch.stack([torch.randperm(n_blocks, device="cuda")[:32] for _ in range(b)])
    q_lat = torch.randn(hn, b, rank, device="cuda").to(dtype)
    q = torch.randn(b, hn, dn + dr, device="cuda").to(dtype)
    w_uv = torch.randn(hn, rank, dv, device="cuda").to(dtype)
    out = triton_mla.mla_decode(q_lat, q, cache, tables, ctx, bs, 128, 0.3, dn, 132, w_uv)
    assert out.shape == (b, hn * dv)
    for i in range(b):
        n = int(ctx[i])
        slots = tables[i, torch.arange(n, device="cuda") // bs] * bs + torch.arange(n, device="cuda") % bs
        kv = cache[slots].float()  # (n, R+Dr)
        qc = torch.cat([q_lat[:, i], q[i, :, dn:]], -1).float()  # (Hn, R+Dr)
        lat = (qc @ kv.T * 0.3).softmax(-1) @ kv[:, :rank]  # (Hn, R)
        want = torch.bmm(lat[:, None], w_uv.float())[:, 0].reshape(-1)  # (Hn*Dv,)
        assert _rel(out[i], want) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [21, 150])  # 2 and 10 blocks of 16 tokens, the last one partial
def test_mla_prep_writes_cache_ropes_and_absorbs(dtype, n):
    from align.engine import triton_mla
    from align.engine.ops import rms_norm

    torch.manual_seed(n)
    hn, rank, dr, dn, slots_total = 3, 40, 8, 16, 200
    kv = torch.randn(n, rank + dr, device="cuda").to(dtype)
    q = torch.randn(n, hn, dn + dr, device="cuda").to(dtype)
    rope = torch.randn(n, dr // 2, 2, device="cuda")
    norm_w = (torch.rand(rank, device="cuda") + 0.5).to(dtype)
    slots = torch.randperm(slots_total, device="cuda")[:n]
    cache = torch.randn(slots_total, rank + dr, device="cuda").to(dtype)
    w_uk = torch.randn(hn, dn, rank, device="cuda").to(dtype)
    q0, cache0 = q.clone(), cache.clone()
    q_lat = triton_mla.mla_prep(kv, q, norm_w, rope, slots, cache, 1e-6, dn, w_uk)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _rel(q_lat, torch.bmm(q0[..., :dn].transpose(0, 1).float(), w_uk.float())) < tol
    assert _rel(cache[slots, :rank], rms_norm(kv[:, :rank], norm_w, 1e-6)) < tol
    freqs = torch.view_as_complex(rope)  # (N, Dr/2)
    k_pe = torch.view_as_real(torch.view_as_complex(kv[:, rank:].float().reshape(n, -1, 2)) * freqs)
    assert _rel(cache[slots, rank:], k_pe.reshape(n, dr)) < tol
    q_pe = torch.view_as_real(torch.view_as_complex(q0[..., dn:].float().reshape(n, hn, -1, 2)) * freqs[:, None])
    assert _rel(q[..., dn:], q_pe.reshape(n, hn, dr)) < tol and torch.equal(q[..., :dn], q0[..., :dn])
    others = torch.ones(slots_total, dtype=torch.bool, device="cuda")
    others[slots] = False
    assert torch.equal(cache[others], cache0[others])  # no other slot written
    q2, cache2 = q0.clone(), cache0.clone()  # without W_UK (a prefill): the same writes, no q_lat
    assert triton_mla.mla_prep(kv, q2, norm_w, rope, slots, cache2, 1e-6, dn) is None
    assert torch.equal(q2, q) and torch.equal(cache2, cache)


@pytest.mark.parametrize("n,e,hidden", [(1, 64, 96), (5, 10, 96), (3, 160, 5120)])  # last: DeepSeek-V2's widths
def test_add_rms_norm_router_matches_torch(n, e, hidden):
    from align.engine import triton_ops
    from align.engine.ops import rms_norm

    torch.manual_seed(n)
    h = torch.randn(n, hidden, device="cuda").to(torch.bfloat16)
    delta = torch.randn(n, hidden, device="cuda").to(torch.bfloat16)
    norm_w = (torch.rand(hidden, device="cuda") + 0.5).to(torch.bfloat16)
    router = torch.randn(e, hidden, device="cuda")
    h0 = h.clone()
    h_new, x, logits = triton_ops.add_rms_norm_router(h, delta, norm_w, router, 1e-6)
    assert torch.equal(h, h0)  # the residual comes back as a new tensor
    assert torch.equal(h_new, h0 + delta)
    assert _rel(x, rms_norm(h0 + delta, norm_w, 1e-6)) < 4e-3  # bf16 rounding of the normalised values
    assert _rel(logits, F.linear(x.float(), router)) < 1e-6


@pytest.mark.parametrize("seed,fields,step_tokens", [
    (2, dict(num_attention_heads=4, num_key_value_heads=4, hidden_size=64, moe_intermediate_size=16,
             intermediate_size=64, q_lora_rank=16, topk_method="group_limited_greedy", n_group=4, topk_group=2,
             routed_scaling_factor=2.0, rope_parameters=YARN, first_k_dense_replace=1), 4096),
    (5, dict(hidden_size=48, moe_intermediate_size=24, q_lora_rank=None, topk_method="greedy",
             first_k_dense_replace=0, attention_bias=True), 4096),
    (5, dict(hidden_size=48, moe_intermediate_size=24, q_lora_rank=None, topk_method="greedy",
             first_k_dense_replace=0), 16),  # long prompts prefilled in chunks, attending to cached ones
])
@pytest.mark.parametrize("kv_dtype,weight_dtype", [("auto", "auto"), ("fp8", "auto"), ("auto", "fp8"),
                                                   ("fp8", "fp8")])
def test_fused_forward_matches_torch_path(tiny, seed, fields, step_tokens, kv_dtype, weight_dtype):
    """Prefill and decode on the fused kernels against the torch path: same tokens, routed experts and scores
    (with an FP8 cache too: both paths write the same FP8 entries, up to an entry whose rounding differs; FP8
    weights: both paths multiply by the same dequantised values)."""
    tol = 1e-4 if kv_dtype == "auto" else 1e-2
    config = tiny.config(seed=seed, **fields)
    model = tiny.model(config, seed=seed)
    prompts = tiny.prompts(config.vocab_size, [3, 17, 9, 30, 1], seed=seed)
    completions = tiny.prompts(config.vocab_size, [4, 1, 12, 2, 7], seed=seed + 1)
    sp = SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=3, ignore_eos=True, return_routing=True)
    outs, scores, fused_prefills = {}, {}, []
    for kernels in ("torch", "triton"):
        engine = Engine.from_model(model, device="cuda", block_size=4, use_tqdm=False, decode_kernels=kernels,
                                   cuda_graphs=False, max_num_batched_tokens=step_tokens, kv_dtype=kv_dtype,
                                   weight_dtype=weight_dtype)
        assert engine.cache.fp8 == (kv_dtype == "fp8") and engine.weights.fp8 == (weight_dtype == "fp8")
        assert (engine.runner.fused is not None) == (kernels == "triton")
        if engine.runner.fused is not None:
            forward = engine.runner.fused.forward
            engine.runner.fused.forward = lambda ids, batch, *a: (fused_prefills.append(batch.query_len > 1)
                                                                  or forward(ids, batch, *a))
        outs[kernels] = engine.generate(prompts, sp)
        scores[kernels] = engine.score(prompts, completions)
    assert any(fused_prefills) and not all(fused_prefills)  # prefills and decode steps both ran fused
    for a, b in zip(outs["torch"], outs["triton"]):
        for ca, cb in zip(a.outputs, b.outputs):
            assert ca.token_ids == cb.token_ids
            assert (torch.tensor(ca.logprobs) - torch.tensor(cb.logprobs)).abs().max() < tol
            assert torch.equal(ca.routing.sort(-1).values, cb.routing.sort(-1).values)  # same experts per token
    for a, b in zip(scores["torch"], scores["triton"]):
        assert (torch.tensor(a) - torch.tensor(b)).abs().max() < tol


def test_prefill_expert_glue_matches_torch():
    torch.manual_seed(3)
    n, e, k, h, inter = 500, 16, 6, 128, 64
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    gu = (torch.randn(e, 2 * inter, h, device="cuda") * 0.1).to(torch.bfloat16)
    dn = (torch.randn(e, h, inter, device="cuda") * 0.1).to(torch.bfloat16)
    w, idx = route(x, torch.randn(e, h, device="cuda"), Routing(e, k, "greedy", None, None, 1.0))
    plain = experts_grouped(x, idx, w, gu, dn, F.silu)
    fused = experts_grouped(x, idx, w, gu, dn, F.silu, fused=True)
    exact = experts_grouped(x.float(), idx, w, gu.float(), dn.float(), F.silu)
    assert _rel(fused, exact) <= _rel(plain, exact) * 1.2 + 1e-3


def test_sampling_kernel_matches_torch_sampler():
    from align.engine import triton_sample
    from align.engine.sampler import make_generator, sample

    torch.manual_seed(4)
    for vocab, temp in ((102400, 1.0), (5000, 0.7), (37, 1.3)):
        logits = torch.randn(64, vocab, device="cuda") * 3
        u = torch.tensor([torch.rand((), generator=make_generator(5, i), dtype=torch.float64).item()
                          for i in range(64)], dtype=torch.float64, device="cuda")
        tokens, logprobs = triton_sample.sample_rows(logits, u, temp)
        # The torch rule on CPU (the CUDA sampler would take the kernel itself).
        want, want_lp = sample(logits.cpu(), [SamplingParams(temperature=temp)] * 64,
                               [make_generator(5, i) for i in range(64)])
        same = [a == b for a, b in zip(tokens.tolist(), want)]
        assert sum(same) >= 62  # a draw within float rounding of a CDF step may land on its neighbour
        got_lp = torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
        assert torch.allclose(logprobs, got_lp, atol=1e-5)

