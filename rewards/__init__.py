"""Reward functions with TRL's signature: ``fn(completions, **columns) -> list[float | None]``.

``None`` means "not applicable to this row" (TRL ignores it in the weighted sum).  Recipes name
rewards by string; see :mod:`rewards.registry`.  Submodules are imported lazily so that helper
processes (the math verifier workers) start fast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["as_text", "get_reward", "combine", "REWARDS"]


def as_text(completion: Any) -> str:
    """The text of one completion, in TRL's plain or conversational form.

    >>> as_text("x = 1")
    'x = 1'
    >>> as_text([{"role": "assistant", "content": "The answer is 4."}])
    'The answer is 4.'
    >>> as_text(None)
    ''
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return as_text(completion.get("content"))
    if isinstance(completion, (list, tuple)) and all(
        isinstance(p, dict) and "role" not in p for p in completion
    ):
        # Multimodal content parts: [{"type": "text", "text": ...}, ...]
        return "".join(str(p.get("text", "")) for p in completion)
    if isinstance(completion, (list, tuple)):
        # Conversational: the answer is what the assistant said last.
        for message in reversed(completion):
            if isinstance(message, dict) and message.get("role", "assistant") == "assistant":
                return as_text(message.get("content"))
        return ""
    raise TypeError(f"completion must be str or a list of messages, got {type(completion).__name__}")


def __getattr__(name: str) -> Any:
    if name in ("get_reward", "combine", "REWARDS"):
        from rewards import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'rewards' has no attribute {name!r}")
