"""Request parameters and results, shaped like vLLM's so users of either feel at home."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to sample the completions of one prompt.

    ``logprobs`` are always the log-probabilities of the sampled tokens under the model's raw distribution
    (``log_softmax`` of the logits, before temperature / top-k / top-p): that is what policy-gradient losses
    need, and it does not depend on how the token was picked.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    max_tokens: int = 16
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = True
    return_routing: bool = False

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingParams.n must be an int >= 1, got {self.n!r}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1, 0 (off) or a positive int, got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be an int >= 1, got {self.max_tokens!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class CompletionOutput:
    index: int  # which of the n samples
    token_ids: list[int]
    logprobs: list[float] | None  # one per token in token_ids
    finish_reason: str  # "stop" (EOS or a stop token, which is kept in token_ids) or "length"
    # Routed experts of every token the model read, i.e. the prompt and all completion tokens but the last:
    # (len(prompt) + len(token_ids) - 1, n_moe_layers, num_experts_per_tok) int32, in router order.
    routing: torch.Tensor | None = None


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
