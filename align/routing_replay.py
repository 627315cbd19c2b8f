"""Routing replay for GRPO: the trainer's forward routes each token to the experts the rollout engine chose.

The engine and the trainer run different kernels in different precisions and batch shapes, so near-tied router
scores can pick different experts; for those tokens the trainer scores a different function than the one that
sampled, and the importance ratios are wrong.  With ``moe.routing_replay: rollout`` the trainer takes the engine's
top-k ids for every token the engine read (prompt and completion) and keeps its own softmax for the gating weights
(so the router still learns).  Either way the routing mismatch is measured each step, per layer.

Alignment with TRL's batch: prompts are left-padded to P and completions right-padded, so in a row of length
S = P + C the engine's record (P_i + T_i - 1 tokens: the prompt and every completion token but the last, which is
never read) starts at column P - P_i.  The last completion token's routing changes no scored log-prob.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from align.expert_balance import MoESection, balance_loss
from align.router_hooks import RouterHooks


@dataclasses.dataclass
class MoERLSection(MoESection):
    routing_replay: Literal["off", "rollout"] = dataclasses.field(
        default="off", metadata={"help": "rollout = the trainer's forward uses the experts the rollout engine "
                                         "chose for each token (gating weights from the trainer's router)"})


def routes_tensor(rows: list[torch.Tensor | None], prompt_mask: torch.Tensor, seq_len: int, n_layers: int,
                  k: int) -> torch.Tensor:
    """(B, S, n_moe_layers, k) int16 expert ids aligned with TRL's ``cat(prompt_ids, completion_ids)``; -1 where
    the engine left no record (padding, a row without routing, the last token).

    ``rows[i]``: (P_i + T_i - 1, n_moe_layers, k) the engine's record for row i; ``prompt_mask``: (B, P) left-padded.
    """
    b, p = prompt_mask.shape
    if len(rows) != b:
        raise ValueError(f"{len(rows)} routing records for a batch of {b} rows")
    out = torch.full((b, seq_len, n_layers, k), -1, dtype=torch.int16)
    lengths = prompt_mask.sum(dim=1).tolist()
    for i, (r, p_i) in enumerate(zip(rows, lengths)):
        if r is None or not r.numel():
            continue
        if tuple(r.shape[1:]) != (n_layers, k):
            raise ValueError(f"routing record of row {i} has shape {tuple(r.shape)}, expected (*, {n_layers}, {k})")
        start = p - int(p_i)
        n = min(r.shape[0], seq_len - start)
        out[i, start:start + n] = r[:n].to(torch.int16)
    return out


class RoutingReplay:
    """The trainer's side: which routing each forward gets, the per-step mismatch and the balance term."""

    def __init__(self, cfg: MoERLSection, hooks: RouterHooks, top_k: int):
        self.cfg, self.hooks, self.top_k = cfg, hooks, top_k
        hooks.replay = cfg.routing_replay == "rollout"
        self.batch_routes: torch.Tensor | None = None   # (B, S, L, k) of the generation batch in flight
        self.balance_stats: dict[str, list[float]] = {}

    def begin_batch(self) -> None:
        self.batch_routes = None

    def generation_routes(self, rows, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          logits_to_keep: int) -> torch.Tensor | None:
        """Routes for a forward over the generation batch (old / reference log-probs), built once per batch."""
        if rows is None:
            return None
        b, s = input_ids.shape
        if self.batch_routes is None or tuple(self.batch_routes.shape[:2]) != (b, s):
            prompt_mask = attention_mask[:, :s - logits_to_keep].cpu()
            self.batch_routes = routes_tensor(rows, prompt_mask, s, self.hooks.n_layers, self.top_k)
        return self.batch_routes

    def attach(self, output: dict, rows) -> dict:
        """Put the batch's routes into TRL's output dict, so they are shuffled and split with its rows."""
        if rows is not None:
            prompt_mask = output["prompt_mask"]
            b, s = prompt_mask.shape[0], prompt_mask.shape[1] + output["completion_ids"].shape[1]
            routes = self.batch_routes
            if routes is None or tuple(routes.shape[:2]) != (b, s):
                routes = routes_tensor(rows, prompt_mask.cpu(), s, self.hooks.n_layers, self.top_k)
            output["routed_experts"] = routes
        self.batch_routes = None
        return output

    def loss_extra(self, mask: torch.Tensor) -> torch.Tensor | None:
        """The balance term of the policy forward just measured (None when off)."""
        if not self.cfg.balancing:
            return None
        loss, stats = balance_loss(self.hooks.captured, mask, self.cfg)
        self.hooks.captured = []
        for key, value in stats.items():
            self.balance_stats.setdefault(key, []).append(value)
        return loss

    def pop_metrics(self) -> dict[str, float]:
        out = {k: sum(v) / len(v) for k, v in self.balance_stats.items()}
        self.balance_stats = {}
        mismatch = self.hooks.pop_mismatch()
        if mismatch is not None:
            out["routing/mismatch"] = sum(mismatch) / len(mismatch)
            out.update({f"routing/layer{i}_mismatch": m for i, m in enumerate(mismatch)})
        return out
