"""FP8 rollouts from the recipe (``rollout.kv_dtype`` / ``rollout.weight_dtype``): the GRPO stage runs on them and
its importance-sampling metrics show the behaviour log-probs move off the trainer's, by a bounded amount."""

import json

import pytest

from .conftest import micro_grpo, run_align, write_recipe


@pytest.mark.slow
def test_grpo_on_fp8_rollouts_reports_the_mismatch(tmp_path, micro_sft_dir):
    out = tmp_path / "grpo"
    raw = micro_grpo(out, micro_sft_dir, steps=2, mode="colocated")
    raw["rollout"].update(kv_dtype="fp8", weight_dtype="fp8")
    run_align("grpo", "--config", write_recipe(tmp_path / "grpo.yaml", raw))
    history = json.loads((out / "log_history.json").read_text())["log_history"]
    gaps = [h["sampling/sampling_logp_difference/max"] for h in history if "sampling/sampling_logp_difference/max" in h]
    ratios = [h["sampling/importance_sampling_ratio/min"] for h in history if "sampling/importance_sampling_ratio/min" in h]
    assert len(gaps) == 2 and len(ratios) == 2
    # An fp32 engine on fp32 weights agrees with the trainer below 1e-3 (test_moe_stages); FP8 shows, and stays small.
    assert min(gaps) > 1e-3 and max(gaps) < 1.0
    assert 0.3 < min(ratios) < 1.0
