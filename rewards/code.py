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
    the original builtins, after undoing the solution's changes to shared modules (fake
    ``sys.modules`` entries, patched attributes), (3) counts every ``assert`` (instrumented here,
    outside the sandbox) through counters that refuse callers other than the tests' own code, (4)
    rejects return values that are not genuine built-in data (an object whose ``__eq__`` always says
    True cannot pass), and (5) reports ``<nonce> done <passed> <failed> <total>`` through a private
    duplicate of the real stdout only after the last test.  The nonce is random per call and
    reaches the harness on stdin (never in a file, argv or the environment); while untrusted code
    runs it sits only in a pipe.  No report with the right nonce means 0.

    Residual risk, stated plainly: code in the same interpreter can in principle introspect the
    harness deeply enough (closure cells, file descriptors, ``ctypes``) to forge a report.  The
    hostile-program tests cover the one-line versions of that; the sandbox bounds what a cleverer
    one buys to a wrong reward, never an escape.
"""

from __future__ import annotations

import ast
import base64
import concurrent.futures as cf
import functools
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Sequence

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
    import builtins, collections
    # Captured before any untrusted code runs.
    write, read, exit_, dup2, pipe, close = os.write, os.read, os._exit, os.dup2, os.pipe, os.close
    type_, id_, callable_, all_, len_, exec_, compile_ = type, id, callable, all, len, exec, compile
    isinstance_, ModuleType, import_ = isinstance, type(os), __import__
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

    real_modules = sys.modules
    modules = dict(real_modules)
    module_dicts = {k: dict(m.__dict__) for k, m in modules.items() if m is not None}
    orig_builtins = dict(builtins.__dict__)
    sol_ns = {"__name__": "__solution__", "__builtins__": builtins}
    try:
        exec_(compile_(sol_src, "solution.py", "exec"), sol_ns)
    except BaseException_:
        verdict(b"solution_error", static)
    # Undo what the solution did to shared modules: overwritten attributes (sys.modules itself
    # included) are restored, modules it added (possibly fakes) are forgotten so the tests import
    # genuine ones, and replaced entries are put back.
    for k, saved in module_dicts.items():
        d = modules[k].__dict__
        for attr, value in saved.items():
            if d.get(attr, d) is not value:
                d[attr] = value
    for k in [k for k in real_modules if k not in modules]:
        del real_modules[k]
    real_modules.update(modules)

    tg = {"__name__": "__tests__", "__builtins__": dict(orig_builtins)}
    for k, v in sol_ns.items():  # helpers the tests may use (e.g. a paired encode/decode)
        if k in orig_builtins or k.startswith("__"):
            continue
        if isinstance_(v, ModuleType):
            try:
                import_(v.__name__)  # a genuine copy, never the solution's object
                v = real_modules[v.__name__]
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


# Runs inside the sandbox as main.py for io_cases rows: each case in a fresh fork of this
# pristine process (no interpreter start-up per case), stdin from case<i>.in, stdout to a file.
# Nothing here is secret: the expected outputs never enter the sandbox.  Lean imports on purpose.
_IO_HARNESS = r'''
import atexit, binascii, builtins, io, os, signal, sys, time

def run_case(code, stdin_path, stdout_path):
    os.setpgid(0, 0)
    fd = os.open(stdin_path, os.O_RDONLY)
    os.dup2(fd, 0)
    fd2 = os.open(stdout_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd2, 1)
    os.close(fd)
    os.close(fd2)
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8")
    sys.argv = ["solution.py"]
    status = 0
    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback
        traceback.print_exc()
        status = 1
    # What the interpreter does at exit: wait for threads, run atexit, flush.
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        status = status or 1
    os._exit(status & 0xFF)

def main():
    here = os.path.dirname(os.path.abspath(__file__))
    n, timeout, cap = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    with open(os.path.join(here, "solution.py"), encoding="utf-8") as f:
        source = f.read()
    try:
        code = compile(source, "solution.py", "exec")
    except BaseException:
        import traceback
        traceback.print_exc()
        code = None
    lines = []
    for i in range(n):
        if code is None:
            lines.append("error 1 0 ")
            continue
        out_path = f".case{i}.out"
        pid = os.fork()
        if pid == 0:
            run_case(code, os.path.join(here, f"case{i}.in"), out_path)
        try:
            os.setpgid(pid, pid)  # also done by the child: no window where the group is unknown
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        status = None
        while status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
            elif time.monotonic() >= deadline:
                break
            else:
                time.sleep(0.002)
        try:
            os.killpg(pid, signal.SIGKILL)  # whatever the case left behind in its group
        except OSError:
            pass
        if status is None:
            os.waitpid(pid, 0)
            kind, code_ = "timeout", -1
        elif os.WIFSIGNALED(status):
            kind, code_ = "killed", -os.WTERMSIG(status)
        else:
            code_ = os.WEXITSTATUS(status)
            kind = "ok" if code_ == 0 else "error"
        try:
            with open(out_path, "rb") as f:
                out = f.read(cap + 1)
            os.unlink(out_path)
        except OSError:
            out = b""
        b64 = binascii.b2a_base64(out[:cap], newline=False).decode()
        lines.append(f"{kind} {code_} {int(len(out) > cap)} {b64}")
    sys.stdout.write(f"\nIO-RESULTS {n}\n" + "\n".join(lines) + "\n")
    sys.stdout.flush()

main()
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
        why = ("harness tampering detected" if result.exit_code == 3 else
               f"no harness report ({result.status}: {result.reason or 'exit'})")
        return CodeScore(0.0, why, results=(result,))
    state, passed, failed, total = v
    if mode == "all":
        score = 1.0 if state == "done" and failed == 0 else 0.0
    else:
        score = passed / total if total else (1.0 if state == "done" else 0.0)
    return CodeScore(score, state, passed, total, (result,))


def _io_report(stdout: str, n: int) -> list[tuple[str, bool, str]] | None:
    """(status, truncated, stdout) per case from the io harness's last report, if well formed."""
    lines = stdout.split("\n")
    for k in range(len(lines) - 1, -1, -1):
        if lines[k] != f"IO-RESULTS {n}" or len(lines) < k + 1 + n:
            continue
        out = []
        for line in lines[k + 1 : k + 1 + n]:
            parts = line.split(" ")
            if len(parts) != 4:
                return None
            try:
                text = base64.b64decode(parts[3], validate=True).decode("utf-8", "replace")
            except ValueError:
                return None
            out.append((parts[0], parts[2] == "1", text))
        return out
    return None


def _run_io(code, cases, mode, limits) -> CodeScore:
    """All cases of one row in one sandbox; stdout is compared here, outside it."""
    per_case = limits["timeout_s"]
    cap = max(max(1 << 16, 2 * len(str(c.get("stdout") or "")) + 1024) for c in cases)
    inputs = {f"case{i}.in": str(c.get("stdin") or "") for i, c in enumerate(cases)}
    result = run_python(
        _IO_HARNESS,
        files={"solution.py": code, **inputs},
        args=(str(len(cases)), repr(per_case), str(cap)),
        timeout_s=per_case * len(cases) + 1.0,
        cpu_s=per_case,
        memory_mb=limits["memory_mb"],
        max_output_bytes=len(cases) * (cap * 4 // 3 + 64) + (1 << 16),
    )
    report = _io_report(result.stdout, len(cases))
    if report is None:
        return CodeScore(0.0, f"no io harness report ({result.status}: {result.reason or 'exit'})",
                         0, len(cases), (result,))
    passed, first_bad = 0, None
    for case, (status, truncated, out) in zip(cases, report):
        good = status == "ok" and not truncated and _normalise(out) == _normalise(str(case.get("stdout") or ""))
        passed += good
        if not good and first_bad is None:
            first_bad = status if status != "ok" else "wrong output"
    total = len(cases)
    score = (1.0 if passed == total else 0.0) if mode == "all" else passed / total
    detail = "all cases passed" if passed == total else f"case failed ({first_bad})"
    return CodeScore(score, detail, passed, total, (result,))


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
                jobs.append((i, ("io", code, cases)))
        # Rows whose jobs have not started when the budget is spent score 0.
        slots = sum(len(spec[2]) if spec[0] == "io" else 1 for _, spec in jobs)
        waves = -(-slots // self.max_workers) if jobs else 0
        budget = self.batch_timeout_s or max(30.0, (self.timeout_s + 1.0) * waves)
        deadline = time.monotonic() + budget

        def work(spec):
            limits = self._limits(deadline)
            if limits is None:
                return CodeScore(0.0, "batch time budget spent")
            if spec[0] == "tests":
                _, code, t, ep = spec
                return _run_tests(code, t, ep, self.mode, self.plain_returns, limits)
            return _run_io(spec[1], spec[2], self.mode, limits)

        if jobs:
            with cf.ThreadPoolExecutor(max_workers=min(self.max_workers, len(jobs))) as pool:
                futures = [(i, pool.submit(work, spec)) for i, spec in jobs]
                for i, fut in futures:
                    scores[i] = fut.result()
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
    scores = batch.run(completions, tests, entry_point, io_cases)
    log_metric = kwargs.get("log_metric")  # TRL's GRPOTrainer passes it to reward functions
    runs = [r for s in scores for r in s.results]
    if callable(log_metric) and runs:
        log_metric("code_tests/timeout_frac", sum(r.status == "timeout" for r in runs) / len(runs))
    return [s.score for s in scores]
