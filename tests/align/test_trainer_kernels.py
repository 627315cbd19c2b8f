"""The trainer's kernel choices from the recipe: model.experts_implementation (every kernel gives the same logits,
bad names fail) and model.cudnn_attention (SDPA's cuDNN backend off unless asked for)."""

import pytest
import torch

from align import recipe
from align.checkpoint import load_base
from align.model import load_tokenizer

from .conftest import MICRO_MODEL, ROOT, micro_sft, write_recipe


@pytest.fixture
def tok():
    return load_tokenizer(ROOT / "data/tokenizer")


def micro_model(tok, impl=None, **section):
    section = {"preset": "tiny", "overrides": dict(MICRO_MODEL), "experts_implementation": impl, **section}
    return load_base(section, tok, seed=0, dtype=torch.float32)


def test_each_kernel_is_set_and_agrees_with_eager(tok):
    ids = torch.randint(3, len(tok), (3, 10), generator=torch.Generator().manual_seed(0))
    ref = micro_model(tok, "eager")
    assert ref.config._experts_implementation == "eager"
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    for impl in ("grouped_mm", "batched_mm"):
        m = micro_model(tok, impl)
        assert m.config._experts_implementation == impl
        with torch.no_grad():
            torch.testing.assert_close(m(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_unknown_kernel_is_refused_when_the_recipe_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    raw = micro_sft(tmp_path / "out")
    raw["model"]["experts_implementation"] = "magic"
    with pytest.raises(recipe.RecipeError, match=r"model\.experts_implementation: expected one of"):
        recipe.load("sft", write_recipe(tmp_path / "sft.yaml", raw))


def test_cudnn_attention_is_off_unless_the_recipe_asks_for_it(tok):
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)       # torch's default
        micro_model(tok)                                  # a section without the key (an older lock) turns it off
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        micro_model(tok, cudnn_attention=True)
        assert torch.backends.cuda.cudnn_sdp_enabled()
        micro_model(tok, cudnn_attention=False)
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
