"""The GRPO stage end to end on a micro model: Ray pool and colocated rollouts, versions, LoRA, kill + resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from align.checkpoint import load_trained

from .conftest import ROOT, micro_grpo, run_align, write_recipe


def _rollout_log(out):
    return [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_grpo_with_two_ray_workers(tmp_path, micro_sft_dir):
    out = tmp_path / "grpo"
    raw = micro_grpo(out, micro_sft_dir, steps=3, mode="ray")
    raw["rollout"]["workers"] = 2
    run_align("grpo", "--config", write_recipe(tmp_path / "grpo.yaml", raw))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 3
    for key in ("heldout_math_accuracy", "heldout_math_pass1", "start_heldout_math_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["pool"]["replaced_workers"] == 0
    log = _rollout_log(out)
    assert [entry["step"] for entry in log] == [0, 1, 2]
    for entry in log:   # every completion of a rollout came from the policy of the step it trained
        assert entry["policy_versions"] == [entry["step"]]
        assert entry["completions"] == 8 and entry["groups"] == 2
        assert sum(entry["workers"].values()) == 2
        assert entry["expert_load"] and len(entry["expert_load"]) == 1     # one MoE layer in the micro model
    assert {"model.safetensors", "recipe.lock.yaml", "config.json"} <= {p.name for p in out.iterdir()}
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    logged = {k for h in state["log_history"] for k in h}
    for key in ("reward", "rewards/math_accuracy/mean", "time/generation_s", "time/sync_s", "time/reward_s",
                "time/training_s", "experts/layer0_imbalance", "experts/layer0_load_entropy",
                "experts/layer0_max_share", "sampling/importance_sampling_ratio/mean",
                "completions/mean_length", "clip_ratio/region_mean"):
        assert key in logged, key


@pytest.mark.slow
def test_lora_grpo_colocated(tmp_path, micro_sft_dir):
    out = tmp_path / "grpo_lora"
    raw = micro_grpo(out, micro_sft_dir, steps=2, mode="colocated", peft={"r": 4, "lora_alpha": 8})
    raw["trainer"]["learning_rate"] = 1e-2
    run_align("grpo", "--config", write_recipe(tmp_path / "grpo.yaml", raw))
    files = {p.name for p in out.iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    assert [e["policy_versions"] for e in _rollout_log(out)] == [[0], [1]]
    merged = load_trained(out)               # the adapter resolves its base (the SFT folder) through the lock
    base = load_trained(micro_sft_dir)
    assert merged.state_dict().keys() == base.state_dict().keys()


@pytest.mark.slow
def test_driver_killed_then_resumed(tmp_path, micro_sft_dir):
    out = tmp_path / "grpo"
    raw = micro_grpo(out, micro_sft_dir, steps=8, mode="colocated")
    raw["trainer"].update(save_steps=2, save_total_limit=None)
    recipe = write_recipe(tmp_path / "grpo.yaml", raw)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "align", "grpo", "--config", str(recipe)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoint-2" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert killed_at < 8 and not (out / "metrics.json").exists()
    res = run_align("grpo", "--config", recipe, "--resume")
    assert f"checkpoint-{killed_at}" in res.stderr
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 8
    steps = [e["step"] for e in _rollout_log(out)]
    assert steps[-(8 - killed_at):] == list(range(killed_at, 8))   # resumed at the checkpoint's step


def test_starting_scores_are_reused_only_when_taken_the_same_way(tmp_path, micro_sft_dir):
    """Before/after must compare like with like: the upstream stage's held-out scores are copied only when they
    were taken on the same footing; otherwise the starting model is scored again."""
    import shutil
    from types import SimpleNamespace

    from align.grpo import GRPORun
    from align.metrics import heldout_math
    from align.model import load_tokenizer
    from align.recipe import EvalSection

    start = tmp_path / "sft"
    shutil.copytree(micro_sft_dir, start)
    ev = EvalSection(heldout_math=str(ROOT / "data/math/heldout.jsonl"), limit=4, samples=2, max_new_tokens=8,
                     batch_size=8)
    run = SimpleNamespace(recipe=SimpleNamespace(model=SimpleNamespace(path=str(start), dtype="float32"), eval=ev,
                                                 seed=0),
                          tokenizer=load_tokenizer(str(start)))
    fresh = heldout_math(load_trained(start), run.tokenizer, ev, 0)
    same = {k: v for k, v in fresh.items() if k not in ("heldout_math_accuracy", "heldout_math_pass1")}
    (start / "metrics.json").write_text(json.dumps({**same, "heldout_math_accuracy": 0.123,
                                                    "heldout_math_pass1": 0.456}))
    assert GRPORun._start_metrics(run) == {"start_heldout_math_accuracy": 0.123, "start_heldout_math_pass1": 0.456}
    for changed in ({"heldout_math_samples": 4}, {"heldout_math_limit": None}, {"heldout_math_seed": 1}):
        (start / "metrics.json").write_text(json.dumps({**same, **changed, "heldout_math_accuracy": 0.123,
                                                        "heldout_math_pass1": 0.456}))
        assert GRPORun._start_metrics(run) == {"start_heldout_math_accuracy": fresh["heldout_math_accuracy"],
                                               "start_heldout_math_pass1": fresh["heldout_math_pass1"]}


@pytest.mark.slow
def test_generated_prompts_dynamic_sampling_and_curves(tmp_path, micro_sft_dir):
    """Fresh generated prompts each step, uninformative groups refilled, held-out curves logged and drawn."""
    out = tmp_path / "grpo"
    raw = micro_grpo(out, micro_sft_dir, steps=3, mode="colocated")
    raw["curves"] = {"every": 2, "limit": 4, "samples": 2}
    raw["dynamic_sampling"] = {"enabled": True, "max_rounds": 3}
    run_align("grpo", "--config", write_recipe(tmp_path / "grpo.yaml", raw))
    assert [p["step"] for p in (json.loads(x) for x in (out / "curves.jsonl").read_text().splitlines())] == [0, 2, 3]
    history = json.loads((out / "log_history.json").read_text())["log_history"]
    logged = {k for h in history for k in h}
    for key in ("dynamic/rounds", "dynamic/dropped_groups", "dynamic/unfilled_groups", "dynamic/fresh_reward",
                "dynamic/fresh_zero_std_frac", "dynamic/fresh_math_accuracy", "curve/heldout_greedy",
                "curve/heldout_pass1", "entropy", "kl",
                "frac_reward_zero_std", "completions/mean_length"):
        assert key in logged, key
    steps = [h for h in history if "dynamic/rounds" in h]
    assert all(1 <= h["dynamic/rounds"] <= 3 for h in steps)
    # Rounds beyond the first are refills: one rollout log line per generation round.
    assert len(_rollout_log(out)) == round(sum(h["dynamic/rounds"] for h in steps))
    assert (out / "curves.png").stat().st_size > 10_000


def test_generated_prompts_fill_the_run_and_avoid_heldout(tmp_path, micro_sft_dir, monkeypatch):
    from align import recipe as recipes
    from align.grpo import GRPORun
    from align.task_stream import prompts_of

    monkeypatch.chdir(ROOT)
    raw = micro_grpo(tmp_path / "grpo", micro_sft_dir, steps=5, mode="colocated")
    raw["trainer"]["num_iterations"] = 2          # one generation batch serves two steps
    job = GRPORun(recipes.load("grpo", write_recipe(tmp_path / "grpo.yaml", raw)))
    source = job.prompts
    assert job._prompts_needed() == 3 * 2        # ceil(5 / 2) generations of 8 rows / 4 per prompt
    rows = source.dataset()
    assert len(rows) == 6 and not source.files
    avoid = prompts_of([ROOT / "data/math/heldout.jsonl", ROOT / "data/math/validation.jsonl"], "math")
    assert not {r["prompt"][-1]["content"] for r in rows} & avoid
    refill = source.refill()
    fresh = [next(refill)["prompt"][-1]["content"] for _ in range(50)]
    assert len(set(fresh)) == 50 and not set(fresh) & avoid
    assert not set(fresh) & {r["prompt"][-1]["content"] for r in rows}   # refills continue the stream
