"""Rollouts that overlap training: the next generation batch samples in the background while the trainer steps.

With ``rollout.max_staleness: k >= 1`` the batch a generation step trains on was sampled by a policy up to k
optimizer steps old (one-step off-policy GRPO at k = 1, as in verl and AReaL).  TRL's importance-sampling
correction (``trainer.vllm_importance_sampling_correction``) weighs each token by the trainer's probability over
the engine's behaviour probability, which the engine returned with the sample, so the loss stays correct
off-policy.  Timeline at k = 1, one generation per optimizer step:

    step t:   take batch B_t (sampled with weights v_{t-1})  ->  sync v_t, start B_{t+1} in the background  ->  train
                                                                  (B_{t+1} samples TRL's rows of step t)

A batch is started only when nothing is in flight, so weights are swapped between rollouts, never under one.  The
first generation of a run samples on-policy and starts the next batch on rows drawn from the prompt refill
stream.  When a generation serves several optimizer steps (``num_iterations`` > 1), the next batch starts k steps
before it is due.  A group older than k versions when taken (a late start, a resumed run) is dropped, counted and
sampled again with the current weights.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch


@dataclass
class _Pending:
    rows: list[dict]      # TRL rows, G per prompt
    launch: object        # align.engine_rollout.Launch: groups, sampling, policy version
    future: Future        # -> (records, seconds sampling took)


class Overlap:
    def __init__(self, rollout, max_staleness: int, interval: int, refill: Iterator[dict], group_size: int,
                 max_oversample: float = 1.0):
        if max_staleness < 1:
            raise ValueError("overlap needs max_staleness >= 1")
        self.rollout, self.k, self.interval = rollout, max_staleness, interval
        self.max_oversample, self.oversample = max_oversample, False
        self.keep_rate: float | None = None      # informative share of the last first round (dynamic sampling)
        self.refill, self.group_size = refill, group_size
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="overlap-rollout")
        self.pending: _Pending | None = None
        self.reserve: list[dict] | None = None   # rows waiting to be sampled for the next generation batch
        self.next_generation: int | None = None  # the optimizer step of the next generation batch
        self.metrics: dict[str, float] = {}
        self.dropped_total = 0

    # -- the generation step ----------------------------------------------------------------------------------
    def take(self, inputs: list[dict], trainer, oversample: bool = False) -> tuple[list[dict], dict]:
        """The rows to train on now and their rollout output; ``inputs`` (TRL's rows) are kept for the next batch.

        With ``oversample`` (dynamic sampling filters the batch) the next batch also samples extra groups from the
        refill stream, as many as the last keep rate says the filter will drop, so that it rarely needs a refill
        round sampled on-policy after it (at most ``max_oversample`` times the batch)."""
        self.oversample = oversample
        step = trainer.state.global_step
        self.next_generation = step + self.interval
        if self.pending is None and self.reserve is None:   # the run's first generation: nothing sampled ahead
            records, gen_s, sync_s = self.rollout._sample([r["prompt"] for r in inputs], trainer)
            self.reserve = self._draw(len(records))
            self._note(step, [0] * len(records), dropped=0, wait_s=gen_s, sample_s=gen_s)
            return inputs, self.rollout._collect(records, step, gen_s, sync_s, [0] * len(records))
        if self.pending is None:                            # due but not started: start it now and wait for it
            self._start(trainer)
        pending, self.pending = self.pending, None
        t0 = time.perf_counter()
        records, sample_s = pending.future.result()
        wait_s = time.perf_counter() - t0
        self.rollout.timers.add("generation", wait_s)
        records, staleness, dropped = self._refresh_stale(records, pending.rows, trainer)
        self.reserve = inputs
        self._note(step, staleness, dropped, wait_s, sample_s)
        return pending.rows, self.rollout._collect(records, step, sample_s, pending.launch.sync_s, staleness)

    def submit_if_due(self, trainer) -> None:
        """Start sampling the kept rows when the next generation batch is at most k optimizer steps away."""
        if self.pending is not None or self.reserve is None or self.next_generation is None:
            return
        if self.next_generation - trainer.state.global_step <= self.k:
            self._start(trainer)

    # -- background sampling ----------------------------------------------------------------------------------
    def _start(self, trainer) -> None:
        rows, self.reserve = self.reserve, None
        if self.oversample and self.keep_rate is not None:
            n = len(rows) // self.group_size
            want = math.ceil(n / self.keep_rate) if self.keep_rate > 0 else math.inf
            rows = rows + self._draw(min(want, math.ceil(n * self.max_oversample)) - n)
        launch = self.rollout._launch([r["prompt"] for r in rows], trainer)   # weights synced: nothing in flight
        backend = self.rollout.backend
        stream = _side_stream(backend)
        if stream is not None:   # the weights just loaded on the current stream come first
            stream.wait_stream(torch.cuda.current_stream(stream.device))

        def sample():
            t0 = time.perf_counter()
            if stream is None:
                records = backend.generate(launch.groups, launch.sampling)
            else:
                with torch.cuda.stream(stream):
                    records = backend.generate(launch.groups, launch.sampling)
                stream.synchronize()
            return records, time.perf_counter() - t0

        self.pending = _Pending(rows, launch, self.executor.submit(sample))

    def settle(self) -> None:
        """Wait until the rollout in flight (if any) has finished; its result stays pending."""
        if self.pending is not None:
            self.pending.future.exception()

    def close(self) -> int:
        """Finish the rollout in flight; returns how many groups it sampled that no step trained on."""
        unused = 0
        if self.pending is not None:
            self.settle()
            unused = len(self.pending.launch.groups)
            self.pending = None
        self.executor.shutdown(wait=True)
        return unused

    # -- staleness ----------------------------------------------------------------------------------------------
    def _refresh_stale(self, records: list, rows: list[dict], trainer) -> tuple[list, list[int], int]:
        """Groups sampled more than k versions ago are sampled again with the current weights."""
        step = trainer.state.global_step
        stale = [i for i, r in enumerate(records) if step - r.policy_version > self.k]
        if stale:
            g = self.group_size
            again, _, _ = self.rollout._sample([rows[i * g]["prompt"] for i in stale for _ in range(g)], trainer)
            records = list(records)
            for i, fresh in zip(stale, again):
                records[i] = fresh
            self.dropped_total += len(stale)
        return records, [step - r.policy_version for r in records], len(stale)

    def _draw(self, n_groups: int) -> list[dict]:
        return [dict(row) for row in itertools.islice(self.refill, n_groups) for _ in range(self.group_size)]

    def _note(self, step: int, staleness: list[int], dropped: int, wait_s: float, sample_s: float) -> None:
        n = max(len(staleness), 1)
        self.metrics = {"overlap/staleness_mean": sum(staleness) / n, "overlap/stale_dropped_groups": float(dropped),
                        "overlap/wait_s": wait_s, "overlap/sample_s": sample_s}
        for s in range(self.k + 1):
            self.metrics[f"overlap/staleness_{s}"] = sum(1 for x in staleness if x == s) / n

    def pop_metrics(self) -> dict[str, float]:
        out, self.metrics = self.metrics, {}
        return out


def _side_stream(backend):
    """A second CUDA stream for a colocated engine on the GPU, so sampling can run beside the training kernels."""
    engine = getattr(backend, "engine", None)
    device = getattr(engine, "device", None)
    if device is None or device.type != "cuda":
        return None
    return torch.cuda.Stream(device)
