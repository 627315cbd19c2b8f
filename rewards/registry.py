"""Rewards by name, for recipes.

A recipe lists reward specs ``{"name": ..., "weight": ..., **options}``; :func:`combine` turns them
into the ``reward_funcs`` list and the ``reward_weights`` TRL's ``GRPOTrainer``/``GRPOConfig`` take.

Names: ``math_accuracy``, ``math_steps``, ``code_tests``, ``format``, and ``learned:<path>`` (a learned reward
model, loaded by ``rewards.learned.load_reward_fn(path, **options)`` on first use).

>>> fn = get_reward("code_tests", mode="all")
>>> fn.__name__
'code_tests'
>>> funcs, weights = combine([{"name": "math_accuracy"}, {"name": "format", "weight": 0.1}])
>>> [f.__name__ for f in funcs], weights
(['math_accuracy', 'format'], [1.0, 0.1])
"""

from __future__ import annotations

import inspect
import os
from typing import Any
from collections.abc import Callable

from rewards.code import MODES, code_tests
from rewards.format import format_reward
from rewards.math import math_accuracy
from rewards.steps import step_reward

__all__ = ["REWARDS", "get_reward", "combine", "RewardFn"]

RewardFn = Callable[..., list]

REWARDS: dict[str, RewardFn] = {
    "math_accuracy": math_accuracy,
    "code_tests": code_tests,
    "format": format_reward,
    "math_steps": step_reward,
}
LEARNED_PREFIX = "learned:"


def _options_of(fn: RewardFn) -> dict[str, inspect.Parameter]:
    # Recipe options are the keyword-only parameters; positional ones are dataset columns.
    return {n: p for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}


def _check_options(name: str, fn: RewardFn, options: dict[str, Any]) -> None:
    accepted = _options_of(fn)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"reward {name!r} has no option(s) {unknown}; accepted: {sorted(accepted)}")
    for key, value in options.items():
        default = accepted[key].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"reward {name!r} option {key!r} must be true/false, got {value!r}")
        if key.endswith("_s") or key.endswith("_mb") or key == "max_workers":
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or value <= 0):
                raise ValueError(f"reward {name!r} option {key!r} must be a positive number, got {value!r}")
    if name == "code_tests" and options.get("mode", "fraction") not in MODES:
        raise ValueError(f"reward 'code_tests' option 'mode' must be one of {MODES}, got {options['mode']!r}")
    if name == "code_tests" and options.get("block", "last") not in ("first", "last"):
        raise ValueError(f"reward 'code_tests' option 'block' must be 'first' or 'last', got {options['block']!r}")


def _named(fn: RewardFn, name: str, options: dict[str, Any]) -> RewardFn:
    # A fresh function per call: TRL names metrics after __name__, and combine() may rename it.
    def reward(completions, **columns):
        return fn(completions, **{**columns, **options})

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = fn.__doc__
    reward.__wrapped__ = fn  # type: ignore[attr-defined]
    reward.options = dict(options)  # type: ignore[attr-defined]
    return reward


def get_reward(name: str, **options: Any) -> RewardFn:
    """The reward function called ``name``, with ``options`` bound (checked now, not mid-training)."""
    if not isinstance(name, str):
        raise ValueError(f"reward name must be a string, got {name!r}")
    if name.startswith(LEARNED_PREFIX):
        path = name[len(LEARNED_PREFIX):]
        if not path:
            raise ValueError("reward 'learned:' needs a path, e.g. 'learned:outputs/rm-math'")
        try:
            from rewards.learned import load_reward_fn
        except ImportError as exc:
            raise ValueError(f"reward {name!r}: learned rewards are unavailable ({exc})") from exc
        try:
            fn = load_reward_fn(path, **options)
        except OSError as exc:   # a missing or unreadable model folder is a recipe error, not a crash
            raise ValueError(f"reward {name!r}: cannot load the reward model: {exc}") from exc
        stem = os.path.basename(os.path.normpath(path)) or "model"
        label = getattr(fn, "__name__", None)
        return _named(fn, label if label and label != "<lambda>" else f"learned_{stem}", {})
    if name not in REWARDS:
        known = sorted(REWARDS) + [LEARNED_PREFIX + "<path>"]
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(known)}")
    fn = REWARDS[name]
    _check_options(name, fn, options)
    return _named(fn, name, options)


def combine(specs: list[dict[str, Any]]) -> tuple[list[RewardFn], list[float]]:
    """``[{"name", "weight", **options}, ...]`` -> (reward functions, weights), names unique."""
    if not isinstance(specs, (list, tuple)) or not specs:
        raise ValueError("rewards must be a non-empty list of {name, weight, ...options} entries")
    funcs: list[RewardFn] = []
    weights: list[float] = []
    seen: dict[str, int] = {}
    for k, spec in enumerate(specs):
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"rewards[{k}] must be a mapping with a 'name' key, got {spec!r}")
        options = dict(spec)
        name = options.pop("name")
        weight = options.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"rewards[{k}] ({name!r}): weight must be a number, got {weight!r}")
        try:
            fn = get_reward(name, **options)
        except ValueError as exc:
            raise ValueError(f"rewards[{k}]: {exc}") from None
        base = fn.__name__
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:  # same reward twice (e.g. two modes): keep metric names apart
            fn.__name__ = fn.__qualname__ = f"{base}_{seen[base]}"
        funcs.append(fn)
        weights.append(float(weight))
    return funcs, weights
