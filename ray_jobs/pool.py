"""A pool of Ray actors, each serving rollouts from its own MLA/MoE engine.

The trainer puts its weights in the object store once per policy version; every worker loads them before it
samples.  Prompt groups go out in chunks to whichever worker has the least outstanding work.  A worker that
dies, or hangs past ``timeout_s``, is killed and replaced; the replacement gets the current weights and the
lost chunks are issued again, so every group comes back exactly once.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import ray
import torch

from ray_jobs.records import PromptGroup, RolloutRecord, Sampling

log = logging.getLogger(__name__)


@ray.remote
class RolloutWorker:
    """Holds one ``align.engine.Engine``; the model is built from a config and filled by ``load_weights``."""

    def __init__(self, config_dict: dict, engine_options: dict, name: str, num_threads: int | None = None):
        from transformers import DeepseekV2Config

        from align.engine import Engine

        if num_threads:
            torch.set_num_threads(num_threads)
        self.name = name
        config = DeepseekV2Config.from_dict(config_dict)
        opts = dict(engine_options)
        device = opts.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = opts.pop("dtype", None) or config.dtype or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        # Weights are allocated, not initialised: the pool loads the policy before any rollout.
        self.engine = Engine.from_config(config, device=device, dtype=dtype, **opts)
        self.engine.version = -1

    def pid(self) -> int:
        return os.getpid()

    def load_weights(self, state_dict: dict, version: int) -> float:
        t0 = time.perf_counter()
        self.engine.load_weights(state_dict, version)
        return time.perf_counter() - t0

    def version(self) -> int:
        return self.engine.version

    def generate(self, groups: list[PromptGroup], sampling: Sampling, version: int) -> list[RolloutRecord]:
        from align.rollout import run_groups

        if self.engine.version != version:
            # Never sample with stale weights: the pool loads weights before issuing work.
            raise RuntimeError(f"{self.name} holds policy version {self.engine.version}, asked for {version}")
        return run_groups(self.engine, groups, sampling, worker=self.name)


@dataclass
class _Slot:
    name: str
    actor: ray.actor.ActorHandle
    inflight: dict = field(default_factory=dict)   # ObjectRef -> (chunk index, issue time)


@dataclass
class PoolStats:
    replaced_workers: int = 0
    reissued_chunks: int = 0
    last_sync_s: float = 0.0
    last_generate_s: float = 0.0
    groups_per_worker: dict = field(default_factory=dict)


class RolloutPool:
    def __init__(self, model_config, workers: int, num_cpus: float = 1, num_gpus: float = 0,
                 engine_options: dict | None = None, timeout_s: float = 600.0, chunks_per_worker: int = 2,
                 resource_wait_s: float = 60.0, startup_timeout_s: float = 600.0):
        if workers < 1:
            raise ValueError("rollout.workers must be >= 1")
        self.config_dict = model_config.to_dict()
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.engine_options = dict(engine_options or {})
        self.timeout_s, self.chunks_per_worker = timeout_s, chunks_per_worker
        self.startup_timeout_s = startup_timeout_s   # a new actor imports torch and builds its engine first
        self.stats = PoolStats()
        self._weights_ref = None
        self._version = -1
        self._next_id = 0
        check_resources(workers, num_cpus, num_gpus, resource_wait_s)
        self.slots = [self._spawn() for _ in range(workers)]
        ray.get([s.actor.pid.remote() for s in self.slots])  # surfaces construction errors now

    # -- workers ------------------------------------------------------------------------------------------
    def _spawn(self) -> _Slot:
        name = f"rollout-worker-{self._next_id}"
        self._next_id += 1
        threads = max(1, int(self.num_cpus)) if self.num_gpus == 0 else None
        actor = RolloutWorker.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=0,
                                      name=None).remote(self.config_dict, self.engine_options, name, threads)
        return _Slot(name, actor)

    def worker_pids(self) -> list[int]:
        return ray.get([s.actor.pid.remote() for s in self.slots])

    def _replace(self, slot: _Slot, why: str) -> _Slot:
        log.warning("replacing %s (%s)", slot.name, why)
        ray.kill(slot.actor, no_restart=True)
        fresh = self._spawn()
        if self._weights_ref is not None:
            ray.get(fresh.actor.load_weights.remote(self._weights_ref, self._version),
                    timeout=self.startup_timeout_s)
        self.slots[self.slots.index(slot)] = fresh
        self.stats.replaced_workers += 1
        return fresh

    # -- weights ------------------------------------------------------------------------------------------
    def sync_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> float:
        """Put the weights in the object store once; every worker loads that one copy."""
        t0 = time.perf_counter()
        cpu_sd = {k: v.detach().to("cpu", copy=False).contiguous() for k, v in state_dict.items()}
        self._weights_ref = ray.put(cpu_sd)
        self._version = version
        for slot in list(self.slots):
            try:
                ray.get(slot.actor.load_weights.remote(self._weights_ref, version), timeout=self.timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                self._replace(slot, f"failed to load weights: {type(e).__name__}")
        self.stats.last_sync_s = time.perf_counter() - t0
        return self.stats.last_sync_s

    @property
    def version(self) -> int:
        return self._version

    # -- rollouts -----------------------------------------------------------------------------------------
    def generate(self, groups: list[PromptGroup], sampling: Sampling) -> list[RolloutRecord]:
        """One record per group, in ``groups`` order, all from the current policy version."""
        t0 = time.perf_counter()
        n_chunks = max(1, min(len(groups), len(self.slots) * self.chunks_per_worker))
        chunks = [groups[i::n_chunks] for i in range(n_chunks)]
        pending = list(range(n_chunks))          # chunk indices not yet issued (or lost and re-queued)
        done: dict[int, list[RolloutRecord]] = {}
        while len(done) < n_chunks:
            for slot in self.slots:              # keep one chunk in flight per worker, least loaded first
                if pending and not slot.inflight:
                    idx = pending.pop(0)
                    ref = slot.actor.generate.remote(chunks[idx], sampling, self._version)
                    slot.inflight[ref] = (idx, time.monotonic())
            refs = [r for s in self.slots for r in s.inflight]
            ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
            for ref in ready:
                slot = next(s for s in self.slots if ref in s.inflight)
                idx, _ = slot.inflight.pop(ref)
                try:
                    done[idx] = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    pending.append(idx)
                    lost = list(slot.inflight.values())
                    pending.extend(i for i, _ in lost)
                    self.stats.reissued_chunks += 1 + len(lost)
                    self._replace(slot, f"died: {type(e).__name__}")
            now = time.monotonic()
            for slot in list(self.slots):        # hung workers are treated like dead ones
                if any(now - t > self.timeout_s for _, t in slot.inflight.values()):
                    pending.extend(i for i, _ in slot.inflight.values())
                    self.stats.reissued_chunks += len(slot.inflight)
                    self._replace(slot, f"no answer in {self.timeout_s:.0f}s")
        records = sorted((r for chunk in done.values() for r in chunk), key=lambda r: r.group_id)
        ids = [r.group_id for r in records]
        if ids != sorted(g.group_id for g in groups):
            raise RuntimeError(f"rollout lost or duplicated groups: {ids}")
        stale = {r.policy_version for r in records} - {self._version}
        if stale:
            raise RuntimeError(f"rollout mixed policy versions {stale} with {self._version}")
        for r in records:
            self.stats.groups_per_worker[r.worker] = self.stats.groups_per_worker.get(r.worker, 0) + 1
        self.stats.last_generate_s = time.perf_counter() - t0
        return records

    def shutdown(self) -> None:
        for slot in self.slots:
            ray.kill(slot.actor, no_restart=True)
        self.slots = []


def check_resources(workers: int, num_cpus: float, num_gpus: float, wait_s: float) -> None:
    """Fail with a clear message instead of hanging when the cluster cannot place the workers."""
    need_cpu, need_gpu = workers * num_cpus, workers * num_gpus
    try:
        # An autoscaler adds nodes only for demand it sees; ask for the pool's bundles before waiting for them.
        from ray.autoscaler.sdk import request_resources

        bundle = {k: v for k, v in (("CPU", num_cpus), ("GPU", num_gpus)) if v}
        request_resources(bundles=[bundle] * workers)
    except Exception as e:  # a cluster without an autoscaler has nothing to ask
        log.debug("no autoscaler request: %s", e)
    deadline = time.monotonic() + wait_s
    while True:
        total = ray.cluster_resources()
        if total.get("CPU", 0) >= need_cpu and total.get("GPU", 0) >= need_gpu:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the Ray cluster cannot place {workers} rollout workers: they need {need_cpu:g} CPUs and "
                f"{need_gpu:g} GPUs, the cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs "
                "(lower rollout.workers / rollout.num_cpus / rollout.num_gpus or add nodes)")
        time.sleep(2.0)


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join ``address`` or start an embedded local Ray: loopback only, dashboard off."""
    if ray.is_initialized():
        return
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        # address="local" always starts a private instance; a bare ray.init() would join any `ray start` head
        # found on this machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env=env, log_to_driver=True)
