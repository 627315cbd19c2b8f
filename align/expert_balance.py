"""DeepSeek-V2's auxiliary balance losses for routed experts (paper §2.2.3), as an optional SFT / GRPO term.

For one MoE layer over T tokens, N' routed experts and top-K' routing, with s_{i,t} the router's softmax score:

    f_i = N' / (K' T) * #{t : expert i in token t's top-K'}      P_i = (1 / T) * sum_t s_{i,t}
    expert level:  L_ExpBal = alpha_1 * sum_i f_i P_i
    device level:  experts split into D equal groups E_d (one per device),
                   f'_d = mean_{i in E_d} f_i,  P'_d = sum_{i in E_d} P_i,   L_DevBal = alpha_2 * sum_d f'_d P'_d

Both equal alpha exactly when the load is uniform and grow as it concentrates; only P carries a gradient (the
top-K' choice does not).  As in DeepSeek's reference model code, each MoE layer adds its own term, so the layers
sum.  transformers' DeepseekV2 returns router logits but computes no balance loss, and TRL's ``router_aux_loss_coef``
needs one (it reads the model's ``aux_loss``), hence this module.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class MoESection:
    expert_balance: float = dataclasses.field(
        default=0.0, metadata={"help": "alpha_1 of DeepSeek-V2's expert-level balance loss (the paper used 0.003); "
                                       "0 = off"})
    device_balance: float = dataclasses.field(
        default=0.0, metadata={"help": "alpha_2 of the device-level balance loss (the paper used 0.05); 0 = off"})
    devices: int = dataclasses.field(
        default=1, metadata={"help": "device groups the routed experts split into for the device-level loss"})

    def __post_init__(self):
        if self.expert_balance < 0 or self.device_balance < 0:
            raise ValueError("expert_balance and device_balance must be >= 0")
        if self.devices < 1:
            raise ValueError("devices must be >= 1")
        if self.device_balance > 0 and self.devices < 2:
            raise ValueError("device_balance needs devices >= 2 (with one device the term is constant)")

    @property
    def balancing(self) -> bool:
        return self.expert_balance > 0 or self.device_balance > 0


def balance_terms(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None,
                  devices: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's sum_i f_i P_i and sum_d f'_d P'_d (unweighted).

    ``logits``: (N, E) router logits; ``ids``: (N, K) experts used; ``mask``: (N,) tokens that count (None: all).
    """
    n, n_experts = logits.shape
    k = ids.shape[1]
    keep = torch.ones(n, dtype=torch.bool, device=logits.device) if mask is None else mask.reshape(-1).bool()
    if keep.shape[0] != n:
        raise ValueError(f"mask covers {keep.shape[0]} tokens, the router {n}")
    probs = logits.float().softmax(dim=-1)[keep]                          # (T, E)
    t = max(int(keep.sum()), 1)
    hits = torch.zeros(n_experts, device=logits.device).scatter_add_(
        0, ids[keep].reshape(-1), torch.ones(ids[keep].numel(), device=logits.device))  # (E,)
    f = hits * n_experts / (k * t)                                        # (E,)
    p = probs.sum(dim=0) / t                                              # (E,)
    expert = (f * p).sum()
    if n_experts % devices:
        raise ValueError(f"{n_experts} routed experts do not split into {devices} device groups")
    f_dev = f.view(devices, -1).mean(dim=1)                               # (D,)
    p_dev = p.view(devices, -1).sum(dim=1)                                # (D,)
    return expert, (f_dev * p_dev).sum()


def balance_loss(captured: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor | None,
                 cfg: MoESection) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha_1 * L_ExpBal + alpha_2 * L_DevBal summed over the captured MoE layers, and the unweighted terms'
    layer means for logging."""
    if not captured:
        raise RuntimeError("no router outputs were captured: the model has no MoE layer in this forward")
    if not captured[0][0].requires_grad and torch.is_grad_enabled():
        raise RuntimeError("router logits carry no gradient; with gradient checkpointing set "
                           "trainer.gradient_checkpointing_kwargs.use_reentrant: false")
    terms = [balance_terms(logits, ids, mask, cfg.devices) for logits, ids in captured]
    expert = torch.stack([e for e, _ in terms])                           # (n_layers,)
    device = torch.stack([d for _, d in terms])
    loss = cfg.expert_balance * expert.sum() + cfg.device_balance * device.sum()
    stats = {"moe/expert_balance": float(expert.detach().mean())}
    if cfg.device_balance > 0:
        stats["moe/device_balance"] = float(device.detach().mean())
    return loss, stats
