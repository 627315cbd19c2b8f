"""The recipes' ``moe`` section end to end: routing replay and the balance term in GRPO and SFT on a micro model."""

import json

import pytest

from align import recipe as recipes

from .conftest import ROOT, micro_grpo, micro_sft, run_align, write_recipe


def _history(out):
    return json.loads((out / "log_history.json").read_text())["log_history"]


def _values(history, key):
    return [h[key] for h in history if key in h]


@pytest.mark.parametrize("change, message", [
    ({"rollout": {"mode": "trl"}}, "needs rollout.mode ray or colocated"),
    ({"rollout": {"return_routing": False}}, "needs rollout.return_routing: true"),
])
def test_replay_needs_the_engine_routing_record(tmp_path, micro_sft_dir, monkeypatch, change, message):
    from align.grpo import GRPORun

    monkeypatch.chdir(ROOT)
    raw = micro_grpo(tmp_path / "grpo", micro_sft_dir, mode="colocated", moe={"routing_replay": "rollout"})
    for section, values in change.items():
        raw[section].update(values)
    with pytest.raises(recipes.RecipeError, match=rf"moe\.routing_replay: .*{message}"):
        GRPORun(recipes.load("grpo", write_recipe(tmp_path / "grpo.yaml", raw)))


def test_moe_section_is_checked_when_the_recipe_loads(tmp_path, micro_sft_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    raw = micro_grpo(tmp_path / "grpo", micro_sft_dir, moe={"routing_replay": "always"})
    with pytest.raises(recipes.RecipeError, match="routing_replay"):
        recipes.load("grpo", write_recipe(tmp_path / "grpo.yaml", raw))
    raw["moe"] = {"device_balance": 0.05}
    with pytest.raises(recipes.RecipeError, match="devices >= 2"):
        recipes.load("grpo", write_recipe(tmp_path / "grpo.yaml", raw))


@pytest.mark.slow
def test_replay_on_the_ray_pool_with_two_iterations_and_balance(tmp_path, micro_sft_dir):
    out = tmp_path / "grpo"
    raw = micro_grpo(out, micro_sft_dir, steps=4, mode="ray",
                     moe={"routing_replay": "rollout", "expert_balance": 0.01})
    raw["trainer"]["num_iterations"] = 2          # the second pass over a batch replays the same records
    run_align("grpo", "--config", write_recipe(tmp_path / "grpo.yaml", raw))
    history = _history(out)
    for key in ("routing/mismatch", "routing/layer0_mismatch", "moe/expert_balance",
                "sampling/sampling_logp_difference/max", "sampling/importance_sampling_ratio/min",
                "clip_ratio/region_mean"):
        assert _values(history, key), key
    assert all(0.0 <= m <= 1.0 for m in _values(history, "routing/mismatch"))
    assert all(b >= 0.99 for b in _values(history, "moe/expert_balance"))     # 1.0 = uniform load, the minimum
    # fp32 engine and trainer on the same experts: the behaviour log-probs agree with the trainer's.
    assert max(_values(history, "sampling/sampling_logp_difference/max")) < 1e-3


@pytest.mark.slow
def test_replay_colocated_with_lora_and_gradient_checkpointing(tmp_path, micro_sft_dir):
    out = tmp_path / "grpo_lora"
    raw = micro_grpo(out, micro_sft_dir, steps=2, mode="colocated", peft={"r": 4, "lora_alpha": 8},
                     moe={"routing_replay": "rollout", "expert_balance": 0.01})
    raw["trainer"].update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    run_align("grpo", "--config", write_recipe(tmp_path / "grpo.yaml", raw))
    history = _history(out)
    assert len(_values(history, "routing/layer0_mismatch")) == 2
    assert max(_values(history, "sampling/sampling_logp_difference/max")) < 1e-3
    assert "adapter_model.safetensors" in {p.name for p in out.iterdir()}


@pytest.mark.slow
def test_sft_with_expert_balance_logs_the_term(tmp_path):
    out = tmp_path / "sft"
    raw = micro_sft(out, steps=4, moe={"expert_balance": 0.01})
    run_align("sft", "--config", write_recipe(tmp_path / "sft.yaml", raw))
    values = _values(_history(out), "moe/expert_balance")
    assert values and all(v >= 0.99 for v in values)


def test_bare_off_in_yaml_means_off(tmp_path, micro_sft_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = write_recipe(tmp_path / "grpo.yaml", micro_grpo(tmp_path / "grpo", micro_sft_dir))
    path.write_text(path.read_text() + "moe:\n  routing_replay: off\n")      # YAML 1.1 reads this as false
    assert recipes.load("grpo", path).recipe.moe.routing_replay == "off"
    assert recipes.load("grpo", path, ["moe.routing_replay=rollout"]).recipe.moe.routing_replay == "rollout"
