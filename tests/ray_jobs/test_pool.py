"""The Ray rollout pool: versions, load spreading, a worker killed or hung mid-rollout, missing resources."""

import os
import signal
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from transformers import DeepseekV2ForCausalLM  # noqa: E402

from align.model import build_config  # noqa: E402
from ray_jobs.pool import RolloutPool, init_ray  # noqa: E402
from ray_jobs.records import PromptGroup, Sampling  # noqa: E402

MICRO = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
             n_routed_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def ray_local():
    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return DeepseekV2ForCausalLM(build_config("tiny", vocab_size=256, eos_token_id=1, **MICRO)).eval()


def _groups(n_groups: int, seed: int = 0) -> list[PromptGroup]:
    g = torch.Generator().manual_seed(seed)
    return [PromptGroup(i, torch.randint(2, 256, (int(torch.randint(3, 12, (1,), generator=g)),),
                                         generator=g).tolist(), seed=1000 + i) for i in range(n_groups)]


def _check_complete(records, groups, n):
    assert [r.group_id for r in records] == [g.group_id for g in groups]       # none lost, none duplicated
    for r, g in zip(records, groups):
        assert r.prompt_ids == g.prompt_ids and len(r.completions) == n
        for c in r.completions:
            assert len(c.token_ids) == len(c.logprobs) > 0


SAMPLING = Sampling(n=4, temperature=1.0, top_p=1.0, top_k=0, max_tokens=24, stop_token_ids=[], return_routing=True)


@pytest.mark.slow
def test_versions_spread_and_determinism(ray_local, policy):
    pool = RolloutPool(policy.config, workers=2, num_cpus=0.5, timeout_s=120)
    try:
        pool.sync_weights(policy.state_dict(), version=3)
        groups = _groups(8)
        records = pool.generate(groups, SAMPLING)
        _check_complete(records, groups, 4)
        assert {r.policy_version for r in records} == {3}
        assert len({r.worker for r in records}) == 2              # both workers served groups
        assert records[0].completions[0].routing.shape[1:] == (1, 2)   # (T, moe layers, top_k)
        # New weights, new version: every record carries it, and the samples change.
        perturbed = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                     for k, v in policy.state_dict().items()}
        pool.sync_weights(perturbed, version=4)
        again = pool.generate(groups, SAMPLING)
        assert {r.policy_version for r in again} == {4}
        assert [c.token_ids for r in again for c in r.completions] != \
               [c.token_ids for r in records for c in r.completions]
        # A group's samples depend on its seed, not on which worker or chunk served it.
        pool.sync_weights(policy.state_dict(), version=5)
        third = pool.generate(list(reversed(groups)), SAMPLING)
        assert [c.token_ids for r in third for c in r.completions] == \
               [c.token_ids for r in records for c in r.completions]
    finally:
        pool.shutdown()


def _kill_during_rollout(pool, groups, sampling, sig):
    victim = pool.worker_pids()[0]
    slot = pool.slots[0]
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("records", pool.generate(groups, sampling)))
    t.start()
    deadline = time.monotonic() + 60
    while not slot.inflight:         # wait until the victim holds a chunk, then kill it mid-rollout
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(victim, sig)
    t.join(timeout=600)
    assert not t.is_alive()
    return victim, out["records"]


@pytest.mark.slow
def test_worker_killed_mid_rollout_is_replaced_and_nothing_lost(ray_local, policy):
    pool = RolloutPool(policy.config, workers=2, num_cpus=0.5, timeout_s=120)
    try:
        pool.sync_weights(policy.state_dict(), version=7)
        groups = _groups(16, seed=1)
        sampling = Sampling(n=4, temperature=1.0, top_p=1.0, top_k=0, max_tokens=64, stop_token_ids=[])
        victim, records = _kill_during_rollout(pool, groups, sampling, signal.SIGKILL)
        _check_complete(records, groups, 4)
        assert {r.policy_version for r in records} == {7}        # the replacement got the current weights
        assert pool.stats.replaced_workers == 1 and pool.stats.reissued_chunks >= 1
        assert victim not in pool.worker_pids()
        # Same seeds, same weights: the re-issued groups sample exactly what an undisturbed run samples.
        clean = pool.generate(groups, sampling)
        assert [c.token_ids for r in clean for c in r.completions] == \
               [c.token_ids for r in records for c in r.completions]
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_hung_worker_is_replaced_after_timeout(ray_local, policy):
    pool = RolloutPool(policy.config, workers=2, num_cpus=0.5, timeout_s=8)
    try:
        pool.sync_weights(policy.state_dict(), version=1)
        groups = _groups(8, seed=2)
        sampling = Sampling(n=2, temperature=1.0, top_p=1.0, top_k=0, max_tokens=48, stop_token_ids=[])
        victim = pool.worker_pids()[0]
        os.kill(victim, signal.SIGSTOP)           # frozen, not dead: it holds its chunk and never answers
        t0 = time.monotonic()
        records = pool.generate(groups, sampling)
        _check_complete(records, groups, 2)
        assert pool.stats.replaced_workers == 1 and time.monotonic() - t0 < 120
        assert victim not in pool.worker_pids()
    finally:
        pool.shutdown()


def test_missing_resources_fail_clearly(ray_local, policy):
    with pytest.raises(RuntimeError, match=r"cannot place 2 rollout workers: they need 2 CPUs and 2 GPUs"):
        RolloutPool(policy.config, workers=2, num_cpus=1, num_gpus=1, resource_wait_s=0.5)
