"""Code reward: run a completion's program against the row's tests in the sandbox.

Two kinds of rows:

* ``tests`` (+ ``entry_point``): HumanEval-style Python.  Either ``def check(candidate): ...`` (called
  with the entry point) or plain top-level asserts that call the entry point by name.
* ``io_cases``: ``[{"stdin": ..., "stdout": ...}]``.  The program runs once per case; its stdout is
  compared with the expected one OUTSIDE the sandbox (whitespace-normalised strings), so no object
  inside the program can pretend to be equal.

Why a test run is trusted only when the harness says so
    The solution runs before the tests in the same interpreter, so it can exit early
    (``sys.exit(0)``, ``os._exit(0)``), kill the process, or override ``print``, ``AssertionError``
    and builtins.  The harness therefore (1) captures everything it needs before the solution runs,
    (2) runs the solution with ``exec`` in its own namespace and the tests in another one built from
    the original builtins, (3) turns every ``assert`` into a counted check, (4) rejects return values
    that are not plain built-in data (an object whose ``__eq__`` always says True cannot pass), and
    (5) reports ``<nonce> done <passed> <failed> <total>`` through a private duplicate of the real
    stdout only after the last test.  The nonce is random per call and reaches the harness on stdin
    (never in a file, argv or the environment); while untrusted code runs it sits only in a pipe.
    No report with the right nonce means 0.

    Residual risk, stated plainly: code in the same interpreter can in principle introspect the
    harness (frames, ``gc``, file descriptors, ``ctypes``) and forge a report.  The sandbox bounds
    what that buys to a wrong reward, never an escape.
"""

from __future__ import annotations

import ast
import concurrent.futures as cf
import functools
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Sequence

from rewards import as_text
from rewards.sandbox import ExecResult, run_python

log = logging.getLogger(__name__)

__all__ = ["extract_code", "score_code", "code_tests", "CodeScore", "MODES"]

MODES = ("fraction", "all")
MAX_CODE_CHARS = 200_000

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)", re.M | re.S)
_PY_TAGS = {"python", "py", "python3", "py3", ""}


def extract_code(text: str, block: str = "last") -> str:
    """The program in a completion: a fenced Python (or untagged) block, else the raw text.

    >>> extract_code("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nDone.")
    'def f():\\n    return 1\\n'
    >>> extract_code("def f(): return 2")
    'def f(): return 2'
    >>> extract_code("```bash\\nrm -rf /\\n```")
    ''
    """
    if block not in ("first", "last"):
        raise ValueError(f"block must be 'first' or 'last', got {block!r}")
    if "```" not in text:
        return text
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]
    python = [body for tag, body in blocks if tag in _PY_TAGS]
    if not python:
        return ""  # only other languages: nothing to run
    return python[-1] if block == "last" else python[0]


# ----------------------------------------------------------------------------------- harness

# Runs inside the sandbox as main.py, next to solution.py and tests.py.  Standard library only.
_HARNESS = r'''
import os, sys

def _main():
    import builtins, collections, importlib
    # Captured before any untrusted code runs.
    write, read, exit_, dup2, pipe, close = os.write, os.read, os._exit, os.dup2, os.pipe, os.close
    type_, id_, callable_, all_, len_, exec_, compile_ = type, id, callable, all, len, exec, compile
    isinstance_, ModuleType, import_module = isinstance, type(os), importlib.import_module
    BaseException_ = BaseException

    def random_fd(avoid):
        while True:
            fd = 10 + int.from_bytes(os.urandom(2), "little") % 240
            if fd not in avoid:
                return fd

    # Verdict channel: a private copy of the real stdout at a random fd; the solution's own
    # prints go to stderr.
    out = random_fd(())
    dup2(1, out)
    dup2(2, 1)
    # The nonce: read from stdin, parked in a pipe (not a Python object) until the very end.
    buf = b""
    while len_(buf) < 256 and not buf.endswith(b"\n"):
        chunk = read(0, 256)
        if not chunk:
            break
        buf += chunk
    r, w = pipe()
    write(w, buf.strip())
    close(w)
    vault = random_fd((out, r, w))
    dup2(r, vault)
    close(r)
    del buf, chunk
    null = os.open(os.devnull, os.O_RDONLY)
    dup2(null, 0)
    close(null)

    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "solution.py"), encoding="utf-8") as f:
        sol_src = f.read()
    with open(os.path.join(here, "tests.py"), encoding="utf-8") as f:
        test_code = compile_(f.read(), "tests.py", "exec")  # asserts already instrumented
    entry, guard, static, call_check = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4] == "1"
    getframe = sys._getframe
    main_code = getframe(0).f_code
    CodeType = type_(main_code)

    # Code objects of the tests: only asserts compiled from them may count.  Calling the
    # counters (or the verdict) from anywhere else is tampering and ends the run with no report.
    test_codes = {}

    def collect(co):
        test_codes[id_(co)] = co
        for c in co.co_consts:
            if isinstance_(c, CodeType):
                collect(c)

    collect(test_code)

    def counters():
        state = [0, 0]  # passed, failed; held in closures, not in a frame the solution can walk to

        def ok():
            if id_(getframe(1).f_code) not in test_codes:
                exit_(3)
            state[0] += 1

        def fail():
            if id_(getframe(1).f_code) not in test_codes:
                exit_(3)
            state[1] += 1

        def report(status, total):
            if getframe(2).f_code is not main_code:
                exit_(3)
            token = read(vault, 256)
            write(out, b"\n" + token + b" " + status + b" %d %d %d\n" % (state[0], state[1], total))
            exit_(0)

        return ok, fail, report, lambda: state[0] + state[1]

    ok, fail, report, executed = counters()

    def verdict(status, total):
        report(status, total)

    # Return values must be genuine built-in data: an object whose __eq__ (or __abs__, ...) lies
    # cannot pass an assert.
    plain_ids = {id_(t) for t in (int, float, complex, bool, str, bytes, type(None))}
    seq_ids = {id_(t) for t in (list, tuple, set, frozenset, collections.deque)}
    map_ids = {id_(t) for t in (dict, collections.Counter, collections.OrderedDict, collections.defaultdict)}
    dict_items = dict.items

    def plain(x, depth):
        t = id_(type_(x))
        if t in plain_ids:
            return True
        if depth > 64:
            return False
        if t in seq_ids:
            return all_(plain(v, depth + 1) for v in x)
        if t in map_ids:
            return all_(plain(k, depth + 1) and plain(v, depth + 1) for k, v in dict_items(x))
        return False

    def guarded(fn):
        def candidate(*args, **kwargs):
            result = fn(*args, **kwargs)
            if not plain(result, 0):
                raise TypeError("candidate returned a non-builtin object")
            return result
        return candidate

    modules = dict(sys.modules)
    module_dicts = {k: dict(m.__dict__) for k, m in modules.items() if m is not None}
    orig_builtins = dict(builtins.__dict__)
    sol_ns = {"__name__": "__solution__", "__builtins__": builtins}
    try:
        exec_(compile_(sol_src, "solution.py", "exec"), sol_ns)
    except BaseException_:
        verdict(b"solution_error", static)
    # Undo what the solution did to shared modules: modules it added (possibly fakes) are
    # forgotten so the tests import genuine ones, replaced entries and attributes are restored.
    for k in [k for k in sys.modules if k not in modules]:
        del sys.modules[k]
    sys.modules.update(modules)
    for k, saved in module_dicts.items():
        d = modules[k].__dict__
        for attr, value in saved.items():
            if d.get(attr, d) is not value:
                d[attr] = value

    tg = {"__name__": "__tests__", "__builtins__": dict(orig_builtins)}
    for k, v in sol_ns.items():  # helpers the tests may use (e.g. a paired encode/decode)
        if k in orig_builtins or k.startswith("__"):
            continue
        if isinstance_(v, ModuleType):
            try:
                v = import_module(v.__name__)  # a genuine copy, never the solution's object
            except BaseException_:
                continue
        tg[k] = v
    candidate = None
    if entry:
        fn = sol_ns.get(entry)
        if fn is None or not callable_(fn):
            verdict(b"no_entry_point", static)
        candidate = guarded(fn) if guard else fn
        tg[entry] = candidate
    tg["_h_ok"], tg["_h_fail"] = ok, fail
    try:
        exec_(test_code, tg)
        if call_check:
            if candidate is None:
                verdict(b"no_entry_point", static)
            tg["check"](candidate)
    except BaseException_:
        verdict(b"aborted", max(static, executed()))
    verdict(b"done", executed())

_main()
'''


class _Counted(ast.NodeTransformer):
    """``assert X`` -> ``try: assert X / except BaseException: _h_fail() / else: _h_ok()``."""

    def __init__(self) -> None:
        self.n = 0

    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        self.n += 1
        call = lambda name: ast.Expr(ast.Call(ast.Name(name, ast.Load()), [], []))  # noqa: E731
        handler = ast.ExceptHandler(ast.Name("BaseException", ast.Load()), None, [call("_h_fail")])
        return ast.Try([node], [handler], [call("_h_ok")], [])


@functools.lru_cache(maxsize=4096)
def _instrument(tests: str) -> tuple[str, int, bool]:
    """Instrumented test source, number of asserts, whether the harness must call ``check``.

    Done here, not in the sandbox: rows repeat across a GRPO group, and ``import ast`` is the
    largest start-up cost the harness would otherwise pay.  Raises ``SyntaxError``.
    """
    tree = ast.parse(tests, "tests.py")
    counter = _Counted()
    tree = ast.fix_missing_locations(counter.visit(tree))
    defines = any(isinstance(n, ast.FunctionDef) and n.name == "check" for n in tree.body)
    calls = any(isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
                and isinstance(n.value.func, ast.Name) and n.value.func.id == "check" for n in tree.body)
    return ast.unparse(tree), counter.n, defines and not calls


@dataclass(frozen=True)
class CodeScore:
    """Score of one completion plus why (for logs and tests)."""

    score: float | None
    detail: str
    passed: int = 0
    total: int = 0
    results: tuple[ExecResult, ...] = ()


def _verdict(result: ExecResult, nonce: str) -> tuple[str, int, int, int] | None:
    found = None
    for m in re.finditer(rf"^{nonce} (\w+) (\d+) (\d+) (\d+)$", result.stdout, re.M):
        found = (m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)))
    return found


def _normalise(text: str) -> list[str]:
    lines = [" ".join(line.split()) for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    return lines


def _run_tests(code, tests, entry_point, mode, plain_returns, limits) -> CodeScore:
    try:
        instrumented, static, call_check = _instrument(tests)
    except (SyntaxError, ValueError) as exc:
        log.warning("code row skipped: its tests do not parse (%s)", exc)
        return CodeScore(None, f"tests do not parse: {exc}")
    nonce = secrets.token_hex(16)
    result = run_python(
        _HARNESS,
        stdin=nonce + "\n",
        files={"solution.py": code, "tests.py": instrumented},
        args=(entry_point or "", "1" if plain_returns else "0", str(static), "1" if call_check else "0"),
        **limits,
    )
    v = _verdict(result, nonce)
    if v is None:
        why = f"no harness report ({result.status}: {result.reason or 'exit'})"
        return CodeScore(0.0, why, results=(result,))
    state, passed, failed, total = v
    if mode == "all":
        score = 1.0 if state == "done" and failed == 0 else 0.0
    else:
        score = passed / total if total else (1.0 if state == "done" else 0.0)
    return CodeScore(score, state, passed, total, (result,))


def _run_io_case(code, case, limits) -> tuple[bool, ExecResult]:
    result = run_python(code, stdin=str(case.get("stdin") or ""), **limits)
    good = (result.status == "ok" and not result.truncated
            and _normalise(result.stdout) == _normalise(str(case.get("stdout") or "")))
    return good, result


def _parse_cases(io_cases: Any) -> list[dict]:
    cases = json.loads(io_cases) if isinstance(io_cases, str) else io_cases
    if not isinstance(cases, (list, tuple)) or not all(isinstance(c, dict) for c in cases):
        raise ValueError("io_cases must be a list of {'stdin': str, 'stdout': str} dicts")
    return list(cases)


def score_code(
    completion: Any,
    tests: str | None = None,
    entry_point: str | None = None,
    io_cases: Any = None,
    *,
    mode: str = "fraction",
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    plain_returns: bool = True,
    block: str = "last",
) -> CodeScore:
    """Score one completion (see :func:`code_tests` for the options)."""
    return _Batch(mode, timeout_s, memory_mb, plain_returns, block, 1, None).run(
        [completion], [tests], [entry_point], [io_cases])[0]


class _Batch:
    """All executions of one reward call, run in parallel with a bound on total wall time."""

    def __init__(self, mode, timeout_s, memory_mb, plain_returns, block, max_workers, batch_timeout_s):
        if mode not in MODES:
            raise ValueError(f"code_tests mode must be one of {MODES}, got {mode!r}")
        self.mode, self.plain_returns, self.block = mode, plain_returns, block
        self.timeout_s = float(timeout_s)
        self.limits = {"memory_mb": memory_mb}
        self.max_workers = max_workers or os.cpu_count() or 1
        self.batch_timeout_s = batch_timeout_s

    def _limits(self, deadline: float) -> dict | None:
        remaining = deadline - time.monotonic()
        if remaining < 0.05:
            return None
        return {**self.limits, "timeout_s": min(self.timeout_s, remaining)}

    def run(self, completions, tests, entry_points, io_cases) -> list[CodeScore]:
        n = len(completions)
        jobs: list[tuple[int, Any]] = []  # (row, job spec)
        scores: list[CodeScore | None] = [None] * n
        for i in range(n):
            t = tests[i] if tests is not None else None
            io = io_cases[i] if io_cases is not None else None
            has_tests = isinstance(t, str) and t.strip() != ""
            has_io = io is not None and not (isinstance(io, str) and not io.strip())
            if not has_tests and not has_io:
                scores[i] = CodeScore(None, "no tests or io_cases")
                continue
            code = extract_code(as_text(completions[i]), self.block)
            if not code.strip():
                scores[i] = CodeScore(0.0, "no code found")
                continue
            if len(code) > MAX_CODE_CHARS:
                scores[i] = CodeScore(0.0, f"code longer than {MAX_CODE_CHARS} characters")
                continue
            if has_tests:
                ep = entry_points[i] if entry_points is not None else None
                jobs.append((i, ("tests", code, t, ep)))
            else:
                cases = _parse_cases(io)
                if not cases:
                    scores[i] = CodeScore(None, "empty io_cases")
                    continue
                for case in cases:
                    jobs.append((i, ("io", code, case)))
        # Rows whose jobs have not started when the budget is spent score 0.
        waves = -(-len(jobs) // self.max_workers) if jobs else 0
        budget = self.batch_timeout_s or max(30.0, (self.timeout_s + 1.0) * waves)
        deadline = time.monotonic() + budget
        io_results: dict[int, list[tuple[bool, ExecResult | None]]] = {}

        def work(spec):
            limits = self._limits(deadline)
            if limits is None:
                return None
            if spec[0] == "tests":
                _, code, t, ep = spec
                return _run_tests(code, t, ep, self.mode, self.plain_returns, limits)
            return _run_io_case(spec[1], spec[2], limits)

        if jobs:
            with cf.ThreadPoolExecutor(max_workers=min(self.max_workers, len(jobs))) as pool:
                futures = [(i, spec[0], pool.submit(work, spec)) for i, spec in jobs]
                for i, kind, fut in futures:
                    out = fut.result()
                    if kind == "tests":
                        scores[i] = out if out is not None else CodeScore(0.0, "batch time budget spent")
                    else:
                        io_results.setdefault(i, []).append(out if out is not None else (False, None))
        for i, results in io_results.items():
            passed = sum(1 for good, _ in results if good)
            total = len(results)
            if self.mode == "all":
                score = 1.0 if passed == total else 0.0
            else:
                score = passed / total
            first_bad = next((r for good, r in results if not good), None)
            detail = "all cases passed" if passed == total else (
                f"case failed ({first_bad.status}: {first_bad.reason or 'wrong output'})"
                if first_bad is not None else "batch time budget spent")
            scores[i] = CodeScore(score, detail, passed, total,
                                  tuple(r for _, r in results if r is not None))
        return scores  # type: ignore[return-value]


def code_tests(
    completions: Sequence[Any],
    tests: Sequence[str | None] | None = None,
    entry_point: Sequence[str | None] | None = None,
    io_cases: Sequence[Any] | None = None,
    *,
    mode: str = "fraction",
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    plain_returns: bool = True,
    block: str = "last",
    max_workers: int | None = None,
    batch_timeout_s: float | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """Fraction (``mode="fraction"``) or all-or-nothing (``mode="all"``) of tests passed.

    Rows with neither ``tests`` nor ``io_cases`` get ``None``.  Executions run in parallel on
    ``max_workers`` (default: all cores); each gets ``timeout_s``; executions not started once the
    batch budget (``batch_timeout_s``, default ``(timeout_s + 1) x waves``, at least 30 s) is spent
    score 0.  ``plain_returns`` rejects entry-point results that are not built-in data.

    >>> sol = "```python\\ndef add(a, b):\\n    return a + b\\n```"
    >>> code_tests([sol, "def add(a, b): return 0", "no code"],
    ...            tests=["assert add(1, 2) == 3\\nassert add(2, 2) == 4"] * 2 + [None],
    ...            entry_point=["add", "add", None])
    [1.0, 0.0, None]
    >>> code_tests(["print(sum(map(int, input().split())))"], io_cases=[[{"stdin": "1 2", "stdout": "3\\n"}]])
    [1.0]
    """
    n = len(completions)
    for name, col in (("tests", tests), ("entry_point", entry_point), ("io_cases", io_cases)):
        if col is not None and len(col) != n:
            raise ValueError(f"column {name!r} has {len(col)} rows but there are {n} completions")
    batch = _Batch(mode, timeout_s, memory_mb, plain_returns, block, max_workers, batch_timeout_s)
    return [s.score for s in batch.run(completions, tests, entry_point, io_cases)]
