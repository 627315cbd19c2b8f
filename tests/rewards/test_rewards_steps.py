"""Step reward: the share of true equations in a math completion."""

from __future__ import annotations

import pytest

from rewards.registry import get_reward
from rewards.steps import step_reward, steps_correct


@pytest.mark.parametrize(
    "text, counts",
    [
        (r"8 + 3 = 11. 11 + 5 = 16. \boxed{16}", (2, 2)),
        (r"4 + 3 = 10. 5 + 10 = 12. \boxed{18}", (0, 2)),
        (r"5 * 2 = 18. 18 - 3 = 15. \boxed{15}", (1, 2)),
        (r"(2 + 3) * 4 = 20 and 20 / 8 = 2.5", (2, 2)),
        (r"3 × 4 = 12, 12 ÷ 5 = 2", (1, 2)),
        ("2 + 3 * 4 = 14", (1, 1)),          # usual precedence
        ("7 - 9 = -2", (1, 1)),
        ("6 / 0 = 1", (0, 1)),              # division by zero is a false step
        (r"\boxed{16}", (0, 0)),             # no working
        ("I have 8 apples = many", (0, 0)),  # no operator: not an equation
    ],
)
def test_steps_correct(text, counts):
    assert steps_correct(text) == counts


def test_step_reward_scores_share_and_skips_rows_without_answer():
    completions = [r"8 * 2 = 16. 16 - 3 = 12. \boxed{12}", r"\boxed{3}", "1 + 1 = 2", "def f(): pass"]
    assert step_reward(completions, answer=["13", "3", "2", None]) == [0.5, 0.0, 1.0, None]
    assert step_reward(completions[:1]) == [None]    # no answer column at all (a code dataset)


def test_registered_under_math_steps():
    fn = get_reward("math_steps")
    conversational = [[{"role": "assistant", "content": "3 + 4 = 7. \\boxed{7}"}]]
    assert fn(conversational, answer=["7"]) == [1.0]
