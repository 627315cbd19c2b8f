"""Token sampling: temperature, top-k, top-p, per-sequence seeds, raw log-probabilities.

Each sequence owns a CPU ``torch.Generator`` and draws exactly one uniform number per sampled token; the token
is found by inverting the row's CDF. Everything else is row-wise, so a sequence's tokens depend only on its
own logits and seed, never on which other sequences share the batch (or on the device's RNG).
"""

from __future__ import annotations

import torch

from .params import SamplingParams

_MASK64 = (1 << 64) - 1


def derive_seed(seed: int, index: int) -> int:
    """Well-mixed 63-bit seed for sample ``index`` of a request seeded with ``seed`` (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def make_generator(seed: int, index: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, index))
    return g


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator]) -> tuple[list[int], list[float]]:
    """(M, V) fp32 logits, one row per sequence -> sampled token ids and their raw log-probabilities."""
    m, vocab = logits.shape
    device = logits.device
    tokens = torch.empty(m, dtype=torch.long, device=device)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    rand = [i for i, p in enumerate(params) if not p.greedy]
    if greedy:
        g_idx = torch.tensor(greedy, device=device)
        tokens[g_idx] = logits[g_idx].argmax(dim=-1)
    if rand:
        r_idx = torch.tensor(rand, device=device)
        ps = [params[i] for i in rand]
        temps = torch.tensor([p.temperature for p in ps], device=device, dtype=torch.float32)
        probs = (logits[r_idx] / temps[:, None]).softmax(dim=-1)  # (M', V)
        order = None
        top_k = [p.top_k if p.top_k > 0 else vocab for p in ps]
        top_p = [p.top_p for p in ps]
        if min(top_k) < vocab or min(top_p) < 1.0:
            probs, order = probs.sort(dim=-1, descending=True)
            rank = torch.arange(vocab, device=device)
            probs = probs.masked_fill(rank[None] >= torch.tensor(top_k, device=device)[:, None], 0.0)
            # Nucleus over what top-k kept (renormalised), keeping the smallest prefix reaching top_p.
            before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
            total = probs.sum(dim=-1, keepdim=True)
            cut = torch.tensor([p if p < 1.0 else float("inf") for p in top_p], device=device)[:, None] * total
            probs = probs.masked_fill(before >= cut, 0.0)
        cdf = probs.double().cumsum(dim=-1)  # fp64: u * total stays strictly below the last step
        u = torch.stack([torch.rand((), generator=generators[i], dtype=torch.float64) for i in rand])
        target = u.to(device) * cdf[:, -1]
        pick = torch.searchsorted(cdf, target[:, None], right=True).clamp_(max=vocab - 1)  # (M', 1)
        tokens[r_idx] = (pick if order is None else order.gather(1, pick)).squeeze(1)
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens.tolist(), logprobs.tolist()
