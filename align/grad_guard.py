"""Skip an optimizer step whose gradients hold NaN or inf, and say where they were.

Without this, one non-finite gradient reaches AdamW, every weight turns NaN, and the run goes on for hours
producing nothing (the Trainer logs ``grad_norm: nan`` and a loss of 0).  verl's actor does the same skip.  Each
skipped step appends a line to ``nonfinite_grads.jsonl`` in the run folder: the parameters whose gradients were
not finite, with the expert rows for stacked MoE weights (an ``(E, ...)`` tensor), so a kernel that writes garbage
into one expert's gradient can be told apart from a loss that blew up everywhere.  Too many skips in a row stop the
run with an error: by then the weights or the data are broken, and skipping only hides it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import weakref
from pathlib import Path

import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GradGuardSection:
    skip_nonfinite: bool = dataclasses.field(
        default=True, metadata={"help": "skip an optimizer step whose gradients hold NaN/inf (logged to "
                                        "nonfinite_grads.jsonl); false = step anyway, as the Trainer does"})
    max_consecutive: int = dataclasses.field(
        default=3, metadata={"help": "stop the run when this many steps in a row had to be skipped"})

    def __post_init__(self):
        if self.max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {self.max_consecutive}")


def all_finite(model: torch.nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())   # one device sync


class GradGuard(TrainerCallback):
    """Skips the optimizer step when any gradient is not finite; see the module docstring.

    The skip is decided on the gradients ``optimizer.step`` would use (after the all-reduce and clipping, so every
    rank decides alike).  Clipping by a NaN norm spreads the NaN to every parameter, so where it came from is taken
    earlier: a hook on each parameter notes, as backward accumulates its gradient, how many entries are not finite
    (and which experts, for an ``(E, ...)`` stack).  ``on_step(skipped: bool)`` hears about every optimizer step (the
    GRPO stage logs it as ``grad/skipped``).
    """

    def __init__(self, cfg: GradGuardSection, out: Path, on_step=None):
        self.cfg, self.path, self.on_step = cfg, Path(out) / "nonfinite_grads.jsonl", on_step
        self.skipped = self.in_a_row = 0
        self.seen: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}   # name -> (count, expert rows)
        self.handles = []

    def on_train_begin(self, args, state, control, model=None, **kw):
        if self.cfg.skip_nonfinite and model is not None and not self.handles:
            self.handles = [p.register_post_accumulate_grad_hook(self._watch(name))
                            for name, p in model.named_parameters() if p.requires_grad]

    def on_train_end(self, args, state, control, **kw):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _watch(self, name: str):
        def hook(param):
            bad = ~param.grad.isfinite()                    # the gradient accumulated so far this step
            rows = bad.flatten(1).any(dim=1) if bad.dim() == 3 else None    # (E,) for an expert stack
            self.seen[name] = (bad.sum(), rows)             # stays on the device until a step goes wrong
        return hook

    def report(self) -> list[dict]:
        """The parameters whose gradients came out of backward non-finite this step."""
        if not self.seen:
            return []
        names = list(self.seen)
        counts = torch.stack([self.seen[n][0] for n in names]).tolist()
        rows = []
        for name, count in zip(names, counts):
            if count:
                row = {"param": name, "nonfinite": int(count)}
                experts = self.seen[name][1]
                if experts is not None:
                    row["experts"] = experts.nonzero().flatten().tolist()
                rows.append(row)
        return rows

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if not self.cfg.skip_nonfinite or model is None:
            return
        ok = all_finite(model)
        if self.on_step is not None:
            self.on_step(not ok)
        if ok:
            self.in_a_row = 0
            self.seen.clear()
            return
        self.skipped += 1
        self.in_a_row += 1
        step, rows = state.global_step + 1, self.report()
        self.seen.clear()
        if state.is_world_process_zero:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, "params": rows}) + "\n")
        names = ", ".join(r["param"] for r in rows[:4]) + (f" and {len(rows) - 4} more" if len(rows) > 4 else "")
        log.warning("step %d: non-finite gradients (from backward: %s); optimizer step skipped (%d so far, see %s)",
                    step, names or "none; after the all-reduce or clipping", self.skipped, self.path)
        for p in model.parameters():
            p.grad = None                                   # AdamW leaves parameters without a gradient untouched
        if self.in_a_row >= self.cfg.max_consecutive:
            raise RuntimeError(f"{self.in_a_row} optimizer steps in a row had non-finite gradients (last at step "
                               f"{step}); stopping. Where they were: {self.path}")


def attach(trainer, cfg: GradGuardSection, out: Path) -> GradGuard:
    """Add a GradGuard to a TRL trainer; each optimizer step's skip goes into its metrics as ``grad/skipped``."""
    ref = weakref.ref(trainer)                              # the trainer holds the callback: no reference cycle
    guard = GradGuard(cfg, out, on_step=lambda skipped: ref()._metrics["train"]["grad/skipped"].append(float(skipped)))
    trainer.add_callback(guard)
    return guard
