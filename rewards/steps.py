r"""Step reward for math working: the share of written equations whose arithmetic holds.

A completion such as ``8 * 2 = 16. 16 - 3 = 12. \boxed{12}`` states two equations; the first is true, the
second is not, so it scores 0.5. The final-answer reward gives every wrong answer the same 0, so a group of
all-wrong completions carries no signal; this reward still ranks them by how much of their working is right,
which is where a small model's mistakes are (a wrong product, a slipped digit).

An equation is ``<expression> = <number>`` where the expression holds numbers, ``+ - * / × ÷ x`` and
parentheses, with at least one operator. Completions that state no equation score 0. Rows without an
``answer`` column (code, chat) get ``None``.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Sequence
from typing import Any

from rewards import as_text

__all__ = ["equations", "step_reward", "steps_correct"]

_NUM = r"\d+(?:\.\d+)?"
_EQUATION = re.compile(rf"((?:[(\s]*{_NUM}[)\s]*[-+*/×÷x])+[(\s]*{_NUM}[)\s]*)=\s*(-?{_NUM})")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand)
    raise ValueError("not arithmetic")


def equations(text: str) -> list[tuple[str, float]]:
    """``(expression, stated value)`` for every equation written in ``text``.

    >>> equations("3 * 6 = 18. 18 + 1 = 19. \\boxed{19}")
    [('3 * 6', 18.0), ('18 + 1', 19.0)]
    """
    return [(m.group(1).strip(), float(m.group(2))) for m in _EQUATION.finditer(text)]


def steps_correct(text: str) -> tuple[int, int]:
    """(true equations, equations) in ``text``; an expression that cannot be evaluated counts as false.

    >>> steps_correct("5 * 2 = 18. 18 - 3 = 15. \\boxed{15}")
    (1, 2)
    >>> steps_correct("6 ÷ 0 = 1")
    (0, 1)
    """
    found = equations(text)
    good = 0
    for expr, value in found:
        src = expr.replace("×", "*").replace("÷", "/").replace("x", "*")
        try:
            good += abs(_eval(ast.parse(src, mode="eval")) - value) <= 1e-9 * max(1.0, abs(value))
        except (ValueError, SyntaxError, ZeroDivisionError, RecursionError):
            pass
    return good, len(found)


def step_reward(completions: Sequence[Any], answer: Sequence[Any] | None = None,
                **_: Any) -> list[float | None]:
    """Share of true equations per completion (0 when none is written); ``None`` for rows without ``answer``."""
    out: list[float | None] = []
    for i, completion in enumerate(completions):
        if answer is None or answer[i] is None:
            out.append(None)
            continue
        good, total = steps_correct(as_text(completion))
        out.append(good / total if total else 0.0)
    return out
