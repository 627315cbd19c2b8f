"""Templated Python programming tasks with reference solutions and tests.

Two task shapes, matching what the code reward runs:

* function tasks: ``{"prompt", "solution", "tests", "entry_point"}`` -- ``tests`` is HumanEval-style asserts that
  call ``entry_point``;
* program tasks: ``{"prompt", "solution", "io_cases"}`` -- the program reads stdin and prints, and each case is
  ``{"stdin", "stdout"}``.

Each family pairs the reference code with an independent Python reference (``ref``) that computes the expected
values, so the generated asserts check the code against the spec rather than against itself.  ``check_row``
runs a reference solution against its own tests; the build calls it on every row.
"""

from __future__ import annotations

import contextlib
import io
import random
import sys
from typing import Callable

NUM_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}
FUNC_TEMPLATES = ["Write a Python function {sig} that {desc}.", "Write a function {sig} that {desc}.",
                  "Define {sig} so that it {desc}.", "Implement {sig}, which {desc}.",
                  "Write {sig}: it {desc}.", "Create a function {sig} that {desc}."]
PROG_TEMPLATES = ["Write a program that reads {inp} from standard input and prints {out}.",
                  "Write a Python program that reads {inp} and prints {out}.",
                  "Write a program that reads {inp} and prints {out}.",
                  "Read {inp} from standard input and print {out}."]
LIST_PARAMS = ["nums", "values", "xs", "numbers", "items"]
STR_PARAMS = ["s", "text", "word"]
INT_PARAMS = ["x", "n", "k", "num"]
WORDS = ["apple", "banana", "kiwi", "level", "python", "robot", "code", "tree", "moon", "star", "abc", "hello",
         "data", "zebra", "noon", "cat", "a", ""]
FIZZ_WORDS = ["Fizz", "Buzz", "Bang", "Pop", "Zap", "Boom"]


class _Retry(Exception):
    """The draw does not make a well-posed task; draw again."""


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def fence(code: str) -> str:
    """The SFT target: one fenced Python block."""
    return f"```python\n{code.rstrip()}\n```"


def _k_name(k: int, rng: random.Random) -> str:
    return NUM_WORDS[k] if k in NUM_WORDS and rng.random() < 0.6 else str(k)


def _ints(rng: random.Random, n: int, lo: int = -9, hi: int = 20) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


def _lists(rng: random.Random, n: int, nonempty: bool = True, lo: int = -9, hi: int = 20) -> list[list[int]]:
    return [_ints(rng, rng.randint(1 if nonempty else 0, 5), lo, hi) for _ in range(n)]


def _strings(rng: random.Random, n: int) -> list[str]:
    return rng.sample(WORDS, n)


# A function family returns (name, params, desc, body, ref, args): the prompt shows ``name(params)``, ``body`` is
# the indented function body, ``ref`` computes expected results and ``args`` is a list of argument tuples.
FuncSpec = tuple[str, str, str, str, Callable, list[tuple]]


def _add_const(rng):
    k, p = rng.randint(2, 20), rng.choice(INT_PARAMS)
    verb, op, f = rng.choice([("add", "plus", lambda x: x + k), ("minus", "minus", lambda x: x - k),
                              ("times", "times", lambda x: x * k)])
    name = f"{verb}_{_k_name(k, rng)}" if rng.random() < 0.7 else rng.choice(["f", "g", "transform"])
    sym = {"plus": "+", "minus": "-", "times": "*"}[op]
    return name, p, f"returns {p} {op} {k}", f"return {p} {sym} {k}", f, [(x,) for x in _ints(rng, 4)]


def _power(rng):
    n, (names, e) = rng.choice(INT_PARAMS), rng.choice([(["square", "squared", "sq"], 2), (["cube", "cubed"], 3)])
    what = "square" if e == 2 else "cube"
    return (rng.choice(names), n, f"returns the {what} of {n}", f"return {n} ** {e}", lambda x: x ** e,
            [(x,) for x in _ints(rng, 4, -6, 12)])


def _parity(rng):
    n = rng.choice(INT_PARAMS)
    if rng.random() < 0.5:
        even = rng.random() < 0.5
        name = "is_even" if even else "is_odd"
        word = "even" if even else "odd"
        return (name, n, f"returns True if {n} is {word} and False otherwise",
                f"return {n} % 2 == {0 if even else 1}", (lambda x: x % 2 == 0) if even else (lambda x: x % 2 == 1),
                [(x,) for x in _ints(rng, 4, 0, 50)])
    k = rng.randint(3, 12)
    name = rng.choice([f"is_multiple_of_{k}", f"divisible_by_{k}"])
    return (name, n, f"returns True if {n} is divisible by {k} and False otherwise", f"return {n} % {k} == 0",
            lambda x: x % k == 0, [(x,) for x in _ints(rng, 2, 0, 60)] + [(k * rng.randint(0, 6),),
                                                                          (k * rng.randint(1, 6) + 1,)])


def _list_reduce(rng):
    p = rng.choice(LIST_PARAMS)
    names, what, expr, f = rng.choice([
        (["list_sum", "total", "sum_all"], "the sum of", "sum({p})", sum),
        (["largest", "list_max", "biggest"], "the largest number in", "max({p})", max),
        (["smallest", "list_min", "lowest"], "the smallest number in", "min({p})", min),
        (["count_items", "list_length", "size"], "the number of items in", "len({p})", len),
        (["first_item", "head"], "the first item of", "{p}[0]", lambda xs: xs[0]),
        (["last_item", "tail_item"], "the last item of", "{p}[-1]", lambda xs: xs[-1]),
    ])
    return (rng.choice(names), p, f"returns {what} the non-empty list {p}", "return " + expr.format(p=p), f,
            [(xs,) for xs in _lists(rng, 3)])


def _list_filter(rng):
    p, k = rng.choice(LIST_PARAMS), rng.randint(0, 10)
    name, desc, body, f = rng.choice([
        ("sum_of_evens", f"returns the sum of the even numbers in the list {p}",
         f"return sum(v for v in {p} if v % 2 == 0)", lambda xs: sum(v for v in xs if v % 2 == 0)),
        ("count_positive", f"returns how many numbers in the list {p} are greater than 0",
         f"return sum(1 for v in {p} if v > 0)", lambda xs: sum(1 for v in xs if v > 0)),
        (f"count_{_k_name(k, rng) if k else 'zero'}s", f"returns how many times {k} appears in the list {p}",
         f"return {p}.count({k})", lambda xs: xs.count(k)),
        (f"greater_than_{k}", f"returns a list of the numbers in {p} that are greater than {k}",
         f"return [v for v in {p} if v > {k}]", lambda xs: [v for v in xs if v > k]),
        ("double_all", f"returns a new list with every number in {p} doubled", f"return [v * 2 for v in {p}]",
         lambda xs: [v * 2 for v in xs]),
        (f"add_{k}_to_all", f"returns a new list with {k} added to every number in {p}",
         f"return [v + {k} for v in {p}]", lambda xs: [v + k for v in xs]),
    ])
    lists = _lists(rng, 3, nonempty=False, lo=-5, hi=12)
    lists[0] = lists[0] + [k]  # so count/filter tasks see the constant at least once
    return name, p, desc, body, f, [(xs,) for xs in lists]


def _strings_family(rng):
    p, c = rng.choice(STR_PARAMS), rng.choice("aeiost")
    name, desc, body, f = rng.choice([
        (rng.choice(["reverse", "reverse_string", "backwards"]), f"returns the string {p} reversed",
         f"return {p}[::-1]", lambda s: s[::-1]),
        (f"count_{c}", f"returns how many times the letter '{c}' appears in the string {p}",
         f"return {p}.count('{c}')", lambda s: s.count(c)),
        (rng.choice(["shout", "to_upper"]), f"returns the string {p} in upper case", f"return {p}.upper()",
         str.upper),
        (f"starts_with_{c}", f"returns True if the string {p} starts with '{c}'", f"return {p}.startswith('{c}')",
         lambda s: s.startswith(c)),
        ("is_palindrome", f"returns True if the string {p} reads the same backwards", f"return {p} == {p}[::-1]",
         lambda s: s == s[::-1]),
    ])
    return name, p, desc, body, f, [(s,) for s in _strings(rng, 4)]


def _repeat(rng):
    p, k = rng.choice(STR_PARAMS), rng.randint(2, 5)
    return (f"repeat_{_k_name(k, rng)}", p, f"returns the string {p} repeated {k} times", f"return {p} * {k}",
            lambda s: s * k, [(s,) for s in _strings(rng, 3)])


def _loops(rng):
    n = rng.choice(["n", "k", "num"])
    if rng.random() < 0.5:
        body = f"result = 1\nfor i in range(2, {n} + 1):\n    result *= i\nreturn result"

        def fact(x):
            out = 1
            for i in range(2, x + 1):
                out *= i
            return out
        return (rng.choice(["factorial", "fact"]), n, f"returns the factorial of {n} (for {n} >= 0)", body, fact,
                [(x,) for x in rng.sample(range(0, 9), 4)])
    return (rng.choice(["sum_to", "triangle", "sum_up_to"]), n, f"returns the sum of the integers from 1 to {n}",
            f"return sum(range(1, {n} + 1))", lambda x: x * (x + 1) // 2, [(x,) for x in rng.sample(range(0, 30), 4)])


def _fizz(rng):
    n = rng.choice(INT_PARAMS)
    k1, k2 = rng.sample(range(2, 8), 2)
    w1, w2 = rng.sample(FIZZ_WORDS, 2)
    if rng.random() < 0.5:
        body = f"if {n} % {k1} == 0:\n    return '{w1}'\nreturn str({n})"
        return (f"{w1.lower()}_or_number", n, f"returns '{w1}' if {n} is divisible by {k1}, else {n} as a string",
                body, lambda x: w1 if x % k1 == 0 else str(x),
                [(k1 * rng.randint(1, 5),), (k1 * rng.randint(1, 5) + 1,), (rng.randint(1, 40),)])
    body = (f"if {n} % {k1 * k2} == 0:\n    return '{w1}{w2}'\nif {n} % {k1} == 0:\n    return '{w1}'\n"
            f"if {n} % {k2} == 0:\n    return '{w2}'\nreturn str({n})")
    desc = (f"returns '{w1}{w2}' if {n} is divisible by both {k1} and {k2}, '{w1}' if only by {k1}, '{w2}' if only "
            f"by {k2}, else {n} as a string")

    def ref(x):
        return w1 + w2 if x % (k1 * k2) == 0 else w1 if x % k1 == 0 else w2 if x % k2 == 0 else str(x)
    # k1 and k2 are distinct numbers in 2..7 but may share a factor (e.g. 2 and 4); the reference body tests the
    # product, so the spec says "divisible by both" only when that matches: coprime pairs.
    if _gcd(k1, k2) != 1:
        raise _Retry
    return (f"{w1.lower()}_{w2.lower()}", n, desc, body, ref,
            [(k1 * k2,), (k1,), (k2,), (k1 * k2 + 1,)])


def _two_args(rng):
    a, b = rng.choice([("a", "b"), ("x", "y"), ("m", "n")])
    name, desc, body, f = rng.choice([
        (rng.choice(["bigger", "max_of_two", "larger"]), f"returns the larger of {a} and {b}",
         f"return {a} if {a} > {b} else {b}", max),
        (rng.choice(["smaller", "min_of_two", "lesser"]), f"returns the smaller of {a} and {b}",
         f"return {a} if {a} < {b} else {b}", min),
        (rng.choice(["add", "add_numbers", "plus"]), f"returns the sum of {a} and {b}", f"return {a} + {b}",
         lambda u, v: u + v),
        (rng.choice(["difference", "subtract"]), f"returns {a} minus {b}", f"return {a} - {b}",
         lambda u, v: u - v),
        (rng.choice(["multiply", "product"]), f"returns {a} times {b}", f"return {a} * {b}", lambda u, v: u * v),
    ])
    return name, f"{a}, {b}", desc, body, f, [tuple(_ints(rng, 2)) for _ in range(4)]


def _clamp(rng):
    p = rng.choice(INT_PARAMS)
    lo = rng.randint(-5, 5)
    hi = lo + rng.randint(3, 20)
    return (rng.choice(["clamp", "clip", "limit"]), p, f"returns {p} limited to the range {lo} to {hi}",
            f"return max({lo}, min({hi}, {p}))", lambda x: max(lo, min(hi, x)),
            [(lo - rng.randint(1, 5),), (hi + rng.randint(1, 5),), (rng.randint(lo, hi),)])


def _abs(rng):
    p = rng.choice(INT_PARAMS)
    return (rng.choice(["absolute", "abs_value", "magnitude"]), p, f"returns the absolute value of {p}",
            f"return {p} if {p} >= 0 else -{p}", abs, [(x,) for x in _ints(rng, 4, -20, 20)])


FUNC_FAMILIES = [_add_const, _power, _parity, _list_reduce, _list_filter, _strings_family, _repeat, _loops, _fizz,
                 _two_args, _clamp, _abs]


def _func_task(rng: random.Random) -> dict:
    name, params, desc, body, ref, args = rng.choice(FUNC_FAMILIES)(rng)
    sig = f"{name}({params})"
    code = f"def {sig}:\n" + "\n".join("    " + line for line in body.splitlines()) + "\n"
    tests = "\n".join(f"assert {name}({', '.join(map(repr, a))}) == {ref(*a)!r}" for a in args)
    prompt = rng.choice(FUNC_TEMPLATES).format(sig=sig, desc=desc)
    return {"prompt": prompt, "solution": fence(code), "tests": tests, "entry_point": name}


# A program family returns (input description, output description, code, ref, stdins); ``ref`` maps stdin text
# to the expected stdout text.
def _prog_two_ints(rng):
    k = rng.randint(1, 12)
    what, expr, f = rng.choice([("their sum", "a + b", lambda a, b: a + b),
                                ("their product", "a * b", lambda a, b: a * b),
                                ("the first minus the second", "a - b", lambda a, b: a - b),
                                ("the larger one", "max(a, b)", max),
                                ("the smaller one", "min(a, b)", min),
                                (f"their sum plus {k}", f"a + b + {k}", lambda a, b: a + b + k),
                                (f"their sum times {k}", f"(a + b) * {k}", lambda a, b: (a + b) * k)])
    inp = rng.choice(["two integers on one line", "two integers separated by a space", "two integers a and b"])
    code = f"a, b = map(int, input().split())\nprint({expr})\n"
    ins = [f"{x} {y}\n" for x, y in (_ints(rng, 2) for _ in range(3))]
    return inp, what, code, lambda s: f"{f(*map(int, s.split()))}\n", ins


def _prog_list(rng):
    k = rng.randint(0, 10)
    what, expr, f = rng.choice([
        ("their sum", "sum(nums)", sum), ("the largest", "max(nums)", max), ("the smallest", "min(nums)", min),
        ("how many there are", "len(nums)", len),
        (f"how many are greater than {k}", f"sum(1 for v in nums if v > {k})", lambda xs: sum(v > k for v in xs)),
        (f"how many times {k} appears", f"nums.count({k})", lambda xs: xs.count(k)),
        (f"their sum plus {k}", f"sum(nums) + {k}", lambda xs: sum(xs) + k)])
    inp = rng.choice(["a line of integers separated by spaces", "a line of space-separated integers",
                      "integers on one line"])
    code = f"nums = list(map(int, input().split()))\nprint({expr})\n"
    lists = _lists(rng, 3, lo=-3, hi=12)
    lists[0].append(k)
    ins = [" ".join(map(str, xs)) + "\n" for xs in lists]
    return inp, what, code, lambda s: f"{f(list(map(int, s.split())))}\n", ins


def _prog_one_int(rng):
    k = rng.randint(2, 12)
    what, expr, f = rng.choice([
        (f"it plus {k}", f"n + {k}", lambda n: n + k), (f"it minus {k}", f"n - {k}", lambda n: n - k),
        (f"it times {k}", f"n * {k}", lambda n: n * k), ("its square", "n * n", lambda n: n * n),
        (f"the remainder when it is divided by {k}", f"n % {k}", lambda n: n % k),
        ("\"even\" if it is even, otherwise \"odd\"", "'even' if n % 2 == 0 else 'odd'",
         lambda n: "even" if n % 2 == 0 else "odd"),
        (f"\"yes\" if it is divisible by {k}, otherwise \"no\"", f"'yes' if n % {k} == 0 else 'no'",
         lambda n: "yes" if n % k == 0 else "no")])
    inp = rng.choice(["one integer", "an integer", "an integer n"])
    code = f"n = int(input())\nprint({expr})\n"
    ins = [f"{x}\n" for x in _ints(rng, 2, 0, 40)] + [f"{k * rng.randint(0, 4)}\n"]
    return inp, what, code, lambda s: f"{f(int(s))}\n", ins


def _prog_count(rng):
    k = rng.randint(1, 5)
    what, code, f = rng.choice([
        (f"the numbers {k} to n, one per line", f"n = int(input())\nfor i in range({k}, n + 1):\n    print(i)\n",
         lambda n: "".join(f"{i}\n" for i in range(k, n + 1))),
        (f"the first n multiples of {k + 1}, one per line",
         f"n = int(input())\nfor i in range(1, n + 1):\n    print(i * {k + 1})\n",
         lambda n: "".join(f"{i * (k + 1)}\n" for i in range(1, n + 1))),
        ("a countdown from n to 1, one number per line", "n = int(input())\nfor i in range(n, 0, -1):\n    print(i)\n",
         lambda n: "".join(f"{i}\n" for i in range(n, 0, -1)))])
    return "an integer n", what, code, lambda s: f(int(s)), [f"{x}\n" for x in rng.sample(range(k, k + 7), 3)]


def _prog_text(rng):
    k, c = rng.randint(2, 4), rng.choice("aeiost")
    what, expr, f = rng.choice([("it reversed", "input()[::-1]", lambda t: t[::-1]),
                                ("it in upper case", "input().upper()", str.upper),
                                ("the number of words in it", "len(input().split())", lambda t: len(t.split())),
                                (f"it repeated {k} times", f"input() * {k}", lambda t: t * k),
                                (f"how many times the letter '{c}' appears in it", f"input().count('{c}')",
                                 lambda t: t.count(c)),
                                ("its length", "len(input())", len)])
    inp = rng.choice(["a line of text", "one line", "a string"])
    words = [w for w in WORDS if w]
    ins = [" ".join(rng.sample(words, rng.randint(1, 3))) + "\n" for _ in range(3)]
    return inp, what, f"print({expr})\n", lambda s: f"{f(s.rstrip(chr(10)))}\n", ins


PROG_FAMILIES = [_prog_two_ints, _prog_list, _prog_one_int, _prog_count, _prog_text]


def _prog_task(rng: random.Random) -> dict:
    inp, out, code, ref, stdins = rng.choice(PROG_FAMILIES)(rng)
    prompt = rng.choice(PROG_TEMPLATES).format(inp=inp, out=out)
    return {"prompt": prompt, "solution": fence(code),
            "io_cases": [{"stdin": s, "stdout": ref(s)} for s in stdins]}


def code_task(rng: random.Random, io: bool = False) -> dict:
    """One code row: a stdin/stdout program task if ``io``, else a function task with asserts."""
    for _ in range(1000):
        try:
            return _prog_task(rng) if io else _func_task(rng)
        except _Retry:
            continue
    raise RuntimeError("cannot draw a code task")  # unreachable in practice: retries are rare


def unfence(solution: str) -> str:
    """The code inside the first fenced block (the whole text if there is none)."""
    if "```" not in solution:
        return solution
    inner = solution.split("```", 2)[1]
    return inner.split("\n", 1)[1] if "\n" in inner else ""


def check_row(row: dict) -> None:
    """Run a trusted reference solution against its own tests in this process; raise AssertionError if it fails.

    Only for generated rows: the code is ours.  Untrusted code goes through the sandbox in ``rewards``.
    """
    code = unfence(row["solution"])
    if "tests" in row:
        scope: dict = {}
        exec(compile(code + "\n" + row["tests"], "<reference>", "exec"), scope)
        return
    for case in row["io_cases"]:
        out = io.StringIO()
        old_stdin = sys.stdin
        sys.stdin = io.StringIO(case["stdin"])
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, "<reference>", "exec"), {"__name__": "__main__"})
        finally:
            sys.stdin = old_stdin
        if out.getvalue() != case["stdout"]:
            raise AssertionError(f"stdin {case['stdin']!r}: expected {case['stdout']!r}, got {out.getvalue()!r}")

