"""Reward throughput: sandboxed code executions/s and math verifications/s.

    python bench/rewards.py [--n 256] [--workers N]

Prints a markdown table.  Code: ``n`` short completions (HumanEval-style asserts, half of them
wrong, plus io_cases rows) scored by ``code_tests`` in one batch, i.e. one GRPO step's worth.
Math: ``n`` completions scored by ``math_accuracy`` in one batch, once on the integer fast path and
once on answers that need math-verify (fresh pairs, so no cache hits).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rewards import math as rmath  # noqa: E402
from rewards.code import code_tests  # noqa: E402
from rewards.sandbox import detect_isolation  # noqa: E402


def code_batch(n: int):
    completions, tests, entry, io = [], [], [], []
    for k in range(n):
        right = k % 2 == 0
        if k % 4 < 3:  # tests rows
            body = "return a + b" if right else "return a - b"
            completions.append(f"Sure.\n```python\ndef add(a, b):\n    {body}\n```")
            tests.append(f"def check(candidate):\n    assert candidate({k}, 2) == {k + 2}\n"
                         "    assert candidate(-1, 1) == 0\n")
            entry.append("add")
            io.append(None)
        else:  # io rows, one case each
            op = "+" if right else "*"
            completions.append(f"```python\na, b = map(int, input().split())\nprint(a {op} b)\n```")
            tests.append(None)
            entry.append(None)
            io.append([{"stdin": f"{k} 3\n", "stdout": f"{k + 3}\n"}])
    return completions, tests, entry, io


def bench_code(n: int, workers: int | None) -> tuple[float, float, float]:
    completions, tests, entry, io = code_batch(n)
    code_tests(completions[:4], tests=tests[:4], entry_point=entry[:4], io_cases=io[:4])  # warm
    start = time.perf_counter()
    scores = code_tests(completions, tests=tests, entry_point=entry, io_cases=io, max_workers=workers)
    elapsed = time.perf_counter() - start
    expected = [1.0 if k % 2 == 0 else 0.0 for k in range(n)]
    if scores != expected:
        raise SystemExit(f"code scores wrong: {scores[:8]}...")
    return n / elapsed, elapsed, sum(scores) / n


def bench_math(n: int) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    rmath.warmup()
    rmath.math_accuracy([r"\boxed{\frac{1}{2}}"], answer=["0.5"])  # workers up and warm
    startup = time.perf_counter() - t0

    ints = [f"{k} + 1 = {k + 1}. \\boxed{{{k + 1}}}" for k in range(n)]
    start = time.perf_counter()
    got = rmath.math_accuracy(ints, answer=[str(k + 1) for k in range(n)])
    fast = n / (time.perf_counter() - start)
    assert got == [1.0] * n

    salt = int(time.time())  # fresh pairs: nothing comes from the cache
    latex = [f"So \\boxed{{\\frac{{{salt + k}}}{{4}}}}" for k in range(n)]
    golds = [str((salt + k) / 4) for k in range(n)]
    start = time.perf_counter()
    got = rmath.math_accuracy(latex, answer=golds)
    slow = n / (time.perf_counter() - start)
    assert got == [1.0] * n, got[:8]
    return fast, slow, startup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="completions per batch")
    ap.add_argument("--workers", type=int, default=None, help="parallel sandboxes (default: all cores)")
    args = ap.parse_args()

    iso = detect_isolation()
    code_rate, code_s, _ = bench_code(args.n, args.workers)
    fast, slow, startup = bench_math(args.n)
    cores = os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {platform.machine()}, {cores} CPU cores (load average {load}), "
          f"Python {platform.python_version()}, sandbox backend: {iso.backend}, "
          f"math workers: {rmath._get_pool().size}")
    print()
    print("| reward | batch | wall (s) | throughput |")
    print("|---|---|---|---|")
    print(f"| code_tests (sandboxed executions) | {args.n} | {code_s:.2f} | {code_rate:.1f} exec/s |")
    print(f"| math_accuracy, integer answers (fast path) | {args.n} | {args.n / fast:.3f} | {fast:,.0f} verif/s |")
    print(f"| math_accuracy, LaTeX answers (math-verify workers) | {args.n} | {args.n / slow:.2f} | "
          f"{slow:.1f} verif/s |")
    print(f"| math worker start-up (once per process) | - | {startup:.2f} | - |")


if __name__ == "__main__":
    main()
