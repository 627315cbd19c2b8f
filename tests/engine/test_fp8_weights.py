"""FP8 projection weights (``Engine.from_model(..., weight_dtype="fp8")``): the 128 x 128 block round trip, stacked
matrices quantised part by part, the engine against a bf16 engine holding the dequantised weights, weight swaps,
memory, and option checks."""

import pytest
import torch

from align.engine import Engine, SamplingParams
from align.engine.cache import FP8
from align.engine.fp8_weights import BLOCK, Fp8Weight, dequantize_blocks, quantize_blocks
from align.model import build_config

# Projection parameters the engine holds in FP8 (transformers names, by suffix); the rest stay in bf16/fp32.
FP8_SUFFIXES = ("q_proj.weight", "q_a_proj.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight", "o_proj.weight",
                "gate_proj.weight", "up_proj.weight", "down_proj.weight", "experts.gate_up_proj", "experts.down_proj")


def _fp8_model_config(tiny):
    # Widths past one block (144, 200 > 128) so block grids, padding and per-row scales all matter.
    return tiny.config(seed=3, hidden_size=144, num_attention_heads=4, num_key_value_heads=4, intermediate_size=200,
                       q_lora_rank=12, n_routed_experts=8, first_k_dense_replace=1)


def test_block_round_trip_keeps_e4m3_precision_per_block():
    torch.manual_seed(0)
    w = torch.randn(3, 300, 260)
    w[:, :128, :128] *= 1e-4                                    # one block far smaller than the others
    w[1, 200:, 256:] = 0.0                                      # an all-zero (partial) block
    q, scale = quantize_blocks(w)
    assert q.dtype == FP8 and q.shape == w.shape and scale.shape == (3, 3, 3)
    back = dequantize_blocks(q, scale, torch.float32)
    s = scale.repeat_interleave(BLOCK, 1)[:, :300].repeat_interleave(BLOCK, 2)[:, :, :260]
    # 3 mantissa bits: relative error <= 2^-4, plus half e4m3's smallest subnormal step of the block's scale.
    assert ((back - w).abs() <= w.abs() / 16 + s * 2 ** -10).all()
    assert (back[1, 256:, 256:] == 0).all() and torch.isfinite(back).all()
    # The small block got its own scale: its error is relative to its own values, not to the big blocks'.
    assert scale[:, 0, 0].max() < 1e-3 * scale[:, 1, 1].min()
    # Each block's largest value maps to e4m3's largest, 448.
    assert torch.allclose(q.float().abs().amax(dim=(1, 2)), torch.full((3,), 448.0))


def test_stacked_parts_are_quantised_on_their_own_grids():
    torch.manual_seed(1)
    top, bottom = torch.randn(200, 160), torch.randn(72, 160) * 1e5  # 200 rows: the second part starts mid-block
    stack = Fp8Weight.empty(272, 160, device="cpu")
    assert stack.scale.shape == (272, 2)
    stack[:200].copy_(top)
    stack[200:].copy_(bottom)
    for part, rows in ((top, slice(0, 200)), (bottom, slice(200, 272))):
        assert torch.equal(stack[rows].dequant(torch.float32), dequantize_blocks(*quantize_blocks(part), torch.float32))
    # One grid over the whole stack would give rows 128..199 the bottom part's 1e5 times larger scale, under
    # which their values fall into e4m3's subnormal range or to zero.
    whole = dequantize_blocks(*quantize_blocks(torch.cat([top, bottom])), torch.float32)
    own = stack.dequant(torch.float32)
    assert (own[128:200] - top[128:200]).abs().mean() < 0.2 * (whole[128:200] - top[128:200]).abs().mean()
    with pytest.raises(ValueError, match="shape"):
        stack.copy_(torch.zeros(272, 161))


def _dequantised_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights with every FP8 projection replaced by its block-quantised-then-dequantised value."""
    return {k: dequantize_blocks(*quantize_blocks(v), v.dtype) if k.endswith(FP8_SUFFIXES) else v
            for k, v in model.state_dict().items()}


def test_fp8_engine_matches_a_bf16_engine_on_the_dequantised_weights(tiny):
    model = tiny.model(_fp8_model_config(tiny), seed=3)
    prompts = [[3, 17, 5, 9, 22], [8, 1, 30, 30, 12, 7, 2, 19, 4], [5] * 20]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=10, logprobs=True, ignore_eos=True, seed=4)
    fp8 = Engine.from_model(model, dtype=torch.bfloat16, block_size=4, use_tqdm=False, weight_dtype="fp8")
    assert fp8.weights.fp8 and isinstance(fp8.weights.layers[1].mlp.gate_up, Fp8Weight)
    assert fp8.weights.embed.dtype == torch.bfloat16 and fp8.weights.layers[1].mlp.router.dtype == torch.float32
    ref = Engine.from_model(model, dtype=torch.bfloat16, block_size=4, use_tqdm=False)
    ref.load_weights(_dequantised_state_dict(model))
    plain = Engine.from_model(model, dtype=torch.bfloat16, block_size=4, use_tqdm=False)
    got, want, orig = (e.generate(prompts, params) for e in (fp8, ref, plain))
    lp = lambda outs: torch.tensor([c.logprobs for r in outs for c in r.outputs])  # noqa: E731
    assert [c.token_ids for r in got for c in r.outputs] == [c.token_ids for r in want for c in r.outputs]
    assert torch.allclose(lp(got), lp(want), atol=1e-5)
    # ... and quantisation itself shows against the unquantised weights.
    assert not torch.allclose(lp(orig), lp(got), atol=1e-3)


def test_fp8_weights_are_requantised_in_place_on_load(tiny):
    model = tiny.model(_fp8_model_config(tiny), seed=3)
    other = tiny.model(_fp8_model_config(tiny), seed=9)
    engine = Engine.from_model(model, dtype=torch.bfloat16, use_tqdm=False, weight_dtype="fp8")
    gate_up = engine.weights.layers[1].mlp.gate_up
    data, scale = gate_up.data, gate_up.scale
    engine.load_weights(other.state_dict())
    assert engine.weights.layers[1].mlp.gate_up.data is data and gate_up.scale is scale   # nothing re-allocated
    fresh = Engine.from_model(other, dtype=torch.bfloat16, use_tqdm=False, weight_dtype="fp8")
    for a, b in zip(engine.weights.targets().values(), fresh.weights.targets().values()):
        pairs = ((a.data, b.data), (a.scale, b.scale)) if isinstance(a, Fp8Weight) else ((a, b),)
        assert all(torch.equal(x.float(), y.float()) for x, y in pairs)


def test_fp8_weights_about_halve_the_weight_bytes():
    lite = build_config("lite")
    size = {w: Engine.from_config(lite, device="meta", dtype=torch.bfloat16, num_blocks=8, use_tqdm=False,
                                  weight_dtype=w).weights.num_bytes() for w in ("auto", "fp8")}
    # Projections drop from 2 bytes to 1 + 4/128 a weight; embeddings, head, norms, router and kv_b stay bf16.
    assert 0.5 < size["fp8"] / size["auto"] < 0.56


def test_fp8_weight_options_are_checked(small_model):
    with pytest.raises(ValueError, match="weight_dtype must be 'auto'"):
        Engine.from_model(small_model, use_tqdm=False, weight_dtype="int8")
    with pytest.raises(TypeError, match="row slices"):
        Engine.from_model(small_model, use_tqdm=False, weight_dtype="fp8").weights.layers[1].mlp.gate_up[0]
