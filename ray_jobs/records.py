"""The typed records that cross the Ray boundary between the trainer and the rollout workers.

Plain dataclasses of lists and tensors, so Ray pickles them cheaply and colocated mode uses the same types.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class PromptGroup:
    """One prompt to sample ``n`` completions for."""

    group_id: int                 # position in the trainer's batch; the pool returns groups in this order
    prompt_ids: list[int]         # (P,)
    seed: int                     # per-group seed: a re-issued group samples the same tokens


@dataclasses.dataclass(frozen=True)
class Sampling:
    n: int
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    stop_token_ids: list[int]
    return_routing: bool = False


@dataclasses.dataclass
class Completion:
    token_ids: list[int]          # (T,)
    logprobs: list[float]         # (T,) sampling log-probabilities of token_ids
    finish_reason: str            # "stop" | "length"
    routing: torch.Tensor | None = None   # (T, n_moe_layers, top_k) int16 routed-expert ids, when requested


@dataclasses.dataclass
class RolloutRecord:
    """All completions of one prompt group, stamped with the policy version that produced them."""

    group_id: int
    prompt_ids: list[int]
    completions: list[Completion]
    policy_version: int
    worker: str                   # which worker produced it (for load and fault accounting)
    prompt_routing: torch.Tensor | None = None  # (P - 1, n_moe_layers, top_k) int16 experts of the prompt tokens
                                                # before the last (shared by the group), when routing is requested
