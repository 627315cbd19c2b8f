"""The FP8 latent cache (``Engine(kv_dtype="fp8")``): quantise/dequantise round trip, the paged cache holding
FP8 values and per-token scales, bytes per token, and the engine's outputs against the full-precision cache."""

import pytest
import torch

from align.engine import Engine, SamplingParams, kv_bytes_per_token
from align.engine.cache import FP8, LatentCache, dequantize_fp8, quantize_fp8
from align.model import build_config


def test_round_trip_keeps_e4m3_precision_at_every_magnitude():
    torch.manual_seed(0)
    x = torch.randn(64, 96) * torch.logspace(-6, 4, 64)[:, None]     # rows from 1e-6 to 1e4
    x[3] = 0.0
    q, scale = quantize_fp8(x)
    assert q.dtype == FP8 and scale.shape == (64,)
    y = dequantize_fp8(q, scale, torch.float32)
    assert torch.isfinite(y).all() and (y[3] == 0).all()
    # e4m3 rounds to 3 mantissa bits (relative error <= 2^-4); values below its normal range keep an absolute
    # error of half its smallest subnormal step (2^-10 of the row's scale).
    err = (y - x).abs()
    assert (err <= x.abs() / 16 + scale[:, None] * 2 ** -10 + 1e-30).all()
    assert (y.abs().amax(dim=1) - x.abs().amax(dim=1)).abs().max() <= 1e-4 * x.abs().max()   # amax maps to 448


def test_paged_fp8_cache_writes_gathers_and_copies_blocks():
    cache = LatentCache(num_layers=2, num_blocks=4, block_size=4, kv_lora_rank=12, rope_dim=4,
                        dtype=torch.float32, device="cpu", kv_dtype=FP8)
    assert cache.fp8 and cache.num_bytes() == 2 * 4 * 4 * (16 + 4)
    torch.manual_seed(1)
    entries = torch.randn(6, 16) * torch.tensor([0.01, 0.1, 1, 10, 100, 1000])[:, None]
    slots = torch.tensor([4, 5, 6, 7, 8, 9])                          # blocks 1 and 2
    cache.write(1, slots, entries)
    got = cache.gather(1, torch.tensor([[1, 2]]), length=6)[0]        # (6, 16)
    assert got.dtype == torch.float32
    assert ((got - entries).abs() <= entries.abs() / 16 + entries.abs().amax(1, keepdim=True) / 448 / 512).all()
    assert (cache.gather(0, torch.tensor([[1, 2]]), 6) == 0).all()    # the other layer untouched
    cache.copy_blocks([(1, 3)])                                       # copy-on-write keeps values and scales
    assert torch.equal(cache.gather(1, torch.tensor([[3]]), 4), cache.gather(1, torch.tensor([[1]]), 4))


def test_fp8_cache_halves_bytes_per_token():
    lite = build_config("lite")
    assert kv_bytes_per_token(lite, torch.bfloat16) == 31_104
    assert kv_bytes_per_token(lite, FP8) == 27 * (576 + 4) == 15_660           # half, plus a scale per layer
    meta = Engine.from_config(lite, device="meta", dtype=torch.bfloat16, num_blocks=8, use_tqdm=False,
                              kv_dtype="fp8")
    assert meta.kv_bytes_per_token() == 15_660


def test_fp8_cache_engine_stays_close_to_the_full_precision_cache(small_model):
    prompts = [[3, 17, 5, 9, 22], [8, 1, 30, 30, 12, 7, 2, 19, 4]]
    params = SamplingParams(n=1, temperature=0.0, max_tokens=12, logprobs=True, ignore_eos=True)
    ref = Engine.from_model(small_model, block_size=4, use_tqdm=False).generate(prompts, params)
    fp8 = Engine.from_model(small_model, block_size=4, use_tqdm=False, kv_dtype="fp8")
    assert fp8.cache.fp8 and fp8.runner.fused is None
    out = fp8.generate(prompts, params)
    for a, b in zip(ref, out):
        x, y = a.outputs[0], b.outputs[0]
        same = next((i for i, (p, q) in enumerate(zip(x.token_ids, y.token_ids)) if p != q), len(x.token_ids))
        assert same >= 1                                     # the first token reads a quantised prompt cache
        gaps = [abs(p - q) for p, q in zip(x.logprobs[:same], y.logprobs[:same])]
        assert max(gaps) < 0.25 and max(gaps) > 0            # quantisation shows, and stays small


def test_fp8_cache_options_are_checked(small_model):
    with pytest.raises(ValueError, match="kv_dtype must be 'auto'"):
        Engine.from_model(small_model, use_tqdm=False, kv_dtype="int8")
