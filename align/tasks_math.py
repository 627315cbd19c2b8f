"""Templated multi-step arithmetic word problems.

Each problem is a short story whose answer takes ``steps`` integer operations (+, -, *).  The SFT target shows
one equation per operation and ends with ``\\boxed{N}``, the format the math reward parses.  Every knob that
changes difficulty is an argument, and every random choice comes from the ``random.Random`` passed in, so a seed
fixes the output exactly.

Defaults are sized for a ~1M-parameter model trained for minutes: one-digit operands, values below 100, two or
three operations, prompts of a few dozen tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES_SHE = ["Mia", "Ava", "Lily", "Emma", "Zoe", "Nora", "Ruby", "Anna", "Lucy", "Sara", "Ella", "Ivy", "Maya",
             "Rosa", "Kate"]
NAMES_HE = ["Leo", "Sam", "Max", "Ben", "Tom", "Omar", "Jack", "Noah", "Eli", "Liam", "Hugo", "Ravi", "Finn",
            "Ivan", "Luke"]
OBJECTS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "cards", "shells", "stamps",
           "balloons", "candies", "flowers", "eggs", "toys", "beads"]
CONTAINERS = ["bags", "boxes", "jars", "baskets", "packs", "bowls"]
ADD_VERBS = ["buys {n} more", "finds {n} more", "gets {n} more", "picks up {n} more", "wins {n} more",
             "receives {n} more"]
SUB_VERBS = ["gives away {n}", "loses {n}", "sells {n}", "gives {n} to {other}", "uses {n}", "trades away {n}"]
QUESTIONS = ["How many {obj} does {name} have now?", "How many {obj} does {name} have in the end?",
             "How many {obj} does {name} have at the end?"]
# (singular, plural) shop items, priced in whole dollars.
ITEMS = [("pen", "pens"), ("pencil", "pencils"), ("notebook", "notebooks"), ("eraser", "erasers"),
         ("cookie", "cookies"), ("toy car", "toy cars"), ("ball", "balls"), ("cup", "cups"), ("book", "books"),
         ("kite", "kites"), ("sandwich", "sandwiches"), ("ruler", "rulers")]
BILLS = [10, 20, 50]
VOWELS = "aeiou"
MULTIPLY_VERBS = {2: "doubles", 3: "triples"}


@dataclass(frozen=True)
class MathConfig:
    """Difficulty knobs.  ``max_value`` is exclusive: every intermediate value (and the answer) is below it."""

    # Defaults sized for the tiny CPU model: one or two operations on small numbers, so a ~1M-parameter model
    # learns to copy operands and add within minutes and GRPO has groups with mixed outcomes to learn from.
    min_steps: int = 1
    max_steps: int = 2
    max_operand: int = 9
    max_value: int = 20

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}..{self.max_steps}")
        if self.max_operand < 2:
            raise ValueError(f"max_operand must be at least 2, got {self.max_operand}")
        if self.max_value <= self.max_operand:
            raise ValueError(f"max_value ({self.max_value}) must exceed max_operand ({self.max_operand})")


class _Retry(Exception):
    """The random draw painted itself into a corner (e.g. nothing left to subtract); draw again."""


def _person(rng: random.Random) -> tuple[str, str, str]:
    if rng.random() < 0.5:
        return rng.choice(NAMES_SHE), "she", "her"
    return rng.choice(NAMES_HE), "he", "his"


def _other(rng: random.Random, name: str) -> str:
    return rng.choice([n for n in NAMES_SHE + NAMES_HE if n != name])


def _a(noun: str) -> str:
    return ("An " if noun[0] in VOWELS else "A ") + noun


def _dollars(n: int) -> str:
    return f"{n} dollar" if n == 1 else f"{n} dollars"


def _eq(a: int, op: str, b: int, c: int) -> str:
    return f"{a} {op} {b} = {c}."


def _apply(rng: random.Random, cfg: MathConfig, value: int, ops: str) -> tuple[str, int, int]:
    """Draw one operation from ``ops`` that keeps ``value`` in range: (op, operand, new value)."""
    # Multiplication is drawn less often: it grows values fastest and is the hardest step for a tiny model.
    weights = {"+": 2, "-": 2, "*": 1}
    choices = []
    if "+" in ops and value + 1 < cfg.max_value:
        choices.append("+")
    if "-" in ops and value >= 2:
        choices.append("-")
    if "*" in ops and 1 <= value and value * 2 < cfg.max_value:
        choices.append("*")
    if not choices:
        raise _Retry
    op = rng.choices(choices, weights=[weights[c] for c in choices])[0]
    if op == "+":
        n = rng.randint(1, min(cfg.max_operand, cfg.max_value - 1 - value))
        return op, n, value + n
    if op == "-":
        # Taking away everything makes odd stories ("sells 9 of 9"), so something is always left.
        n = rng.randint(1, min(cfg.max_operand, value - 1))
        return op, n, value - n
    n = rng.randint(2, min(cfg.max_operand, (cfg.max_value - 1) // value))
    return op, n, value * n


def _chain(rng: random.Random, cfg: MathConfig, steps: int) -> dict:
    """One person's pile changes ``steps`` times (a multiplicative start counts as one step)."""
    name, pron, poss = _person(rng)
    obj = rng.choice(OBJECTS)
    lines: list[str] = []
    if rng.random() < 0.3 and cfg.max_operand * 2 < cfg.max_value:
        groups = rng.randint(2, cfg.max_operand)
        each = rng.randint(2, min(cfg.max_operand, (cfg.max_value - 1) // groups))
        value = groups * each
        story = [f"{name} has {groups} {rng.choice(CONTAINERS)} with {each} {obj} in each."]
        lines.append(_eq(groups, "*", each, value))
        todo = steps - 1
    else:
        value = rng.randint(2, cfg.max_operand)
        story = [f"{name} has {value} {obj}."]
        todo = steps
    clauses = []
    for _ in range(todo):
        op, n, new = _apply(rng, cfg, value, "+-*")
        if op == "+":
            clauses.append(rng.choice(ADD_VERBS).format(n=n))
        elif op == "-":
            clauses.append(rng.choice(SUB_VERBS).format(n=n, other=_other(rng, name)))
        elif n in MULTIPLY_VERBS:
            clauses.append(f"{MULTIPLY_VERBS[n]} {poss} {obj}")
        else:
            clauses.append(f"multiplies {poss} {obj} by {n}")
        lines.append(_eq(value, op, n, new))
        value = new
    # Clauses pair up into "X and then Y." sentences so stories read naturally and stay short.
    for i in range(0, len(clauses), 2):
        body = " and then ".join(clauses[i:i + 2])
        story.append(f"{pron.capitalize()} {body}." if i == 0 else f"Then {pron} {body}.")
    story.append(rng.choice(QUESTIONS).format(obj=obj, name=name))
    return {"prompt": " ".join(story), "answer": str(value), "lines": lines}


def _two_people(rng: random.Random, cfg: MathConfig, steps: int) -> dict:
    """B's amount is relative to A's; the question asks for both together (3 steps: B gives some away first)."""
    if steps not in (2, 3):
        raise _Retry
    a_name, _, _ = _person(rng)
    b_name, b_pron, _ = _person(rng)
    if a_name == b_name:
        raise _Retry
    obj = rng.choice(OBJECTS)
    a = rng.randint(2, cfg.max_operand)
    op, n, b = _apply(rng, cfg, a, "+-*")
    relation = {"+": f"{n} more {obj} than {a_name}", "-": f"{n} fewer {obj} than {a_name}",
                "*": f"{n} times as many {obj} as {a_name}"}[op]
    story = [f"{a_name} has {a} {obj}.", f"{b_name} has {relation}."]
    lines = [_eq(a, op, n, b)]
    if steps == 3:
        if b < 2:
            raise _Retry
        m = rng.randint(1, min(cfg.max_operand, b - 1))
        # Giving to the other person would leave the total unchanged, so only verbs that remove items.
        away = [v for v in SUB_VERBS if "{other}" not in v]
        story.append(f"{b_name} then {rng.choice(away).format(n=m)}.")
        lines.append(_eq(b, "-", m, b - m))
        b -= m
    total = a + b
    if total >= cfg.max_value:
        raise _Retry
    lines.append(_eq(a, "+", b, total))
    story.append(rng.choice([f"How many {obj} do they have together?",
                             f"How many {obj} do {a_name} and {b_name} have in total?"]))
    return {"prompt": " ".join(story), "answer": str(total), "lines": lines}


def _shop(rng: random.Random, cfg: MathConfig, steps: int) -> dict:
    """Prices times quantities; 2 steps: change from a bill, 3 steps: total of two purchases."""
    if steps not in (2, 3):
        raise _Retry
    name, pron, _ = _person(rng)
    (sing, plur), (sing2, plur2) = rng.sample(ITEMS, 2)
    p, q = rng.randint(1, cfg.max_operand), rng.randint(2, cfg.max_operand)
    cost = p * q
    if cost >= cfg.max_value:
        raise _Retry
    lines = [_eq(p, "*", q, cost)]
    if steps == 2:
        bills = [b for b in BILLS if cost <= b < cfg.max_value]
        if not bills:
            raise _Retry
        bill = rng.choice(bills)
        lines.append(_eq(bill, "-", cost, bill - cost))
        prompt = (f"{_a(sing)} costs {_dollars(p)}. {name} buys {q} {plur} and pays with a {bill} dollar bill. "
                  f"How many dollars of change does {pron} get?")
        return {"prompt": prompt, "answer": str(bill - cost), "lines": lines}
    p2, q2 = rng.randint(1, cfg.max_operand), rng.randint(2, cfg.max_operand)
    cost2 = p2 * q2
    total = cost + cost2
    if total >= cfg.max_value:
        raise _Retry
    lines += [_eq(p2, "*", q2, cost2), _eq(cost, "+", cost2, total)]
    prompt = (f"{_a(sing)} costs {_dollars(p)} and {_a(sing2).lower()} costs {_dollars(p2)}. "
              f"{name} buys {q} {plur} and {q2} {plur2}. How many dollars does {pron} spend?")
    return {"prompt": prompt, "answer": str(total), "lines": lines}


FAMILIES = [_chain, _chain, _two_people, _shop]  # the chain story is listed twice: it is the core skill


def math_problem(rng: random.Random, cfg: MathConfig = MathConfig()) -> dict:
    """One row ``{"prompt", "answer", "solution"}``."""
    for _ in range(1000):
        steps = rng.randint(cfg.min_steps, cfg.max_steps)
        family = rng.choice(FAMILIES)
        try:
            row = family(rng, cfg, steps)
        except _Retry:
            continue
        solution = " ".join(row.pop("lines")) + f" \\boxed{{{row['answer']}}}"
        return {"prompt": row["prompt"], "answer": row["answer"], "solution": solution}
    raise ValueError(f"cannot draw a math problem under {cfg}; loosen the limits")
