"""Expert-load health of a DeepSeekMoE policy, read from the routing its rollouts recorded.

Each rollout completion carries the experts the engine routed each token to, (T, n_moe_layers, top_k).  Summed
over a step's rollouts this gives the tokens each routed expert took per layer; from those counts come the
numbers that show a collapsing router: the load entropy (normalised so that 1 is a uniform load and 0 all tokens
on one expert), the largest and smallest expert's share of the tokens, and max / mean (the imbalance factor).
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


def expert_load(records, n_experts: int | None = None) -> list[list[int]] | None:
    """Tokens routed to each expert, per MoE layer: (n_moe_layers, n_experts) as nested lists."""
    routes = [c.routing for r in records for c in r.completions if c.routing is not None and c.routing.numel()]
    if not routes:
        return None
    flat = torch.cat([x.long() for x in routes])                      # (T_total, L, k)
    n = max(n_experts or 0, int(flat.max()) + 1)
    counts = torch.stack([torch.bincount(flat[:, layer].flatten(), minlength=n)
                          for layer in range(flat.shape[1])])         # (L, E)
    return counts.tolist()


def add_loads(a: list[list[int]] | None, b: list[list[int]] | None) -> list[list[int]] | None:
    """Sum of two per-layer loads (either may be None; widths may differ when the top experts went unused)."""
    if a is None or b is None:
        return a or b
    out = []
    for la, lb in zip(a, b, strict=True):
        width = max(len(la), len(lb))
        out.append([(la[i] if i < len(la) else 0) + (lb[i] if i < len(lb) else 0) for i in range(width)])
    return out


def load_health(counts: list[int]) -> dict[str, float]:
    """One layer's load: normalised entropy, max and min share, imbalance (max / mean).

    >>> load_health([5, 5, 5, 5])
    {'load_entropy': 1.0, 'max_share': 0.25, 'min_share': 0.25, 'imbalance': 1.0}
    >>> load_health([8, 0, 0, 0])["load_entropy"]
    0.0
    """
    total = sum(counts)
    if total == 0 or len(counts) < 2:
        return {"load_entropy": 1.0, "max_share": 0.0, "min_share": 0.0, "imbalance": 0.0}
    shares = [c / total for c in counts]
    entropy = -sum(p * math.log(p) for p in shares if p > 0) / math.log(len(counts))
    return {"load_entropy": abs(round(entropy, 6)), "max_share": max(shares), "min_share": min(shares),
            "imbalance": max(shares) * len(counts)}


def health_metrics(load: list[list[int]], min_entropy: float = 0.0, step: int | None = None) -> dict[str, float]:
    """``experts/layer{i}_{load_entropy,max_share,min_share,imbalance}`` for a step; warns for each layer whose load
    entropy is below ``min_entropy``."""
    out = {}
    for layer, counts in enumerate(load):
        health = load_health(counts)
        out.update({f"experts/layer{layer}_{k}": v for k, v in health.items()})
        if health["load_entropy"] < min_entropy:
            log.warning("step %s: MoE layer %d's expert load entropy %.3f is below rollout.min_load_entropy %.3f "
                        "(largest expert takes %.0f%% of the tokens)", step, layer, health["load_entropy"],
                        min_entropy, 100 * health["max_share"])
    return out
