"""GRPO's ``rollout_func`` on our engines: prompt groups out to a backend (Ray pool or colocated engine), one
completion per row back in TRL's format, with the engine's sampling log-probs, policy versions and routing records.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

from align.dynamic_sampling import GroupFilter
from align.expert_load import add_loads, expert_load
from align.rollout import policy_state_dict
from ray_jobs.records import PromptGroup, Sampling


class Timers:
    """Seconds spent per phase (generation, reward, sync) since the last ``pop``: one step's split."""

    def __init__(self):
        self.acc: dict[str, float] = {}

    def add(self, key: str, seconds: float) -> None:
        self.acc[key] = self.acc.get(key, 0.0) + seconds

    def pop(self) -> dict[str, float]:
        out, self.acc = self.acc, {}
        return out


def timed_reward(fn, timers: Timers):
    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timers.add("reward", time.perf_counter() - t0)

    wrapped.__name__ = getattr(fn, "__name__", "reward")
    return wrapped


class EngineRollout:
    """GRPO's ``rollout_func``: groups of identical prompts in, one engine completion per row out.

    With dynamic sampling or overlap the batch is sampled before TRL asks (``prepare``), and the call returns that
    output. With ``keep_routing`` each row's routing record (prompt and completion) rides along under ``"routing"`` and is
    taken off as the rows go to TRL: ``handed_routing`` holds it for the trainer's forwards over that batch.
    """

    def __init__(self, backend, tokenizer, seed: int, return_routing: bool, timers: Timers, log_path: Path,
                 n_experts: int | None = None, keep_routing: bool = False):
        self.backend, self.tokenizer, self.seed = backend, tokenizer, seed
        self.return_routing, self.timers, self.log_path = return_routing, timers, log_path
        self.keep_routing = keep_routing and return_routing
        self.handed_routing: list[torch.Tensor | None] | None = None
        self.calls = 0
        self.last: dict = {}
        self.prepared: tuple[list, dict] | None = None
        self.n_experts = n_experts
        self.step_load, self.step_load_version = None, None
        self.overlap = None        # align.overlap.Overlap when rollout.max_staleness >= 1

    def __call__(self, prompts: list, trainer) -> dict:
        if self.prepared is not None:
            ready, out = self.prepared
            self.prepared = None
            if ready != prompts:
                raise RuntimeError("the prepared rollout does not match the prompts TRL asks for")
            return self._hand(out)
        state = PartialState()
        every = gather_object(prompts) if state.num_processes > 1 else prompts
        out = [self._rollout(every, trainer)] if state.is_main_process else [None]
        if state.num_processes > 1:
            broadcast_object_list(out, from_process=0)
            start = state.process_index * len(prompts)
            return self._hand({k: v[start:start + len(prompts)] for k, v in out[0].items()})
        return self._hand(out[0])

    def _hand(self, out: dict) -> dict:
        self.handed_routing = out.pop("routing", None)
        return out

    def prepare(self, inputs: list[dict], trainer, group_filter: GroupFilter | None) -> list[dict]:
        """Sample the batch before TRL asks; returns the rows TRL scores, whose rollout the next call gives.

        With dynamic sampling the batch is filled with informative groups.  With overlap (``rollout.max_staleness``
        >= 1) its first round is the batch sampled in the background while the trainer stepped, and ``inputs``
        are kept to be sampled for the next generation batch."""
        if self.overlap is not None:
            first_rows, first_out = self.overlap.take(inputs, trainer, oversample=group_filter is not None)
        else:
            first_rows, first_out = inputs, None

        def generate(rows):
            nonlocal first_out
            if first_out is not None and rows is first_rows:
                out, first_out = first_out, None
                return out
            return self._rollout([r["prompt"] for r in rows], trainer)

        if group_filter is not None:
            def decode(completion_ids):
                texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
                return [[{"role": "assistant", "content": t}] for t in texts]

            need = len(inputs) // trainer.num_generations
            rows, out, stats = group_filter.fill(first_rows, generate, decode, need=need)
            if self.overlap is not None:
                self.overlap.keep_rate = 1.0 - stats["fresh_zero_std_frac"]
            metrics = trainer._metrics["train"]
            for key, value in stats.items():
                metrics[f"dynamic/{key}"].append(value)
        else:
            rows, out = first_rows, generate(first_rows)
        if self.overlap is not None:
            self.overlap.submit_if_due(trainer)
        self.prepared = ([r["prompt"] for r in rows], out)
        return rows

    def _rollout(self, prompts: list, trainer) -> dict:
        """Sample ``prompts`` now, with the trainer's current weights."""
        records, gen_s, sync_s = self._sample(prompts, trainer)
        return self._collect(records, trainer.state.global_step, gen_s, sync_s)

    def _sample(self, prompts: list, trainer) -> tuple[list, float, float]:
        """(records, generation seconds, sync seconds) of ``prompts`` sampled now."""
        if self.overlap is not None:
            self.overlap.settle()   # a rollout sampling in the background finishes before the backend is reused
        launch = self._launch(prompts, trainer)
        t0 = time.perf_counter()
        records = self.backend.generate(launch.groups, launch.sampling)
        gen_s = time.perf_counter() - t0
        self.timers.add("generation", gen_s)
        return records, gen_s, launch.sync_s

    def _launch(self, prompts: list, trainer) -> Launch:
        """Bring the backend to the trainer's policy version and build the prompt groups of ``prompts``."""
        g = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        if len(prompts) % g:
            raise RuntimeError(f"rollout got {len(prompts)} prompts, not a multiple of num_generations={g}")
        version = trainer.state.global_step
        sync_s = 0.0
        if self.backend.version != version:
            sync_s = self.backend.sync_weights(policy_state_dict(trainer.model_wrapped_unwrapped()), version)
            self.timers.add("sync", sync_s)
        unique = prompts[::g]
        for i, p in enumerate(unique):
            if any(q != p for q in prompts[i * g:(i + 1) * g]):
                raise RuntimeError("rollout expects each prompt repeated num_generations times in a row")
        groups = [
            PromptGroup(i, self.tokenizer.apply_chat_template(p, tokenize=True, add_generation_prompt=True,
                                                              return_dict=True)["input_ids"],
                        seed=hash((self.seed, version, self.calls, i)) & 0x7FFFFFFF)
            for i, p in enumerate(unique)
        ]
        self.calls += 1
        args = trainer.args
        sampling = Sampling(n=g, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or 0,
                            max_tokens=args.max_completion_length, stop_token_ids=[self.tokenizer.eos_token_id],
                            return_routing=self.return_routing)
        return Launch(groups, sampling, version, sync_s)

    def _collect(self, records: list, step: int, gen_s: float, sync_s: float,
                 staleness: list[int] | None = None) -> dict:
        """TRL's rollout dict from the records of a batch the trainer trains on at ``step``; logs the rollout."""
        versions = [r.policy_version for r in records]
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "policy_version": []}
        if self.keep_routing:
            out["routing"] = []
        for r in records:
            for c in r.completions:
                out["prompt_ids"].append(r.prompt_ids)
                out["completion_ids"].append(c.token_ids)
                out["logprobs"].append(c.logprobs)
                out["policy_version"].append(r.policy_version)
                if self.keep_routing:
                    out["routing"].append(_full_routing(r, c))
        load = expert_load(records, self.n_experts)
        # A step's load sums all its rollouts (dynamic sampling runs several).
        self.step_load = add_loads(self.step_load, load) if self.step_load_version == step else load
        self.step_load_version = step
        self.last = {"step": step, "policy_versions": sorted(set(versions)), "groups": len(records),
                     "completions": len(out["completion_ids"]), "generation_s": gen_s, "sync_s": sync_s,
                     "workers": _count(r.worker for r in records), "expert_load": load}
        if staleness is not None:
            self.last["staleness"] = _count(staleness)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(self.last) + "\n")
        return out


@dataclasses.dataclass
class Launch:
    """A rollout ready to run: its prompt groups and sampling, and the policy version the backend holds."""

    groups: list[PromptGroup]
    sampling: Sampling
    version: int
    sync_s: float


def _full_routing(record, completion) -> torch.Tensor | None:
    """(P + T - 1, n_moe_layers, top_k): every token the engine read for this completion."""
    if record.prompt_routing is None or completion.routing is None:
        return None
    return torch.cat([record.prompt_routing, completion.routing])


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out
