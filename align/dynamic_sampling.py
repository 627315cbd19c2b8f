"""Dynamic sampling (DAPO, Yu et al. 2025): every training batch is filled with prompt groups that carry signal.

A group of G completions whose rewards are all equal has zero advantage everywhere, so it spends a step's compute
and moves nothing.  Before TRL scores a generation batch, :class:`GroupFilter` samples it, drops such groups, and
samples replacement prompts (drawn from a refill stream of the same distribution) until the batch is full again or
``max_rounds`` rounds have run; slots still empty then take the dropped groups back (they add no gradient, and
the batch keeps its shape).  Each step logs what happened (``dynamic/*`` metrics), including the first round's
reward on fresh prompts: the unbiased estimate of held-out reward, which the filtered batch's reward is not.

TRL has no such option; this module is what it lacks.  The rewards the filter computes are handed back to TRL
through :class:`RewardMemo`, so no completion is scored twice (a code reward runs sandboxed programs).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator

import torch


@dataclasses.dataclass
class DynamicSamplingSection:
    enabled: bool = dataclasses.field(
        default=False, metadata={"help": "drop prompt groups whose rewards are all equal and refill the batch"})
    max_rounds: int = dataclasses.field(
        default=4, metadata={"help": "generation rounds per step, the first included; the bound on retries"})
    max_oversample: float = dataclasses.field(
        default=4.0, metadata={"help": "a refill round asks for at most this many times the missing groups "
                                       "(it asks for missing / observed keep rate)"})

    def __post_init__(self):
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be at least 1, got {self.max_rounds}")
        if self.max_oversample < 1:
            raise ValueError(f"max_oversample must be at least 1, got {self.max_oversample}")


def informative(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups have rewards that differ: (n_groups,) bool from (n_groups * group_size,) rewards.

    >>> informative(torch.tensor([1., 0., 1., 1., 0., 0., float("nan"), 1.]), 2).tolist()
    [True, False, False, False]
    """
    grouped = rewards.view(-1, group_size)                              # (n_groups, G)
    missing = torch.isnan(grouped)                                      # no reward applied: TRL skips these too
    hi = grouped.masked_fill(missing, -math.inf).max(dim=1).values
    lo = grouped.masked_fill(missing, math.inf).min(dim=1).values
    return (hi - lo) > 1e-6


class RewardMemo:
    """Remembers each reward function's last results, so TRL's own scoring of the same batch is a lookup."""

    def __init__(self):
        self.saved: dict[str, tuple[str, list]] = {}

    @staticmethod
    def _key(completions, columns: dict) -> str:
        # Columns that are None on every row say nothing (TRL passes them when the dataset has them).
        return repr((completions, sorted((k, v) for k, v in columns.items()
                                         if k in ROW_COLUMNS and any(x is not None for x in v))))

    def wrap(self, fn: Callable) -> Callable:
        name = getattr(fn, "__name__", "reward")

        def reward(completions, **columns):
            key = self._key(completions, columns)
            hit = self.saved.get(name)
            if hit is not None and hit[0] == key:
                return list(hit[1])
            out = fn(completions, **columns)
            self.saved[name] = (key, list(out))
            return out

        reward.__name__ = name
        return reward


# Dataset columns a reward may read (the prompt rows of align.grpo_prompts.prompt_row).
ROW_COLUMNS = ("answer", "tests", "entry_point", "io_cases")


class GroupFilter:
    """Fills a generation batch with informative groups.

    ``generate(rows)`` samples one completion per row (rows repeat each prompt G times in a row) and returns the
    rollout dict GRPO's ``rollout_func`` returns; ``decode(completion_ids)`` gives the completions as TRL hands them to
    reward functions; ``refill`` yields fresh prompt rows.
    """

    def __init__(self, cfg: DynamicSamplingSection, reward_funcs: list[Callable], reward_weights: list[float],
                 refill: Iterator[dict], group_size: int):
        self.cfg, self.reward_funcs, self.group_size = cfg, reward_funcs, group_size
        self.weights = torch.tensor(reward_weights, dtype=torch.float32)
        self.refill = refill

    def score(self, rows: list[dict], completions: list,
              completion_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted reward sum per row, as TRL's ``sum_then_normalize`` forms it (NaN where no reward applies),
        and each function's rewards: (N,), (N, n_funcs)."""
        columns = {k: [r.get(k) for r in rows] for k in ROW_COLUMNS}
        prompts = [r["prompt"] for r in rows]
        per_func = torch.stack([
            torch.tensor([torch.nan if x is None else float(x)
                          for x in fn(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                      **columns)], dtype=torch.float32)
            for fn in self.reward_funcs], dim=1)                        # (N, n_funcs)
        total = (per_func * self.weights).nansum(dim=1)
        total[torch.isnan(per_func).all(dim=1)] = torch.nan
        return total, per_func

    def _draw(self, n_groups: int) -> list[dict]:
        return [dict(row) for row in itertools.islice(self.refill, n_groups) for _ in range(self.group_size)]

    def fill(self, rows: list[dict], generate: Callable[[list[dict]], dict],
             decode: Callable[[list[list[int]]], list], need: int | None = None) -> tuple[list[dict], dict, dict]:
        """(rows, rollout output, stats) for a full batch of ``need`` groups (default ``len(rows) // G``; the first
        round may sample more, as overlap's batch sampled ahead does)."""
        G = self.group_size
        need = len(rows) // G if need is None else need
        kept: list[tuple[list[dict], dict]] = []     # (G rows, G-row slice of the rollout output)
        spare: list[tuple[list[dict], dict]] = []
        stats = {"rounds": 0, "generated_groups": 0, "dropped_groups": 0, "refilled_groups": 0,
                 "unfilled_groups": 0}
        candidates = rows
        while candidates:
            stats["rounds"] += 1
            out = generate(candidates)
            completions = decode(out["completion_ids"])
            rewards, per_func = self.score(candidates, completions, out["completion_ids"])
            keep = informative(rewards, G)
            if stats["rounds"] == 1:   # the batch as drawn: what the policy scores on fresh prompts
                stats["fresh_reward"] = float(torch.nanmean(rewards))
                stats["fresh_zero_std_frac"] = float((~keep).float().mean())
                for fn, col in zip(self.reward_funcs, per_func.T):
                    stats[f"fresh_{getattr(fn, '__name__', 'reward')}"] = float(torch.nanmean(col))
            n_groups = len(candidates) // G
            stats["generated_groups"] += n_groups
            for j in range(n_groups):
                part = (candidates[j * G:(j + 1) * G], {k: v[j * G:(j + 1) * G] for k, v in out.items()})
                (kept if keep[j] else spare).append(part)
            stats["dropped_groups"] += int((~keep).sum())
            missing = need - len(kept)
            if missing <= 0 or stats["rounds"] >= self.cfg.max_rounds:
                break
            rate = len(kept) / stats["generated_groups"]
            ask = missing / rate if rate > 0 else missing * self.cfg.max_oversample
            ask = min(math.ceil(ask), math.ceil(missing * self.cfg.max_oversample))
            candidates = self._draw(ask)
            stats["refilled_groups"] += len(candidates) // G
        if len(kept) < need:
            stats["unfilled_groups"] = need - len(kept)
            kept += spare[:need - len(kept)]
        kept = kept[:need]
        final_rows = [r for part_rows, _ in kept for r in part_rows]
        keys = kept[0][1].keys()
        final_out = {k: [x for _, part in kept for x in part[k]] for k in keys}
        return final_rows, final_out, stats
