"""Forward hooks on the routers of transformers' DeepseekV2 that make the trainer MoE-aware.

Every ``DeepseekV2TopkRouter`` returns ``(router_logits (N, E), top-k weights (N, k), top-k ids (N, k))`` for the
N = B*S tokens of a forward, which its ``DeepseekV2Moe`` then dispatches.  A hook on each router can:

* **replay** a given routing: the experts come from ``routes`` (what the rollout engine chose), the gating weights
  from the trainer's own softmax at those experts, so the router still gets its gradient;
* **count** how often the trainer's own top-k set differs from ``routes``, per layer (the routing mismatch);
* **capture** the router logits and the experts used, for the expert-balance loss.

A hook changes nothing unless its state asks it to, so one set of hooks serves every forward of a run.
"""

from __future__ import annotations

import contextlib

import torch


def router_class():
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    return DeepseekV2TopkRouter


class RouterHooks:
    """One hook per MoE layer (numbered in model order, as the engine numbers its routing record)."""

    def __init__(self):
        self.routes: torch.Tensor | None = None     # (n_moe_layers, N, k) int64; -1 where nothing is replayed
        self.replay = False
        self.count = False
        self.capture = False
        self.captured: list[tuple[torch.Tensor, torch.Tensor]] = []   # per layer: (logits (N, E), ids (N, k))
        self.differ: torch.Tensor | None = None     # (n_moe_layers,) tokens whose expert set differs
        self.counted: torch.Tensor | None = None    # (n_moe_layers,) tokens compared
        self.n_layers = 0
        self._handles = []

    def attach(self, model) -> int:
        """Hook every router of ``model`` (a PeftModel or DDP wrapper too); returns how many MoE layers it has."""
        routers = [m for m in model.modules() if isinstance(m, router_class())]
        if self.n_layers and len(routers) != self.n_layers:
            raise ValueError(f"model has {len(routers)} MoE layers, the hooked policy {self.n_layers}")
        for layer, router in enumerate(routers):
            if getattr(router, "_align_router_hooks", None) is self:
                continue   # already hooked (a deep copy of a hooked model carries the hooks along)
            router._align_router_hooks = self
            self._handles.append(router.register_forward_hook(self._hook(layer)))
        self.n_layers = len(routers)
        return self.n_layers

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def set_routes(self, routes: torch.Tensor | None, device) -> None:
        """``routes``: (B, S, n_moe_layers, k) expert ids (-1 = the trainer routes that token itself), or None."""
        if routes is None:
            self.routes = None
            return
        b, s, n_layers, k = routes.shape
        if n_layers != self.n_layers:
            raise ValueError(f"routing record has {n_layers} MoE layers, the policy {self.n_layers}")
        self.routes = routes.to(device=device, dtype=torch.long).permute(2, 0, 1, 3).reshape(n_layers, b * s, k)

    @contextlib.contextmanager
    def measuring(self, capture: bool):
        """Count the mismatch (and capture logits for the balance loss) in the forwards inside; the backward's
        recomputation under gradient checkpointing happens outside, so it is neither counted nor captured."""
        self.count, self.capture, self.captured = True, capture, []
        try:
            yield
        finally:
            self.count, self.capture = False, False

    def pop_mismatch(self) -> list[float] | None:
        """Per MoE layer, the fraction of compared tokens whose top-k set differs (since the last pop)."""
        if self.counted is None:
            return None
        frac = (self.differ / self.counted.clamp(min=1)).tolist()
        self.differ = self.counted = None
        return frac

    def _hook(self, layer: int):
        def hook(module, args, output):
            if not isinstance(output, tuple) or len(output) != 3:
                raise RuntimeError("DeepseekV2TopkRouter returned something other than (logits, weights, ids); "
                                   "this transformers version is not supported by routing replay")
            logits, weights, ids = output
            changed = None
            if self.routes is not None:
                want = self.routes[layer]                                   # (N, k)
                if want.shape != ids.shape:
                    raise RuntimeError(f"routing record covers {want.shape[0]} tokens x {want.shape[1]} experts, "
                                       f"the forward {ids.shape[0]} x {ids.shape[1]}")
                valid = want[:, 0] >= 0                                     # (N,)
                if self.count:
                    self._count(layer, ids, want, valid)
                if self.replay:
                    ids = torch.where(valid[:, None], want, ids)
                    probs = logits.softmax(dim=-1, dtype=torch.float32)     # (N, E)
                    weights = (probs.gather(-1, ids) * module.routed_scaling_factor).to(weights.dtype)
                    changed = (logits, weights, ids)
            if self.capture:
                self.captured.append((logits, ids))
            return changed

        return hook

    @torch.no_grad()
    def _count(self, layer: int, ids: torch.Tensor, want: torch.Tensor, valid: torch.Tensor) -> None:
        differ = (ids.sort(dim=-1).values != want.sort(dim=-1).values).any(dim=-1) & valid
        if self.counted is None:
            self.differ = torch.zeros(self.n_layers, dtype=torch.long, device=ids.device)
            self.counted = torch.zeros(self.n_layers, dtype=torch.long, device=ids.device)
        self.differ[layer] += differ.sum()
        self.counted[layer] += valid.sum()
