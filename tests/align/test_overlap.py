"""Rollouts overlapping training: which rows each step trains on, staleness bounds, stale groups dropped and
resampled, and a Ray worker killed while a batch samples in the background."""

import itertools
import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from align.engine_rollout import EngineRollout, Timers
from align.overlap import Overlap
from ray_jobs.records import Completion, RolloutRecord

G = 2   # completions per prompt


class FakeBackend:
    """Answers each group with G one-token completions, stamped with the version it holds; remembers which
    thread sampled, and can be slowed down."""

    def __init__(self, delay_s: float = 0.0):
        self.version, self.delay_s = -1, delay_s
        self.calls: list[tuple[int, str]] = []     # (version sampled with, thread name)

    def sync_weights(self, state_dict, version):
        self.version = version
        return 0.0

    def generate(self, groups, sampling):
        time.sleep(self.delay_s)
        self.calls.append((self.version, threading.current_thread().name))
        return [RolloutRecord(g.group_id, list(g.prompt_ids),
                              [Completion([7], [-0.5], "stop") for _ in range(sampling.n)], self.version, "fake")
                for g in groups]


class FakeTokenizer:
    eos_token_id = 1

    def apply_chat_template(self, messages, **kw):
        return {"input_ids": [ord(c) for c in messages[-1]["content"]]}


def fake_trainer():
    args = SimpleNamespace(temperature=1.0, top_p=1.0, top_k=0, max_completion_length=8)
    return SimpleNamespace(state=SimpleNamespace(global_step=0), args=args, num_generations=G,
                           model=SimpleNamespace(training=True), model_wrapped_unwrapped=lambda: torch.nn.Linear(2, 2),
                           _metrics={"train": {}})


def rows(tag: str, n_prompts: int = 2) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"{tag}-{i}"}]} for i in range(n_prompts) for _ in range(G)]


def refill():
    for i in itertools.count():
        yield {"prompt": [{"role": "user", "content": f"refill-{i}"}]}


def make(tmp_path, backend, k=1, interval=1):
    rollout = EngineRollout(backend, FakeTokenizer(), seed=0, return_routing=False, timers=Timers(),
                            log_path=tmp_path / "rollouts.jsonl")
    rollout.overlap = Overlap(rollout, max_staleness=k, interval=interval, refill=refill(), group_size=G)
    return rollout, rollout.overlap


def tags(batch: list[dict]) -> list[str]:
    return sorted({r["prompt"][-1]["content"].rsplit("-", 1)[0] for r in batch})


def test_each_step_trains_on_the_batch_sampled_during_the_step_before(tmp_path):
    backend = FakeBackend(delay_s=0.05)
    rollout, overlap = make(tmp_path, backend)
    trainer = fake_trainer()
    trained = []
    for step in range(4):
        trainer.state.global_step = step
        batch = rollout.prepare(rows(f"step{step}"), trainer, None)
        out = rollout([r["prompt"] for r in batch], trainer)
        trained.append((tags(batch), sorted(set(out["policy_version"]))))
        metrics = overlap.pop_metrics()
        assert metrics["overlap/staleness_mean"] == (0.0 if step == 0 else 1.0)
        assert metrics["overlap/stale_dropped_groups"] == 0
    # Step 0 samples its own rows on-policy; step 1 the refill rows started then; step t the rows TRL gave at t - 1.
    assert trained == [(["step0"], [0]), (["refill"], [0]), (["step1"], [1]), (["step2"], [2])]
    assert overlap.close() == 2                           # step 3's rows were sampled, never trained on
    # Every batch after the first sampled on the background thread, with the weights of the step that started it.
    assert backend.calls[0] == (0, "MainThread")
    assert [v for v, _ in backend.calls[1:]] == [0, 1, 2, 3]
    assert all(name.startswith("overlap-rollout") for _, name in backend.calls[1:])


def test_a_generation_serving_two_steps_starts_one_step_ahead(tmp_path):
    backend = FakeBackend()
    rollout, overlap = make(tmp_path, backend, k=1, interval=2)
    trainer = fake_trainer()
    versions = []
    for step in range(6):
        trainer.state.global_step = step
        overlap.submit_if_due(trainer)                    # what the step-begin callback does
        if step % 2 == 0:                                 # TRL generates every second optimizer step
            batch = rollout.prepare(rows(f"step{step}"), trainer, None)
            versions.append(sorted(set(rollout([r["prompt"] for r in batch], trainer)["policy_version"])))
    # Started at steps 1 and 3 (one step before each use), not at 0 and 2 (which would be two versions old).
    assert versions == [[0], [1], [3]]
    overlap.close()


def test_stale_groups_are_dropped_counted_and_sampled_again(tmp_path):
    backend = FakeBackend()
    rollout, overlap = make(tmp_path, backend, k=1)
    trainer = fake_trainer()
    rollout.prepare(rows("step0"), trainer, None)
    rollout([r["prompt"] for r in rows("step0")], trainer)
    trainer.state.global_step = 3                         # the batch started at step 0 is now three versions old
    batch = rollout.prepare(rows("step3"), trainer, None)
    out = rollout([r["prompt"] for r in batch], trainer)
    assert set(out["policy_version"]) == {3} and tags(batch) == ["refill"]
    metrics = overlap.pop_metrics()
    assert metrics["overlap/stale_dropped_groups"] == 2 and metrics["overlap/staleness_0"] == 1.0
    assert overlap.dropped_total == 2
    overlap.close()


def test_a_rollout_outside_the_pipeline_waits_for_the_one_in_flight(tmp_path):
    backend = FakeBackend(delay_s=0.3)
    rollout, overlap = make(tmp_path, backend)
    trainer = fake_trainer()
    rollout.prepare(rows("step0"), trainer, None)
    rollout([r["prompt"] for r in rows("step0")], trainer)
    assert overlap.pending is not None and not overlap.pending.future.done()
    trainer.state.global_step = 1
    rollout._rollout([r["prompt"] for r in rows("eval")], trainer)   # e.g. an evaluation rollout
    assert overlap.pending.future.done()                  # the swap to version 1 waited for it: never under a rollout
    assert [v for v, _ in backend.calls] == [0, 0, 1]
    overlap.close()


@pytest.mark.slow
def test_worker_killed_while_a_batch_samples_ahead_loses_nothing(tmp_path):
    ray = pytest.importorskip("ray")
    from transformers import DeepseekV2ForCausalLM

    from align.model import build_config
    from ray_jobs.pool import RolloutPool, init_ray

    init_ray(None, num_cpus=2)
    torch.manual_seed(0)
    policy = DeepseekV2ForCausalLM(build_config("tiny", vocab_size=256, eos_token_id=1, hidden_size=64,
                                                intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                                                n_routed_experts=4, num_experts_per_tok=2)).eval()
    pool = RolloutPool(policy.config, workers=2, num_cpus=0.5, timeout_s=120)
    try:
        rollout, overlap = make(tmp_path, pool)
        trainer = fake_trainer()
        trainer.model_wrapped_unwrapped = lambda: policy
        trainer.args.max_completion_length = 64
        rollout.prepare(rows("step0", 8), trainer, None)
        rollout([r["prompt"] for r in rows("step0", 8)], trainer)
        victim, slot = pool.worker_pids()[0], pool.slots[0]
        deadline = time.monotonic() + 60
        while not slot.inflight:                          # the background batch holds a chunk on the victim
            assert time.monotonic() < deadline and not overlap.pending.future.done()
            time.sleep(0.005)
        os.kill(victim, signal.SIGKILL)
        trainer.state.global_step = 1
        batch = rollout.prepare(rows("step1", 8), trainer, None)
        out = rollout([r["prompt"] for r in batch], trainer)
        assert tags(batch) == ["refill"] and len(out["completion_ids"]) == 8 * G   # every group, exactly once
        assert [p for p in out["prompt_ids"][::G]] == [[ord(c) for c in f"refill-{i}"] for i in range(8)]
        assert set(out["policy_version"]) == {0}
        assert pool.stats.replaced_workers == 1 and victim not in pool.worker_pids()
        overlap.close()
    finally:
        pool.shutdown()
        ray.shutdown()


@pytest.mark.parametrize("change, message", [
    ({"rollout": {"mode": "trl"}}, "needs rollout.mode ray or colocated"),
    ({"trainer": {"vllm_importance_sampling_correction": False}}, "need trainer.vllm_importance_sampling_correction"),
])
def test_overlap_recipe_checks(tmp_path, micro_sft_dir, monkeypatch, change, message):
    from align import recipe as recipes
    from align.grpo import GRPORun

    from .conftest import ROOT, micro_grpo, write_recipe

    monkeypatch.chdir(ROOT)
    raw = micro_grpo(tmp_path / "grpo", micro_sft_dir, mode="colocated")
    raw["rollout"]["max_staleness"] = 1
    for section, values in change.items():
        raw[section].update(values)
    with pytest.raises(recipes.RecipeError, match=rf"rollout\.max_staleness: .*{message}"):
        GRPORun(recipes.load("grpo", write_recipe(tmp_path / "grpo.yaml", raw)))
    raw["rollout"]["max_staleness"] = -1
    with pytest.raises(recipes.RecipeError, match="max_staleness must be >= 0"):
        recipes.load("grpo", write_recipe(tmp_path / "grpo.yaml", raw))


@pytest.mark.slow
def test_one_step_off_policy_grpo_on_the_ray_pool(tmp_path, micro_sft_dir):
    import json

    from .conftest import micro_grpo, run_align, write_recipe

    out = tmp_path / "grpo"
    raw = micro_grpo(out, micro_sft_dir, steps=4, mode="ray")
    raw["rollout"]["max_staleness"] = 1
    # The micro model earns no reward (no advantage, no gradient); decoupled weight decay still moves the policy
    # between sampling and training, which is what the correction has to see.
    raw["trainer"].update(learning_rate=1e-2, weight_decay=1.0)
    run_align("grpo", "--config", write_recipe(tmp_path / "grpo.yaml", raw))
    log = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert [(e["step"], e["policy_versions"], e["staleness"]) for e in log] == \
        [(0, [0], {"0": 2}), (1, [0], {"1": 2}), (2, [1], {"1": 2}), (3, [2], {"1": 2})]
    history = json.loads((out / "log_history.json").read_text())["log_history"]
    steps = [h for h in history if "overlap/staleness_mean" in h]
    assert [h["overlap/staleness_mean"] for h in steps] == [0.0, 1.0, 1.0, 1.0]
    assert all(h["overlap/stale_dropped_groups"] == 0 for h in steps)
    # On a batch one version old the trainer's log-probs differ from the behaviour ones, and TRL's truncated
    # importance weights correct for it: not 1 everywhere, never above the cap.
    assert steps[0]["sampling/sampling_logp_difference/max"] < 1e-3          # on-policy first batch (fp32)
    assert all(h["sampling/sampling_logp_difference/max"] > 1e-3 for h in steps[1:])
    assert all(h["sampling/importance_sampling_ratio/max"] <= 3.0 + 1e-6 for h in steps)
    assert any(abs(h["sampling/importance_sampling_ratio/mean"] - 1.0) > 1e-4 for h in steps[1:])
