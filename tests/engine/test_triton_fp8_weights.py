"""The fused kernels on FP8 weights: each reads the weight's bytes and block scales and must give what the same
kernel gives on the dequantised weight (``Fp8Weight.dequant``). On CUDA, or on the CPU under Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET when there is no GPU); skipped where Triton is not installed."""

import pytest
import torch
import torch.nn.functional as F

from align.engine import Engine, SamplingParams
from align.engine.fp8_weights import Fp8Weight
from align.engine.moe import Routing

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter (triton 3.9) multiplies bf16 tiles wrongly in tl.dot; fp16 runs the same code path there.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _fp8(w: torch.Tensor) -> Fp8Weight:
    return Fp8Weight.empty(*w.shape, device=DEVICE).copy_(w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n_out,k_in,bias", [(3, 40, 200, True), (70, 96, 256, False)])
def test_fp8_linear_matches_the_dequantised_weight(dtype, m, n_out, k_in, bias):
    """Unaligned reduction (a partial last scale block), unaligned columns, one and two row tiles."""
    from align.engine.triton_fp8 import fp8_linear

    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k_in, generator=g).to(DEVICE, dtype)
    w = torch.randn(n_out, k_in, generator=g) * torch.logspace(-2, 1, n_out)[:, None]  # scales differ per row
    w[:, 128:] *= 5.0                                                                     # and per column block
    b = torch.randn(n_out, generator=g).to(DEVICE, dtype) if bias else None
    q = _fp8(w.to(DEVICE))
    got = fp8_linear(x, q, b, num_sms=8)
    want = F.linear(x.float(), q.dequant(dtype).float(), None if b is None else b.float())
    assert got.dtype == dtype and got.shape == (m, n_out)
    tol = 1e-5 if dtype == torch.float32 else 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())
    assert not torch.allclose(got.float(), F.linear(x.float(), w.to(DEVICE), None if b is None else b.float()),
                              rtol=tol, atol=tol * want.abs().max().item())  # it read FP8, not the original


def test_fp8_linear_refuses_mismatched_shapes():
    from align.engine.triton_fp8 import fp8_linear

    with pytest.raises(ValueError, match="fp8_linear"):
        fp8_linear(torch.zeros(2, 64, device=DEVICE), _fp8(torch.ones(8, 32, device=DEVICE)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,hidden,inter", [(5, 200, 64), (12, 128, 128)])
def test_routed_experts_on_fp8_equal_the_same_kernels_on_dequantised_weights(dtype, n, hidden, inter):
    """Routed experts and the shared experts inside the same launches (their down reduction split in parts
    that start inside the weight: 64 or 128 columns in)."""
    from align.engine import triton_moe

    g = torch.Generator().manual_seed(n)
    e, k = 8, 2
    x = torch.randn(n, hidden, generator=g).to(DEVICE, dtype)
    logits = torch.randn(n, e, generator=g).to(DEVICE)
    gu, dn = _fp8(torch.randn(e, 2 * inter, hidden, generator=g).to(DEVICE)), _fp8(
        torch.randn(e, hidden, inter, generator=g).to(DEVICE) * 0.1)
    s_gu, s_dn = _fp8(torch.randn(4 * inter, hidden, generator=g).to(DEVICE)), _fp8(
        torch.randn(hidden, 2 * inter, generator=g).to(DEVICE) * 0.1)
    assert triton_moe.shared_fits(s_gu, s_dn, inter)
    plan = triton_moe.route_and_plan(logits, Routing(e, k, "greedy", None, None, 1.0))
    y, s_y = triton_moe.routed_experts(x, plan, gu, dn, (s_gu, s_dn))
    deq = [w.dequant(dtype) for w in (gu, dn, s_gu, s_dn)]
    y_ref, s_ref = triton_moe.routed_experts(x, plan, deq[0], deq[1], (deq[2], deq[3]))
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(s_y, s_ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="all FP8 or all plain"):
        triton_moe.routed_experts(x, plan, gu, deq[1])


def test_fp8_shared_experts_stay_outside_when_a_part_would_cut_a_scale_block():
    from align.engine import triton_moe

    s_gu, s_dn = (_fp8(torch.ones(4 * 160, 64, device=DEVICE)), _fp8(torch.ones(64, 2 * 160, device=DEVICE)))
    assert not triton_moe.shared_fits(s_gu, s_dn, 160)           # the second part starts 160 columns in
    assert triton_moe.shared_fits(s_gu.dequant(torch.float32), s_dn.dequant(torch.float32), 160)


@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA, test_triton.py runs the engine on the fused path itself")
def test_fused_forward_on_fp8_weights_matches_the_torch_path_under_the_interpreter(tiny):
    """The whole fused step (prefill and decode) on FP8 projections, as the GPU runs it, against the torch path,
    which dequantises the same weights where it uses them: same tokens, experts and log-probs."""
    from align.engine import fused

    config = tiny.config(seed=5, hidden_size=48, moe_intermediate_size=24, q_lora_rank=None, first_k_dense_replace=1)
    model = tiny.model(config, seed=5)
    prompts = tiny.prompts(config.vocab_size, [5, 3], seed=5)
    sp = SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=3, ignore_eos=True, return_routing=True)
    outs = {}
    for kernels in ("torch", "fused"):
        engine = Engine.from_model(model, block_size=4, use_tqdm=False, weight_dtype="fp8")
        r = engine.runner
        assert r.fused is None and engine.weights.fp8
        if kernels == "fused":  # what decode_kernels='triton' builds on CUDA
            r.fused = fused.FusedDecoder(engine.weights, engine.cache, r.shape, r.routing, r.eps)
        outs[kernels] = engine.generate(prompts, sp)
    for a, b in zip(outs["torch"], outs["fused"]):
        for ca, cb in zip(a.outputs, b.outputs):
            assert ca.token_ids == cb.token_ids
            assert torch.equal(ca.routing.sort(-1).values, cb.routing.sort(-1).values)
            assert (torch.tensor(ca.logprobs) - torch.tensor(cb.logprobs)).abs().max() < 1e-4
