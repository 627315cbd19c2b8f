"""Math reward: extraction, an equivalence table, hostile inputs under a time bound."""

from __future__ import annotations

import json
import pathlib
import threading
import time

import pytest

from rewards import math as rmath
from rewards.math import extract_answer, math_accuracy, verify

ROOT = pathlib.Path(__file__).resolve().parents[2]


def B(answer: str) -> str:
    return "We compute carefully. \\boxed{%s}" % answer


# (completion, gold, equivalent?)
CASES = [
    # fractions
    (B(r"\frac{1}{2}"), "1/2", True),
    (B("0.5"), r"\frac{1}{2}", True),
    (B(r"\dfrac{3}{4}"), "0.75", True),
    (B("2/4"), "1/2", True),
    (B(r"-\frac{1}{2}"), "-0.5", True),
    (B(r"\frac{10}{2}"), "5", True),
    (B(r"\frac{1}{2}x"), r"\frac{x}{2}", True),
    (B(r"\frac{2}{3}"), "0.67", False),
    (B(r"\frac{1}{3}"), "0.3333", False),
    (B(r"\frac{1}{2}"), "-1/2", False),
    (B(r"\frac{1}{2}"), r"\frac{1}{3}", False),
    # decimals and integers
    (B("3.0"), "3", True),
    (B("3.14"), "3.14", True),
    (B("0.1+0.2"), "0.3", True),
    (B("1,000"), "1000", True),
    (B("1{,}000"), "1000", True),
    (B("12.5"), "12.50", True),
    (B("5"), "5.0", True),
    (B("42"), "42", True),
    (B("-7"), "-7", True),
    (B("007"), "7", True),
    (B("+5"), "5", True),
    (B("2+3"), "5", True),
    (B("41"), "42", False),
    (B("43"), "42", False),
    (B("420"), "42", False),
    (B("-42"), "42", False),
    (B("42.01"), "42", False),
    (B("1.000001"), "1", False),
    (B("1/0"), "1", False),
    # where the answer is found
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72", True),
    ("Adding them up, the answer is 15.", "15", True),
    ("So the answer is $\\frac{3}{4}$.", "0.75", True),
    ("3 + 5 = 8. 8 - 2 = 6", "6", True),
    ("So the total is $\\boxed{5}$.", "5", True),
    (r"First \boxed{6}. Checking again: \boxed{ 6 }", "6", True),
    (r"It is \boxed{6}, or maybe \boxed{7}", "6", False),  # hedging
    ("I don't know.", "42", False),
    ("", "42", False),
    # LaTeX and algebra
    (B(r"\sqrt{2}"), r"\sqrt{2}", True),
    (B(r"\sqrt{8}"), r"2\sqrt{2}", True),
    (B(r"\frac{\sqrt{3}}{2}"), r"\frac{\sqrt3}{2}", True),
    (B(r"\pi"), r"\pi", True),
    (B(r"\cos(\pi)"), "-1", True),
    (B(r"\log_2 8"), "3", True),
    (B("2^{10}"), "1024", True),
    (B("10!"), "3628800", True),
    (B(r"\binom{5}{2}"), "10", True),
    (B("x^2+2x+1"), "(x+1)^2", True),
    (B("x=5"), "5", True),
    (B("y = 2x+1"), "2x+1", True),
    (B(r"\infty"), r"\infty", True),
    (B(r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"), r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", True),
    (B(r"2\pi"), r"\pi", False),
    (B("x^2+1"), "(x+1)^2", False),
    (B("2x"), "x", False),
    (B("3.14"), r"\pi", False),  # close, not equal
    (B("3.1416"), r"\pi", False),
    (B(r"\sqrt{2}"), "1.414", False),
    (B("0.33"), "1/3", False),
    # units and percent
    (B(r"50\%"), "50", True),
    (B(r"50\%"), "0.5", True),
    (B(r"10\text{ cm}"), "10", True),
    (B(r"10 \text{ dollars}"), "10", True),
    (B(r"\$10"), "10", True),
    (B(r"90^\circ"), "90", True),
    (B(r"25\%"), "50", False),
    (B(r"11\text{ cm}"), "10", False),
    # sets, tuples, intervals
    (B(r"\{1,2,3\}"), r"\{3,2,1\}", True),
    (B("(1, 2)"), "(1,2)", True),
    (B("[1, 2)"), "[1,2)", True),
    (B(r"(-\infty, 3)"), r"(-\infty,3)", True),
    (B(r"[0, \infty)"), r"[0,\infty)", True),
    (B(r"(0,1)\cup(2,3)"), r"(0,1)\cup(2,3)", True),
    (B(r"\{1,2\}"), r"\{1,2,3\}", False),
    (B("(2, 1)"), "(1,2)", False),
    (B("(1, 2]"), "[1,2)", False),
    (B(r"(0,1)\cup(2,4)"), r"(0,1)\cup(2,3)", False),
]


def test_equivalence_table():
    assert len(CASES) >= 60
    assert sum(e for *_, e in CASES) >= 25 and sum(not e for *_, e in CASES) >= 25
    got = math_accuracy([c for c, _, _ in CASES], answer=[g for _, g, _ in CASES])
    wrong = [(extract_answer(c), g, e, r) for (c, g, e), r in zip(CASES, got) if r != float(e)]
    assert not wrong, "answer, gold, expected, got:\n" + "\n".join(map(repr, wrong))


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{a{b{c}}d}", "a{b{c}}d"),
        (r"\fbox{7}", "7"),
        (r"\boxed {7}", "7"),
        (r"$\boxed{7}$.", "7"),
        (r"\boxed{\boxed{7}}", r"\boxed{7}"),  # outermost only
        ("#### 1,234", "1,234"),
        ("The answer is: $12$.", "12"),
        # "answer is" (any case) is looked for before the last-number fallback
        ("The Answer Is 12\nbut later 13", "12"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_none_and_fallback():
    assert extract_answer("no digits here") is None
    assert extract_answer(r"\boxed{1} \boxed{2}") is None
    assert extract_answer("the value 3 then 4", last_number_fallback=False) is None
    assert extract_answer(r"\boxed{unclosed 5") == "5"  # falls back to the last number


def test_conversational_and_none_rows():
    conv = [[{"role": "assistant", "content": r"so \boxed{4}"}], [{"role": "assistant", "content": "5"}]]
    assert math_accuracy(conv, answer=["4", "4"]) == [1.0, 0.0]
    assert math_accuracy(["1", "2"]) == [None, None]
    assert math_accuracy([r"\boxed{1}", r"\boxed{1}"], answer=[None, ""]) == [None, None]


def test_unparseable_gold_is_none_not_zero():
    assert math_accuracy([r"\boxed{4}", "no answer", r"\boxed{???}"], answer=["???", "???", "???"]) == [
        None, None, None]
    assert verify(r"\boxed{4}", "???") is False


def test_column_length_mismatch():
    with pytest.raises(ValueError, match="answer"):
        math_accuracy(["1", "2"], answer=["1"])


def test_integer_fast_path_needs_no_worker(monkeypatch):
    def no_pool():
        raise AssertionError("the integer fast path must not start a worker")

    monkeypatch.setattr(rmath, "_get_pool", no_pool)
    got = math_accuracy([r"x \boxed{12}", "#### 0012", r"\boxed{-3}", "no", r"\boxed{5}"] * 13,
                        answer=["12", "12", "3", "7", "+5"] * 13)
    assert got == [1.0, 1.0, 0.0, 0.0, 1.0] * 13


def test_verify_from_threads_concurrently():
    results = {}

    def work(k):
        results[k] = verify(r"\boxed{\frac{%d}{2}}" % (2 * k), str(k))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {k: True for k in range(1, 9)}


# Every hostile input must come back within this bound (timeout + one worker restart on a
# loaded 2-core machine), called from a thread that is not the main thread.
HOSTILE_TIMEOUT_S = 2.0
HOSTILE_BOUND_S = HOSTILE_TIMEOUT_S + 12.0
HOSTILE = [
    (r"\boxed{9^9^9^9}", "1"),
    (r"\boxed{9^{9^{9^{9}}}}", "1"),
    (r"\boxed{(10^{10^{10}})!}", "3"),
    (r"\boxed{\sum_{n=1}^{10^{12}} n}", "5"),
    (r"\boxed{2^{2^{40}}}", r"2^{2^{40}}+1"),
    (r"\boxed{e^{e^{e^{100}}}}", "4"),
    ("x" * 1_000_000, "1/2"),
    (r"\boxed{" * 200_000, "1/2"),
    ("{" * 300_000 + "}" * 300_000 + r"\boxed{1/2}", "0.5"),
    (r"\boxed{" + "1" * 999 + "}", "1" * 999 + "0"),
    (r"\boxed{" + "(" * 500 + "1" + ")" * 500 + "}", "1/2"),
    (r"\boxed{1/2}", "9^{9^{9^{9}}}"),
]


def _in_thread(fn, *args, **kwargs):
    box = {}

    def run():
        box["value"] = fn(*args, **kwargs)
        box["main"] = threading.current_thread() is threading.main_thread()

    t = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    t.start()
    t.join(HOSTILE_BOUND_S + 30)
    assert not t.is_alive(), "verifier hung"
    assert box["main"] is False
    return box["value"], time.monotonic() - start


@pytest.mark.parametrize("pred, gold", HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile_inputs_are_bounded(pred, gold):
    value, elapsed = _in_thread(verify, pred, gold, timeout_s=HOSTILE_TIMEOUT_S)
    assert elapsed < HOSTILE_BOUND_S, f"took {elapsed:.1f}s"
    if gold == "0.5":
        assert value is True  # deep plain braces do not hide the final boxed answer
    else:
        assert value is False


def test_hostile_batch_then_normal_batch():
    preds = [p for p, _ in HOSTILE[:6]] + [r"\boxed{\frac{1}{2}}"] * 4
    golds = [g for _, g in HOSTILE[:6]] + ["0.5"] * 4
    value, elapsed = _in_thread(math_accuracy, preds, answer=golds, timeout_s=HOSTILE_TIMEOUT_S,
                                batch_timeout_s=40.0)
    assert elapsed < 40.0 + 5
    assert value == [0.0] * 6 + [1.0] * 4
    # Killed workers were replaced: ordinary work still goes through.
    value, elapsed = _in_thread(math_accuracy, [r"\boxed{0.25}", r"\boxed{x+x}"], answer=["1/4", "2x"])
    assert value == [1.0, 1.0]


def _rows(path: pathlib.Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_shipped_math_reference_solutions_score_one(split):
    path = ROOT / "data" / "math" / f"{split}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not generated")
    rows = [r for r in _rows(path) if "solution" in r]
    if not rows:
        pytest.skip(f"{path} has no reference solutions")
    got = math_accuracy([r["solution"] for r in rows], answer=[r["answer"] for r in rows])
    bad = [(r["solution"], r["answer"]) for r, g in zip(rows, got) if g != 1.0]
    assert not bad, bad[:5]


def test_called_the_way_trl_calls_it():
    logged = {}
    got = math_accuracy(prompts=["p", "q"], completions=[r"so \boxed{3}", "no idea"], completion_ids=[[1], [2]],
                        answer=["3", "4"], trainer_state=None, log_extra=lambda c, v: None,
                        log_metric=logged.__setitem__)
    assert got == [1.0, 0.0]
    assert logged == {"math_accuracy/no_answer_frac": 0.5}
