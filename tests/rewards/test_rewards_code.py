"""Code reward on honest solutions: known-good items score 1, partial credit, extraction, data."""

from __future__ import annotations

import json
import pathlib

import pytest

from rewards.code import code_tests, extract_code, score_code

ROOT = pathlib.Path(__file__).resolve().parents[2]


def fence(code: str, lang: str = "python") -> str:
    return f"Here is my solution.\n```{lang}\n{code.strip()}\n```\nIt runs in O(n)."


# (solution, tests, entry_point): HumanEval `check(candidate)` and plain top-level asserts.
TEST_ITEMS = [
    (
        "def has_close_elements(numbers, threshold):\n"
        "    s = sorted(numbers)\n"
        "    return any(b - a < threshold for a, b in zip(s, s[1:]))\n",
        "METADATA = {'author': 'x'}\n\n"
        "def check(candidate):\n"
        "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
        "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n"
        "    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n"
        "    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 0.5) == False\n",
        "has_close_elements",
    ),
    (
        "from typing import List\n\n"
        "def separate_paren_groups(s: str) -> List[str]:\n"
        "    out, cur, depth = [], '', 0\n"
        "    for ch in s:\n"
        "        if ch == ' ':\n"
        "            continue\n"
        "        cur += ch\n"
        "        depth += 1 if ch == '(' else -1\n"
        "        if depth == 0:\n"
        "            out.append(cur)\n"
        "            cur = ''\n"
        "    return out\n",
        "def check(candidate):\n"
        "    assert candidate('(()()) ((())) () ((())()())') == ['(()())', '((()))', '()', '((())()())']\n"
        "    assert candidate('() (()) ((())) (((())))') == ['()', '(())', '((()))', '(((())))']\n"
        "    assert candidate('( ) (( )) (( )( ))') == ['()', '(())', '(()())']\n",
        "separate_paren_groups",
    ),
    (
        "import math\n\n"
        "def hypot(a, b):\n"
        "    return math.sqrt(a * a + b * b)\n",
        "import math\n\n"
        "def check(candidate):\n"
        "    assert math.isclose(candidate(3, 4), 5.0)\n"
        "    for a in range(1, 20):\n"
        "        assert abs(candidate(a, 0) - a) < 1e-9\n"
        "    try:\n"
        "        candidate('x', 1)\n"
        "        assert False, 'expected a TypeError'\n"
        "    except TypeError:\n"
        "        pass\n",
        "hypot",
    ),
    (
        "def encode_shift(s):\n"
        "    return ''.join(chr((ord(c) - 97 + 5) % 26 + 97) for c in s)\n\n"
        "def decode_shift(s):\n"
        "    return ''.join(chr((ord(c) - 97 - 5) % 26 + 97) for c in s)\n",
        "def check(candidate):\n"
        "    for word in ['abc', 'hello', 'zzz', '']:\n"
        "        assert candidate(encode_shift(word)) == word\n"
        "check(decode_shift)\n",  # calls check itself: must not run twice
        "decode_shift",
    ),
    (
        "def add(a, b):\n    return a + b\n",
        "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(100, 5) == 105\n",
        "add",
    ),
    (
        "def word_counts(text):\n"
        "    counts = {}\n"
        "    for w in text.split():\n"
        "        counts[w] = counts.get(w, 0) + 1\n"
        "    return counts\n",
        "assert word_counts('a b a') == {'a': 2, 'b': 1}\n"
        "assert word_counts('') == {}\n"
        "assert sorted(word_counts('x y z')) == ['x', 'y', 'z']\n",
        "word_counts",
    ),
    (
        "def primes(n):\n"
        "    sieve = [True] * (n + 1)\n"
        "    out = []\n"
        "    for i in range(2, n + 1):\n"
        "        if sieve[i]:\n"
        "            out.append(i)\n"
        "            for j in range(i * i, n + 1, i):\n"
        "                sieve[j] = False\n"
        "    return tuple(out)\n",
        "assert primes(10) == (2, 3, 5, 7)\nassert primes(1) == ()\nassert len(primes(1000)) == 168\n",
        "primes",
    ),
]

IO_ITEMS = [
    (
        "a, b = map(int, input().split())\nprint(a + b)\n",
        [{"stdin": "1 2\n", "stdout": "3\n"}, {"stdin": "-5 5", "stdout": "0"},
         {"stdin": "100 5\n", "stdout": "105\n"}],
    ),
    (
        "import sys\n"
        "lines = sys.stdin.read().split('\\n')\n"
        "n = int(lines[0])\n"
        "for line in lines[1:n + 1]:\n"
        "    print(line[::-1])\n",
        [{"stdin": "2\nabc\nxy\n", "stdout": "cba\nyx\n"}, {"stdin": "1\nracecar", "stdout": "racecar"}],
    ),
    (
        "n = int(input())\nfor i in range(1, n + 1):\n    print(*range(1, i + 1))\n",
        # whitespace-normalised comparison: trailing blanks and blank lines do not matter
        [{"stdin": "3\n", "stdout": "1\n1 2\n1  2 3   \n\n"}],
    ),
]


def test_known_good_solutions_score_one_in_both_modes():
    completions = [fence(s) for s, _, _ in TEST_ITEMS] + [fence(s) for s, _ in IO_ITEMS]
    tests = [t for _, t, _ in TEST_ITEMS] + [None] * len(IO_ITEMS)
    entry = [e for _, _, e in TEST_ITEMS] + [None] * len(IO_ITEMS)
    io = [None] * len(TEST_ITEMS) + [c for _, c in IO_ITEMS]
    for mode in ("fraction", "all"):
        scores = code_tests(completions, tests=tests, entry_point=entry, io_cases=io, mode=mode)
        assert scores == [1.0] * len(completions), mode


def test_check_that_calls_itself_runs_once():
    sol, tests, ep = TEST_ITEMS[3]
    r = score_code(fence(sol), tests, ep)
    assert (r.score, r.detail, r.passed, r.total) == (1.0, "done", 4, 4)


def test_partial_credit_and_all_or_nothing():
    half = fence("def add(a, b):\n    return a + b if a < 50 else 0\n")
    tests = "def check(candidate):\n" + "".join(
        f"    assert candidate({a}, 1) == {a + 1}\n" for a in (1, 2, 60, 70))
    assert code_tests([half], tests=[tests], entry_point=["add"]) == [0.5]
    assert code_tests([half], tests=[tests], entry_point=["add"], mode="all") == [0.0]
    io = [[{"stdin": "1", "stdout": "1"}, {"stdin": "2", "stdout": "2"}, {"stdin": "3", "stdout": "x"}]]
    echo = "print(input())"
    assert code_tests([echo], io_cases=io) == [pytest.approx(2 / 3)]
    assert code_tests([echo], io_cases=io, mode="all") == [0.0]


def test_exception_outside_an_assert_aborts_with_partial_credit():
    sol = fence("def f(x):\n    if x > 1:\n        raise ValueError\n    return x\n")
    tests = "def check(candidate):\n    assert candidate(1) == 1\n    y = candidate(2)\n    assert y == 2\n"
    r = score_code(sol, tests, "f")
    assert (r.score, r.detail, r.passed, r.total) == (0.5, "aborted", 1, 2)


def test_rows_without_tests_are_none_and_bad_rows_zero():
    scores = code_tests(
        ["print(1)", "", "```bash\nls\n```", "def f(:\n", fence("def g(): return 1")],
        tests=[None, "assert f() == 1", "assert f() == 1", "assert f() == 1", "assert f() == 1"],
        entry_point=[None, "f", "f", "f", "f"],
    )
    assert scores == [None, 0.0, 0.0, 0.0, 0.0]
    assert code_tests(["x"], io_cases=[[]]) == [None]
    assert code_tests(["print(3)"], io_cases=[json.dumps([{"stdin": "", "stdout": "3"}])]) == [1.0]


def test_conversational_completions():
    conv = [[{"role": "assistant", "content": fence("def add(a, b):\n    return a + b")}]]
    assert code_tests(conv, tests=["assert add(2, 2) == 4"], entry_point=["add"]) == [1.0]


def test_column_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="tests"):
        code_tests(["a", "b"], tests=["assert True"])
    with pytest.raises(ValueError, match="mode"):
        code_tests(["a"], tests=["assert True"], mode="most")


def test_extract_code():
    two = "```python\nfirst = 1\n```\ntext\n```py\nsecond = 2\n```"
    assert extract_code(two) == "second = 2\n"
    assert extract_code(two, block="first") == "first = 1\n"
    assert extract_code("```\nuntagged()\n```") == "untagged()\n"
    assert extract_code("```python\ntruncated = True\n") == "truncated = True\n"  # hit max_tokens
    assert extract_code("```cpp\nint main(){}\n```") == ""
    assert extract_code("x = 1") == "x = 1"
    with pytest.raises(ValueError):
        extract_code("x", block="middle")


def _rows(path: pathlib.Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("split", [pytest.param("train", marks=pytest.mark.slow), "heldout"])
def test_shipped_reference_solutions_score_one(split):
    path = ROOT / "data" / "code" / f"{split}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not generated")
    rows = [r for r in _rows(path) if r.get("solution")]
    if not rows:
        pytest.skip(f"{path} has no reference solutions")
    scores = code_tests(
        [r["solution"] for r in rows],
        tests=[r.get("tests") for r in rows],
        entry_point=[r.get("entry_point") for r in rows],
        io_cases=[r.get("io_cases") for r in rows],
        mode="all",
        timeout_s=10.0,
    )
    bad = [(k, r["prompt"][:60]) for k, (r, s) in enumerate(zip(rows, scores)) if s != 1.0]
    assert not bad, f"{len(bad)} of {len(rows)} reference solutions failed, e.g. {bad[:5]}"


def test_called_the_way_trl_calls_it():
    logged = {}
    scores = code_tests(
        prompts=["p"], completions=["```python\nwhile True:\n    pass\n```"], completion_ids=[[1, 2]],
        tests=["assert f() == 1"], entry_point=["f"], trainer_state=None,
        log_extra=lambda column, values: None, log_metric=logged.__setitem__, timeout_s=1.0)
    assert scores == [0.0]
    assert logged == {"code_tests/timeout_frac": 1.0}


def test_tests_may_use_the_solutions_imports_and_helpers():
    sol = ("import math as m\nimport os.path\n\n"
           "def helper(x):\n    return x * 2\n\n"
           "def f(x):\n    return m.sqrt(helper(x))\n")
    tests = "assert f(8) == m.sqrt(16)\nassert helper(2) == 4\nassert os.path.join('a', 'b') == 'a/b'\n"
    r = score_code(sol, tests, "f")
    assert (r.score, r.detail, r.passed) == (1.0, "done", 3)


def test_collections_results_are_accepted():
    sol = ("from collections import Counter, OrderedDict, deque\n"
           "def f(s):\n    return Counter(s), deque([1]), OrderedDict(a=1)\n")
    tests = "from collections import deque\nassert f('aab') == ({'a': 2, 'b': 1}, deque([1]), {'a': 1})\n"
    assert score_code(sol, tests, "f").score == 1.0
