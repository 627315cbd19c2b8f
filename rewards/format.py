r"""Format reward: did the completion follow the taught output format?

* math rows (an ``answer`` column): some working, then exactly one ``\boxed{...}``, at the end
  (only whitespace, ``.``, ``$``, ``\]`` or ``\)`` may follow it);
* code rows (``tests`` or ``io_cases``): exactly one fenced code block (prose around it is fine).

Rows with none of those columns get ``None``.
"""

from __future__ import annotations

import re
from typing import Any
from collections.abc import Sequence

from rewards import as_text
from rewards.math import boxed_spans

__all__ = ["format_reward", "math_format_ok", "code_format_ok"]

_BOXED_MACRO = re.compile(r"\\(?:boxed|fbox)\b")
_AFTER_BOXED = re.compile(r"(?:\s|\.|\$|\\\]|\\\))*")
_FENCE_LINE = re.compile(r"^[ \t]*```", re.M)


def math_format_ok(text: str) -> bool:
    r"""Some working, then exactly one ``\boxed{}`` that ends the completion.

    >>> math_format_ok(r"3 + 5 = 8. 8 - 2 = 6. \boxed{6}")
    True
    >>> math_format_ok(r"\boxed{6}")  # no working
    False
    >>> math_format_ok(r"So \boxed{6}, or \boxed{7}.")
    False
    >>> math_format_ok(r"So $\boxed{6}$ because 6 is even")
    False
    """
    if len(_BOXED_MACRO.findall(text)) != 1:
        return False
    spans = boxed_spans(text)
    if len(spans) != 1:
        return False
    start, content, end = spans[0]
    working = text[:start].strip().strip("$").strip()
    return bool(working) and bool(text[content:end].strip()) and \
        _AFTER_BOXED.fullmatch(text, end + 1) is not None


def code_format_ok(text: str) -> bool:
    """Exactly one fenced code block, closed and non-empty.

    >>> code_format_ok("Here:\\n```python\\ndef f():\\n    return 1\\n```\\n")
    True
    >>> code_format_ok("def f(): return 1")
    False
    >>> code_format_ok("```python\\na = 1\\n```\\n```python\\nb = 2\\n```")
    False
    """
    fences = list(_FENCE_LINE.finditer(text))
    if len(fences) != 2:
        return False
    body_start = text.find("\n", fences[0].end())
    if body_start < 0 or body_start > fences[1].start():
        return False
    line_end = text.find("\n", fences[1].end())
    closing = text[fences[1].end() : line_end if line_end >= 0 else len(text)]
    return bool(text[body_start : fences[1].start()].strip()) and closing.strip() == ""


def _present(column: Sequence[Any] | None, i: int) -> bool:
    if column is None:
        return False
    value = column[i]
    return value is not None and not (isinstance(value, str) and not value.strip())


def format_reward(
    completions: Sequence[Any],
    answer: Sequence[Any] | None = None,
    tests: Sequence[Any] | None = None,
    io_cases: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    r"""1.0 if the completion follows its row's format (math vs code from the columns), else 0.0.

    >>> format_reward([r"2 + 2 = 4, so \boxed{4}", "```python\nprint(1)\n```", "hi"],
    ...               answer=["4", None, None], tests=[None, "assert True", None])
    [1.0, 1.0, None]
    """
    n = len(completions)
    out: list[float | None] = []
    for i in range(n):
        text = as_text(completions[i])
        if _present(answer, i):
            out.append(float(math_format_ok(text)))
        elif _present(tests, i) or _present(io_cases, i):
            out.append(float(code_format_ok(text)))
        else:
            out.append(None)
    return out
