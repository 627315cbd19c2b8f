"""The MLA kernels on an FP8 latent cache: prep writes what ``quantize_fp8`` would, decode reads it as
``LatentCache.gather`` would. On CUDA, or on the CPU under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET when there is no GPU); skipped where Triton is not installed."""

import pytest
import torch

from align.engine.cache import FP8, dequantize_fp8, quantize_fp8

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETER = DEVICE == "cpu"
HN, RANK, DR, DN, DV, BS = 4, 40, 8, 16, 12, 4       # unaligned latent width; 4-token cache blocks


def _prep_inputs(n, dtype, slots_total=64):
    g = torch.Generator().manual_seed(n)
    kv = torch.randn(n, RANK + DR, generator=g).to(DEVICE, dtype)
    q = torch.randn(n, HN, DN + DR, generator=g).to(DEVICE, dtype)
    rope = torch.randn(n, DR // 2, 2, generator=g).to(DEVICE)
    norm_w = (torch.rand(RANK, generator=g) + 0.5).to(DEVICE, dtype)
    w_uk = torch.randn(HN, DN, RANK, generator=g).to(DEVICE, dtype)
    slots = torch.randperm(slots_total, generator=g)[:n].to(DEVICE)
    return kv, q, rope, norm_w, w_uk, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [3, 21])               # one and two blocks of 16 tokens, the last one partial
def test_prep_writes_the_bytes_and_scales_quantize_fp8_gives(dtype, n):
    from align.engine import triton_mla

    kv, q, rope, norm_w, w_uk, slots = _prep_inputs(n, dtype)
    plain = torch.zeros(64, RANK + DR, dtype=dtype, device=DEVICE)
    q_plain = q.clone()
    lat_plain = triton_mla.mla_prep(kv, q_plain, norm_w, rope, slots, plain, 1e-6, DN, w_uk)
    cache = torch.zeros(64, RANK + DR, dtype=torch.uint8, device=DEVICE)
    scale = torch.zeros(64, device=DEVICE)
    q_fp8 = q.clone()
    lat = triton_mla.mla_prep(kv, q_fp8, norm_w, rope, slots, cache, 1e-6, DN, w_uk, kv_scale=scale)
    torch.testing.assert_close(lat, lat_plain, rtol=0, atol=0)       # the query side does not see the cache dtype
    torch.testing.assert_close(q_fp8, q_plain, rtol=0, atol=0)
    want, want_scale = quantize_fp8(plain[slots])                     # the torch path's write of the same entries
    torch.testing.assert_close(scale[slots], want_scale, rtol=0, atol=0)
    got, want = cache[slots].view(FP8).float(), want.float()
    wrong = got != want
    if INTERPRETER:   # its fp32 -> fp8 cast rounds ties up, not to even, and drops the carry when rounding up
        exact = plain[slots].float() / want_scale[:, None]            # crosses a power of two (31.3 -> 16, not 32)
        tie = (got + want) / 2 == exact
        lost_carry = (got * 2 == want) & (want.abs().log2() == want.abs().log2().round())
        wrong &= ~(tie | lost_carry)
    assert not wrong.any(), (got[wrong], want[wrong])                 # the same FP8 values
    others = torch.ones(64, dtype=torch.bool, device=DEVICE)
    others[slots] = False
    assert not cache[others].any() and not scale[others].any()       # no other slot written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_on_fp8_bytes_matches_decode_on_their_dequantised_values(dtype, monkeypatch):
    from align.engine import triton_mla

    monkeypatch.setattr(triton_mla, "split_len", lambda b, c, bn, sms, per_sm: bn)  # several splits a sequence
    g = torch.Generator().manual_seed(1)
    b, n_blocks = 3, 40
    ctx = torch.tensor([37, 1, 20], device=DEVICE)
    entries = torch.randn(n_blocks * BS, RANK + DR, generator=g).to(DEVICE, dtype)
    values, scale = quantize_fp8(entries)                             # (slots, R+Dr) FP8, (slots,)
    tables = torch.stack([torch.randperm(n_blocks, generator=g)[:10] for _ in range(b)]).to(DEVICE)
    q_lat = torch.randn(HN, b, RANK, generator=g).to(DEVICE, dtype)
    q = torch.randn(b, HN, DN + DR, generator=g).to(DEVICE, dtype)
    w_uv = torch.randn(HN, RANK, DV, generator=g).to(DEVICE, dtype)
    args = (tables, ctx, BS, 40, 0.3, DN, 132, w_uv)
    got = triton_mla.mla_decode(q_lat, q, values.view(torch.uint8), *args, kv_scale=scale)
    want = triton_mla.mla_decode(q_lat, q, dequantize_fp8(values, scale, dtype), *args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    far = triton_mla.mla_decode(q_lat, q, entries, *args)             # and FP8 differs from the unquantised cache
    assert not torch.allclose(got, far, rtol=1e-5, atol=1e-5)


def test_a_mismatched_scale_tensor_is_refused():
    from align.engine import triton_mla

    kv, q, rope, norm_w, w_uk, slots = _prep_inputs(3, torch.float32)
    cache = torch.zeros(64, RANK + DR, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="an FP8 cache is uint8"):
        triton_mla.mla_prep(kv, q, norm_w, rope, slots, cache, 1e-6, DN, w_uk, kv_scale=torch.zeros(63, device=DEVICE))
