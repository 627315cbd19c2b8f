"""Format reward, the registry, and the modules' doctests."""

from __future__ import annotations

import doctest
import importlib
import sys
import types

import pytest

from rewards import as_text
from rewards.format import code_format_ok, format_reward, math_format_ok
from rewards.registry import REWARDS, combine, get_reward


@pytest.mark.parametrize(
    "text, ok",
    [
        (r"3 + 5 = 8. 8 - 2 = 6. \boxed{6}", True),
        (r"3 + 5 = 8, so the answer is $\boxed{8}$.", True),
        ("We get \\[ \\boxed{\\frac{1}{2}} \\]", True),
        (r"\boxed{6}", False),  # no working
        (r"$\boxed{6}$", False),
        (r"3 + 3 = 6. \boxed{6} Let me double-check: yes.", False),  # not at the end
        (r"3 + 3 = 6. \boxed{6} \boxed{6}", False),  # two boxes
        (r"3 + 3 = 6. \boxed{}", False),  # empty
        (r"3 + 3 = 6. \boxed{6", False),  # unclosed
        ("3 + 3 = 6. #### 6", False),
        ("no answer at all", False),
    ],
)
def test_math_format(text, ok):
    assert math_format_ok(text) is ok


@pytest.mark.parametrize(
    "text, ok",
    [
        ("```python\nprint(1)\n```", True),
        ("Plan first.\n```python\ndef f():\n    return 1\n```\nThat is all.", True),
        ("```\nprint(1)\n```", True),
        ("print(1)", False),
        ("```python\nprint(1)\n```\n```python\nprint(2)\n```", False),
        ("```python\nprint(1)\n", False),  # unclosed
        ("```python\n\n```", False),  # empty
        ("```python\nprint(1)\n``` trailing", False),
    ],
)
def test_code_format(text, ok):
    assert code_format_ok(text) is ok


def test_format_reward_picks_math_or_code_per_row():
    completions = [r"1 + 1 = 2. \boxed{2}", "```python\nprint(2)\n```", r"\boxed{2}", "text", "x"]
    got = format_reward(
        completions,
        answer=["2", None, None, "2", None],
        tests=[None, "assert True", None, None, None],
        io_cases=[None, None, [{"stdin": "", "stdout": "2"}], None, None],
    )
    assert got == [1.0, 1.0, 0.0, 0.0, None]
    conv = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": r"2 = 2. \boxed{2}"}]]
    assert format_reward(conv, answer=["2"]) == [1.0]


def test_as_text_forms():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert as_text([{"role": "assistant", "content": parts}]) == "ab"
    with pytest.raises(TypeError):
        as_text(3)


def test_registry_names_options_and_errors():
    assert set(REWARDS) >= {"math_accuracy", "code_tests", "format"}
    fn = get_reward("code_tests", mode="all", timeout_s=3)
    assert fn.__name__ == "code_tests" and fn.options == {"mode": "all", "timeout_s": 3}
    assert fn(["```python\ndef f():\n    return 1\n```"], tests=["assert f() == 1"], entry_point=["f"]) == [1.0]
    with pytest.raises(ValueError, match="known rewards: code_tests, format, math_accuracy, math_steps, learned:<path>"):
        get_reward("accuracy")
    with pytest.raises(ValueError, match="mode"):
        get_reward("code_tests", mode="most")
    with pytest.raises(ValueError, match="no option"):
        get_reward("math_accuracy", temperature=1.0)
    with pytest.raises(ValueError, match="positive"):
        get_reward("code_tests", timeout_s=-1)
    with pytest.raises(ValueError, match="true/false"):
        get_reward("math_accuracy", last_number_fallback="yes")


def test_combine_weights_and_unique_names():
    funcs, weights = combine([
        {"name": "math_accuracy", "weight": 1.0},
        {"name": "code_tests", "weight": 0.5, "mode": "fraction"},
        {"name": "code_tests", "weight": 0.5, "mode": "all"},
        {"name": "format", "weight": 0.1},
    ])
    assert [f.__name__ for f in funcs] == ["math_accuracy", "code_tests", "code_tests_2", "format"]
    assert weights == [1.0, 0.5, 0.5, 0.1]
    assert funcs[0]([r"2 \boxed{4}"], answer=["4"]) == [1.0]
    with pytest.raises(ValueError, match=r"rewards\[1\]"):
        combine([{"name": "format"}, {"name": "nope"}])
    with pytest.raises(ValueError, match="weight"):
        combine([{"name": "format", "weight": "high"}])
    with pytest.raises(ValueError, match="name"):
        combine([{"weight": 1.0}])
    with pytest.raises(ValueError):
        combine([])


def test_learned_rewards_resolve_lazily(monkeypatch):
    with pytest.raises(ValueError, match="needs a path"):
        get_reward("learned:")
    calls = []

    def load_reward_fn(path, **options):
        calls.append((path, options))
        return lambda completions, **kw: [0.5] * len(completions)

    module = types.ModuleType("rewards.learned")
    module.load_reward_fn = load_reward_fn
    monkeypatch.setitem(sys.modules, "rewards.learned", module)
    fn = get_reward("learned:outputs/rm-math", batch_size=4)
    assert calls == [("outputs/rm-math", {"batch_size": 4})]
    assert fn.__name__ == "learned_rm-math"
    assert fn(["a", "b"]) == [0.5, 0.5]


@pytest.mark.parametrize("module", ["rewards", "rewards.math", "rewards.code", "rewards.sandbox",
                                    "rewards.format", "rewards.registry", "rewards.steps"])
def test_doctests(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
