"""Math answer reward: extract the final answer, decide equivalence with math-verify.

Extraction (here, in pure Python, linear time): the outermost ``\\boxed{...}`` (nested braces
allowed; several *different* boxed answers is hedging and scores 0), else the last ``#### X``, else
the last "answer is X", else (optionally) the last number in the text.

Equivalence is math-verify's ``parse``/``verify`` (fractions, decimals, LaTeX, percent, units, sets,
intervals, ...) with an exact-number fallback (``Fraction``) for what it cannot parse.  sympy can
hang in C code (``9^9^9^9``) where no signal reaches it, and math-verify's own timeout relies on
``signal.alarm`` (main thread only), so every comparison runs in a small persistent pool of worker
*processes* with math-verify's timeouts switched off; a worker that overruns its budget is killed
and replaced, the item scores 0, and the caller never hangs, from any thread.  A whole batch is one
round trip; plain integer pairs ("42" vs "42") and repeated pairs never leave this process.

Gold that cannot be parsed (math-verify finds no expression and it is not a number) scores
``None``: the row is not a math row we can judge, which is not the policy's fault.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import queue
import re
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from fractions import Fraction
from typing import Any
from collections.abc import Sequence

from rewards import as_text

log = logging.getLogger(__name__)

__all__ = ["extract_answer", "verify", "math_accuracy", "warmup"]

DEFAULT_TIMEOUT_S = 5.0  # per comparison, after the worker is up
STARTUP_TIMEOUT_S = 60.0  # importing sympy on a loaded machine
MAX_ANSWER_CHARS = 1_000  # an "answer" longer than this is not an answer (and not worth sympy's time)
MAX_GOLD_CHARS = 10_000
WORKER_MEMORY_MB = 3_072  # address-space cap per worker: a runaway bignum fails instead of swapping

# --------------------------------------------------------------------------------- extraction

_BRACES = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_INT = re.compile(r"[+-]?\d+")


def boxed_spans(text: str) -> list[tuple[int, int, int]]:
    r"""``(start, content_start, content_end)`` of every outermost ``\boxed{}``/``\fbox{}``,
    nested braces handled, in one linear pass (megabyte inputs stay fast).

    >>> boxed_spans(r"x \boxed{a{b}}.")
    [(2, 9, 13)]
    """
    spans = []
    stack: list[tuple[int, int]] = []  # (macro start, content start) for boxed groups, (-1, -1) for plain
    open_boxed = 0
    for m in _BRACES.finditer(text):
        tok = m.group()
        if len(tok) == 2 and tok[0] == "\\":
            continue  # \{ or \}: a literal brace, not a group
        if tok == "{":
            stack.append((-1, -1))
        elif tok == "}":
            if not stack:
                continue
            start, content = stack.pop()
            if content >= 0:
                open_boxed -= 1
                if open_boxed == 0:
                    spans.append((start, content, m.start()))
        else:
            stack.append((m.start(), m.end()))
            open_boxed += 1
    return spans


def boxed_contents(text: str) -> list[str]:
    r"""Contents of every outermost ``\boxed{}``.

    >>> boxed_contents(r"so \boxed{\frac{1}{2}} and \boxed{\{1, 2\}}")
    ['\\frac{1}{2}', '\\{1, 2\\}']
    >>> boxed_contents(r"\boxed{unclosed")
    []
    """
    return [text[c:e] for _, c, e in boxed_spans(text)]


def _clean(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right) and len(answer) >= len(left) + len(right):
            answer = answer[len(left) : len(answer) - len(right)].strip()
    return answer.rstrip(".").strip()


def _rest_of_line(text: str, start: int) -> str:
    end = text.find("\n", start)
    return text[start : end if end >= 0 else len(text)]


def extract_answer(text: str, last_number_fallback: bool = True) -> str | None:
    """The final answer of a completion, or ``None`` (no answer, or hedging between boxed answers).

    >>> extract_answer(r"3 + 5 = 8. 8 - 2 = 6. \\boxed{6}")
    '6'
    >>> extract_answer(r"\\boxed{6} or maybe \\boxed{7}") is None
    True
    >>> extract_answer("Natalia sold 72 clips.\\n#### 72")
    '72'
    >>> extract_answer("So the answer is $\\\\frac{3}{4}$.")
    '\\\\frac{3}{4}'
    >>> extract_answer("8 - 2 = 6")
    '6'
    """
    boxed = boxed_contents(text)
    if boxed:
        distinct = {"".join(b.split()) for b in boxed}
        return _clean(boxed[-1]) if len(distinct) == 1 else None
    idx = text.rfind("####")
    if idx >= 0:
        return _clean(_rest_of_line(text, idx + 4)) or None
    idx = text.lower().rfind("answer is")
    if idx >= 0:
        answer = _clean(_rest_of_line(text, idx + 9).lstrip(" :"))
        if answer:
            return answer
    if last_number_fallback:
        last = None
        for last in _NUMBER.finditer(text):
            pass
        if last is not None:
            return last.group().rstrip(",")
    return None


def _number(s: str) -> Fraction | None:
    """Exact value of a plain number ("1,000", "-3/4", "2.50", "50%"), else ``None``."""
    s = _clean(s).replace("\\!", "").replace(" ", "")
    if len(s) > 100:
        return None
    percent = s.endswith("%") or s.endswith("\\%")
    s = s.removesuffix("\\%").removesuffix("%")
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if not re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)(/\d+)?", s):
        return None
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value / 100 if percent else value


def _fast(pred: str, gold: str) -> bool | None:
    """Decide plain-integer pairs without a worker; ``None`` when it takes math-verify."""
    p, g = pred.strip(), gold.strip()
    if _INT.fullmatch(p) and _INT.fullmatch(g):
        def norm(x: str) -> str:
            sign = "-" if x.startswith("-") else ""
            digits = x.lstrip("+-").lstrip("0") or "0"
            return ("" if digits == "0" else sign) + digits
        return norm(p) == norm(g)
    return None


# ------------------------------------------------------------------------------ worker side


def _worker_main() -> None:
    """Entry point of a verifier process: JSON lines in, JSON lines out."""
    import resource

    limit = int(sys.argv[1]) << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.disable(logging.CRITICAL)  # math-verify warns that its (signal) timeouts are off
    from functools import lru_cache

    from math_verify import parse
    from math_verify import verify as mv_verify
    from sympy import Basic, MatrixBase

    def parse_boxed(s: str) -> list:
        return parse("\\boxed{" + s + "}", parsing_timeout=None)

    @lru_cache(maxsize=1024)
    def gold_of(gold: str):
        parsed = parse_boxed(gold)
        if any(isinstance(x, (Basic, MatrixBase)) for x in parsed) or _number(gold) is not None:
            return parsed
        return None

    def decide(pred: str, gold: str) -> bool | None:
        g = gold_of(gold)
        if g is None:
            return None
        p = parse_boxed(pred)
        if p and g and mv_verify(g, p, timeout_seconds=None):
            return True
        gn, pn = _number(gold), _number(pred)
        return gn is not None and pn is not None and gn == pn

    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        req = json.loads(line)
        try:
            result = decide(req["pred"], req["gold"])
        except Exception:  # a MemoryError or sympy bug is a wrong answer, not a dead worker
            result = False
        out.write(json.dumps({"id": req["id"], "r": result}).encode() + b"\n")
        out.flush()


# ------------------------------------------------------------------------------ parent side

_BOOT = (
    "import os, sys; sys.path[:0] = sys.argv.pop(1).split(os.pathsep); "
    "from rewards.math import _worker_main; _worker_main()"
)


class _Worker:
    def __init__(self, memory_mb: int):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        # -I drops PYTHONPATH, so hand the worker the parent's import path (packages installed with --target).
        paths = os.pathsep.join([root, *(p for p in sys.path if p)])
        self.errors = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-W", "ignore", "-c", _BOOT, paths, str(memory_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors,
            start_new_session=True,  # Ctrl-C in the trainer's terminal is ours to handle, not theirs
        )
        self.out_fd = self.proc.stdout.fileno()
        self.in_fd = self.proc.stdin.fileno()
        os.set_blocking(self.out_fd, False)
        os.set_blocking(self.in_fd, False)
        self.started = time.monotonic()
        self.ready = False
        self.rbuf = b""
        self.wbuf = b""
        self.queue: collections.deque = collections.deque()  # ids sent and not answered, in order
        self.clock = 0.0  # when the item at the head of the queue started

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_tail(self) -> str:
        self.errors.seek(0)
        return self.errors.read()[-2000:].decode(errors="replace")

    def kill(self) -> None:
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.errors):
            try:
                f.close()
            except OSError:
                pass


class _Pool:
    """A few persistent verifier processes shared by all threads of this process."""

    def __init__(self, size: int, memory_mb: int = WORKER_MEMORY_MB):
        self.size = size
        self.memory_mb = memory_mb
        self.pid = os.getpid()
        self.slots: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(size):
            self.slots.put(_Worker(memory_mb))  # start all now: imports overlap with other work

    def close(self) -> None:
        while True:
            try:
                w = self.slots.get_nowait()
            except queue.Empty:
                return
            if w is not None:
                w.kill()

    def _take(self, want: int) -> list[_Worker | None]:
        taken = [self.slots.get()]
        while len(taken) < want:
            try:
                taken.append(self.slots.get_nowait())
            except queue.Empty:
                break
        return taken

    def run(self, items: list[tuple[str, str]], timeout_s: float, deadline: float) -> list[bool | None]:
        """Decide every (pred, gold); an item that overruns ``timeout_s`` (or the batch
        ``deadline``) is ``_TIMEOUT``."""
        results: list[Any] = [_TIMEOUT] * len(items)
        workers = self._take(min(self.size, len(items)))
        try:
            self._run(workers, items, results, timeout_s, deadline)
        finally:
            for w in workers:
                # Replace a killed worker at once so its start-up overlaps with the caller's work.
                self.slots.put(w if w is not None and w.alive() else _Worker(self.memory_mb))
        return results

    def _run(self, workers, items, results, timeout_s, deadline) -> None:
        chunks = [list(range(i, len(items), len(workers))) for i in range(len(workers))]
        todo: list[collections.deque] = [collections.deque(c) for c in chunks]
        sel = selectors.DefaultSelector()
        try:
            for k in range(len(workers)):
                workers[k] = self._send(sel, workers[k], todo[k], items)
            while any(w.queue for w in workers if w is not None):
                now = time.monotonic()
                if now >= deadline:
                    for k, w in enumerate(workers):
                        if w is not None and w.queue:
                            self._drop(sel, w)
                            workers[k] = None
                    return
                for k, w in enumerate(workers):
                    if w is None or not w.queue:
                        continue
                    overdue = (w.ready and now - w.clock > timeout_s) or (
                        not w.ready and now - w.started > STARTUP_TIMEOUT_S) or not w.alive()
                    if overdue:
                        if not w.ready and not w.alive():
                            raise RuntimeError("math verifier process failed to start:\n" + w.stderr_tail())
                        head = w.queue.popleft() if w.ready else None
                        if head is not None:
                            log.warning("math verification timed out after %.1fs; scored 0", timeout_s)
                        rest = [i for i in w.queue]
                        self._drop(sel, w)
                        todo[k].extendleft(reversed(rest))
                        workers[k] = self._send(sel, None, todo[k], items)
                for key, _ in sel.select(timeout=0.05):
                    w = key.data
                    if key.fd == w.in_fd:
                        self._flush(sel, w)
                    else:
                        self._read(w, results)
        finally:
            sel.close()

    def _send(self, sel, w: _Worker | None, todo: collections.deque, items) -> _Worker | None:
        if not todo:
            return w
        if w is None or not w.alive():
            if w is not None:
                w.kill()
            w = _Worker(self.memory_mb)
        lines = []
        while todo:
            i = todo.popleft()
            pred, gold = items[i]
            lines.append(json.dumps({"id": i, "pred": pred, "gold": gold}))
            w.queue.append(i)
        w.wbuf += ("\n".join(lines) + "\n").encode()
        w.clock = time.monotonic()
        sel.register(w.out_fd, selectors.EVENT_READ, w)
        sel.register(w.in_fd, selectors.EVENT_WRITE, w)
        return w

    def _flush(self, sel, w: _Worker) -> None:
        try:
            n = os.write(w.in_fd, w.wbuf[: 1 << 16])
            w.wbuf = w.wbuf[n:]
        except BlockingIOError:
            return
        except BrokenPipeError:
            w.wbuf = b""
        if not w.wbuf:
            sel.unregister(w.in_fd)

    def _read(self, w: _Worker, results) -> None:
        try:
            chunk = os.read(w.out_fd, 1 << 16)
        except BlockingIOError:
            return
        w.rbuf += chunk
        *lines, w.rbuf = w.rbuf.split(b"\n")
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:  # stray output from a library: not ours
                continue
            if msg.get("ready"):
                w.ready = True
                w.clock = time.monotonic()
                continue
            if w.queue and w.queue[0] == msg["id"]:
                w.queue.popleft()
                results[msg["id"]] = msg["r"]
                w.clock = time.monotonic()

    @staticmethod
    def _drop(sel, w: _Worker) -> None:
        for fd in (w.out_fd, w.in_fd):
            try:
                sel.unregister(fd)
            except (KeyError, ValueError):
                pass
        w.queue.clear()
        w.kill()


_TIMEOUT = object()  # a verdict that never came (scored 0, never cached)
_pool: _Pool | None = None
_pool_lock = threading.Lock()
_cache: collections.OrderedDict[tuple[str, str], bool | None] = collections.OrderedDict()
_CACHE_SIZE = 20_000


def _get_pool() -> _Pool:
    global _pool
    with _pool_lock:
        if _pool is None or _pool.pid != os.getpid():  # a forked child must not share our workers
            size = int(os.environ.get("REWARDS_MATH_WORKERS", 0)) or max(1, min(2, os.cpu_count() or 1))
            _pool = _Pool(size)
        return _pool


@atexit.register
def _shutdown() -> None:
    if _pool is not None and _pool.pid == os.getpid():
        _pool.close()


def warmup() -> None:
    """Start the verifier processes now (they take ~1 s to import sympy)."""
    _get_pool()


def _decide_many(pairs: list[tuple[str | None, Any]], timeout_s: float,
                 batch_timeout_s: float | None) -> list[bool | None]:
    """(extracted answer, gold) -> True / False / None (gold unparseable)."""
    out: list[bool | None] = [False] * len(pairs)
    pending: dict[tuple[str, str], list[int]] = {}
    for i, (pred, gold) in enumerate(pairs):
        gold = None if gold is None else str(gold)
        if gold is None or not gold.strip() or len(gold) > MAX_GOLD_CHARS:
            out[i] = None
            continue
        if pred is None or len(pred) > MAX_ANSWER_CHARS:
            pred = ""  # no answer: wrong, but only the worker can say whether gold is judgeable
        if pred:
            fast = _fast(pred, gold)
        else:  # an integer gold is certainly judgeable
            fast = False if _INT.fullmatch(gold.strip()) else None
        if fast is not None:
            out[i] = fast
            continue
        key = (pred, gold)
        with _pool_lock:
            if key in _cache:
                _cache.move_to_end(key)
                out[i] = _cache[key]
                continue
        pending.setdefault(key, []).append(i)
    if pending:
        keys = list(pending)
        budget = batch_timeout_s if batch_timeout_s is not None else max(STARTUP_TIMEOUT_S, 4 * timeout_s)
        results = _get_pool().run(keys, timeout_s, time.monotonic() + budget)
        for key, r in zip(keys, results):
            for i in pending[key]:
                out[i] = False if r is _TIMEOUT else r
            if r is not _TIMEOUT:
                with _pool_lock:
                    _cache[key] = r
                    while len(_cache) > _CACHE_SIZE:
                        _cache.popitem(last=False)
    return out


def verify(text: str, gold: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
           last_number_fallback: bool = True) -> bool:
    """Is the final answer in ``text`` equivalent to ``gold``?  Bounded by ``timeout_s`` (plus
    worker start-up on first use); safe from any thread.

    >>> verify(r"3 + 5 = 8. 8 - 2 = 6. \\boxed{6}", "6")
    True
    >>> verify(r"\\boxed{0.5}", "\\\\frac{1}{2}")
    True
    >>> verify(r"\\boxed{6} \\boxed{7}", "6")
    False
    """
    pred = extract_answer(as_text(text), last_number_fallback)
    return bool(_decide_many([(pred, gold)], timeout_s, None)[0])


def math_accuracy(
    completions: Sequence[Any],
    answer: Sequence[str | None] | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    batch_timeout_s: float | None = None,
    last_number_fallback: bool = True,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 if the completion's final answer equals the row's ``answer``, else 0.0; ``None`` for
    rows without a usable gold answer.

    >>> math_accuracy([r"\\boxed{6}", r"\\boxed{7}", "6", r"\\boxed{6}"], answer=["6", "6", "6", None])
    [1.0, 0.0, 1.0, None]
    """
    if answer is None:
        return [None] * len(completions)
    if len(answer) != len(completions):
        raise ValueError(f"column 'answer' has {len(answer)} rows but there are {len(completions)} completions")
    pairs = [(extract_answer(as_text(c), last_number_fallback), a) for c, a in zip(completions, answer)]
    decided = _decide_many(pairs, timeout_s, batch_timeout_s)
    log_metric = kwargs.get("log_metric")  # TRL's GRPOTrainer passes it to reward functions
    if callable(log_metric) and pairs:
        log_metric("math_accuracy/no_answer_frac", sum(p is None for p, _ in pairs) / len(pairs))
    return [None if d is None else float(d) for d in decided]
