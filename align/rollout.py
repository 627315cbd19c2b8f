"""Rollout backends behind GRPO's ``rollout_func``: the Ray pool or one colocated engine.

Both take prompt groups and return one ``RolloutRecord`` per group, stamped with the policy version that
produced it, so the trainer code is the same whichever backend serves it.
"""

from __future__ import annotations

import logging
import time

import torch

from ray_jobs.records import Completion, PromptGroup, RolloutRecord, Sampling

log = logging.getLogger(__name__)


def run_groups(engine, groups: list[PromptGroup], sampling: Sampling, worker: str) -> list[RolloutRecord]:
    """Sample every group on ``engine``; one engine call so continuous batching sees all of them."""
    from align.engine import SamplingParams

    params = [
        SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                       max_tokens=sampling.max_tokens, stop_token_ids=list(sampling.stop_token_ids), seed=g.seed,
                       logprobs=True, return_routing=sampling.return_routing)
        for g in groups
    ]
    results = engine.generate([list(g.prompt_ids) for g in groups], params, use_tqdm=False)
    records = []
    for g, res in zip(groups, results, strict=True):
        comps = [Completion(list(o.token_ids), [float(x) for x in o.logprobs], o.finish_reason,
                            _routing(o, len(g.prompt_ids))) for o in res.outputs]
        records.append(RolloutRecord(g.group_id, list(g.prompt_ids), comps, engine.version, worker,
                                     _prompt_routing(res.outputs, len(g.prompt_ids))))
    return records


def _routing(output, prompt_len: int) -> torch.Tensor | None:
    """Experts chosen for the tokens read while generating: the last prompt token and the completion."""
    routing = getattr(output, "routing", None)
    if routing is None:
        return None
    # The engine records every token it read: (P + T - 1, n_moe_layers, top_k); the shared prompt would
    # otherwise be counted n times.
    return torch.as_tensor(routing)[prompt_len - 1:].to(torch.int16)  # (T, n_moe_layers, top_k)


def _prompt_routing(outputs, prompt_len: int) -> torch.Tensor | None:
    """Experts chosen for the prompt tokens before the last: one prefill serves the group's n samples."""
    routing = getattr(outputs[0], "routing", None) if outputs else None
    if routing is None:
        return None
    return torch.as_tensor(routing)[:prompt_len - 1].to(torch.int16)  # (P - 1, n_moe_layers, top_k)


def policy_state_dict(model) -> dict[str, torch.Tensor]:
    """The policy's weights under transformers' names, LoRA adapters merged in (the model is left unmerged)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.merge_adapter()
        try:
            sd = {}
            for k, v in model.get_base_model().state_dict().items():
                if "lora_" in k:
                    continue
                # PEFT nests wrappers (routed experts' stacked params get one per targeted tensor).
                sd[k.replace(".base_layer", "")] = v.detach().clone()
            return sd
        finally:
            model.unmerge_adapter()
    return {k: v.detach() for k, v in model.state_dict().items()}


class ColocatedRollout:
    """One engine inside the trainer process: no Ray, weights copied in place after each optimizer step."""

    def __init__(self, model, engine_options: dict):
        from align.engine import Engine

        self.engine = Engine.from_model(plain_model(model), **engine_options)
        self.version = -1
        self.last_sync_s = 0.0

    def sync_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> float:
        t0 = time.perf_counter()
        self.engine.load_weights(state_dict, version)
        self.version = version
        self.last_sync_s = time.perf_counter() - t0
        return self.last_sync_s

    def generate(self, groups: list[PromptGroup], sampling: Sampling) -> list[RolloutRecord]:
        return run_groups(self.engine, groups, sampling, worker="colocated")

    def shutdown(self) -> None:
        self.engine = None


def plain_model(model):
    """A plain transformers model the engine can read (a PeftModel becomes a merged copy)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    base = model.get_base_model()
    fresh = type(base)(base.config).to(dtype=base.dtype)
    fresh.load_state_dict(policy_state_dict(model))
    return fresh
