"""``align eval``: pass@k on held-out math and code, sampled with the MLA engine and scored by the rewards.

For every problem ``n`` completions are sampled; ``c`` of them are correct (math: the verifier's exact match,
``rewards.math.math_accuracy``; code: every test passes, ``rewards.code.code_tests`` in all-or-nothing mode).
pass@k is the unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)``, averaged over problems.

Tasks (``--tasks``):

* ``math``: ``{"prompt", "answer"}`` rows, default ``data/math/heldout.jsonl`` (``--math FILE``)
* ``code``: ``{"prompt", "tests", "entry_point"}`` or ``{"prompt", "io_cases"}`` rows, default
  ``data/code/heldout.jsonl`` (``--code FILE``)
* ``gsm8k``: GSM8K-format jsonl (``question``, ``answer`` ending in ``#### N``), ``--gsm8k FILE``
* ``humaneval``: HumanEval-format jsonl (``task_id, prompt, test, entry_point``), ``--humaneval FILE``

Results go to ``eval.json`` and ``eval.md`` in ``--out`` (default ``<model>/eval``), each written to a temp file
and renamed into place.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from align.data import load_rows

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Task:
    name: str
    kind: str               # row schema for align.data.load_rows: "math" or "code"
    default: str | None     # data file when none is given; None: the file must be given


TASKS = {
    "math": Task("math", "math", "data/math/heldout.jsonl"),
    "code": Task("code", "code", "data/code/heldout.jsonl"),
    "gsm8k": Task("gsm8k", "math", None),
    "humaneval": Task("humaneval", "code", None),
}
DEFAULT_TASKS = ("math", "code")

# (prompts, n=..., temperature=..., max_new_tokens=..., seed=...) -> n completions per prompt
Generate = Callable[..., list[list[str]]]


class EvalError(ValueError):
    """Arguments or inputs ``align eval`` cannot run with; the message says which and why."""


# ------------------------------------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021).

    ``1 - C(n-c, k) / C(n, k)``, computed as a product so it neither overflows nor loses precision for large n.

    >>> round(pass_at_k(5, 2, 1), 10), round(pass_at_k(5, 2, 2), 10)
    (0.4, 0.7)
    >>> pass_at_k(5, 0, 3), pass_at_k(5, 4, 2)
    (0.0, 1.0)
    """
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k takes integers, got n={n!r} c={c!r} k={k!r}")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n} c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of samples n={n}")
    if n - c < k:
        return 1.0  # every draw of k samples contains a correct one
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(correct: list[int], n: int, k: int) -> float:
    return sum(pass_at_k(n, c, k) for c in correct) / len(correct) if correct else 0.0


# ------------------------------------------------------------------------------------------------------ scoring


def score(task: Task, rows: list[dict], completions: list[list[str]]) -> list[int]:
    """Number of correct completions per problem, scored by the same reward functions GRPO trains on."""
    flat = [c for group in completions for c in group]
    per_row = [len(group) for group in completions]

    def repeat(column: list) -> list:
        return [v for v, m in zip(column, per_row) for _ in range(m)]

    if task.kind == "math":
        from rewards.math import math_accuracy

        scores = math_accuracy(flat, answer=repeat([r["answer"] for r in rows]))
    else:
        from rewards.code import code_tests

        scores = code_tests(flat, tests=repeat([r.get("tests") for r in rows]),
                            entry_point=repeat([r.get("entry_point") for r in rows]),
                            io_cases=repeat([r.get("io_cases") for r in rows]), mode="all")
    correct, i = [], 0
    for m in per_row:
        # None (not applicable) cannot happen for validated rows; counting it as wrong keeps pass@k honest.
        correct.append(sum(1 for s in scores[i:i + m] if s is not None and s >= 1.0))
        i += m
    return correct


# ----------------------------------------------------------------------------------------------------- sampling


def _device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def load_generator(model_path: str | Path, backend: str = "engine", dtype: torch.dtype = torch.float32,
                   device: str = "auto") -> Generate:
    """A sampler over the model in ``model_path`` (stage output, LoRA adapter, or exported folder)."""
    from align.checkpoint import load_trained
    from align.export import tokenizer_source
    from align.generation import sample
    from align.model import load_tokenizer

    if backend not in ("engine", "hf"):
        raise EvalError(f"unknown backend {backend!r}; choose engine or hf")
    try:
        tokenizer = load_tokenizer(tokenizer_source(model_path))
        model = load_trained(model_path, dtype)
    except (OSError, ValueError) as e:
        raise EvalError(f"cannot load model {model_path}: {e}") from e
    device = _device(device)
    engine = None
    if backend == "engine":
        from align.engine import Engine

        engine = Engine.from_model(model, device=device)  # copies the weights; the HF model is no longer needed
        model = None
    else:
        model = model.to(device)

    def generate(prompts, *, n, temperature, max_new_tokens, seed):
        return sample(model, tokenizer, prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                      seed=seed, backend=backend, engine=engine)

    return generate


# ---------------------------------------------------------------------------------------------------- evaluate


def resolve_tasks(tasks: list[str] | str | None, files: dict[str, str | None]) -> dict[Task, str]:
    """Each requested task and the file it reads; tasks given a file (``files``) are added to the list."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    extra = [name for name in ("gsm8k", "humaneval") if files.get(name)]
    names = list(tasks) if tasks else ([] if extra else list(DEFAULT_TASKS))
    names += [t for t in extra if t not in names]
    if not names:
        raise EvalError("no tasks to evaluate")
    out: dict[Task, str] = {}
    for name in names:
        if name not in TASKS:
            raise EvalError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
        task = TASKS[name]
        path = files.get(name) or task.default
        if path is None:
            raise EvalError(f"task {name!r} needs a data file: --{name} FILE")
        if not files.get(name) and not Path(path).exists() and (ROOT / path).exists():
            path = str(ROOT / path)  # the shipped default, when run from outside the repository
        if not Path(path).is_file() and path.endswith(".jsonl"):
            raise EvalError(f"task {name!r}: data file not found: {path}")
        out[task] = path
    return out


def check_ks(ks: list[int] | str, n: int) -> list[int]:
    if isinstance(ks, str):
        try:
            ks = [int(k) for k in ks.split(",") if k.strip()]
        except ValueError:
            raise EvalError(f"--k must be comma-separated integers, got {ks!r}") from None
    ks = sorted(set(ks))
    if not ks:
        raise EvalError("no k values given")
    if ks[0] < 1:
        raise EvalError(f"k must be >= 1, got {ks[0]}")
    if n < 1:
        raise EvalError(f"--n must be >= 1, got {n}")
    if ks[-1] > n:
        raise EvalError(f"k={ks[-1]} > n={n}: pass@k needs at least k samples per problem; raise --n")
    return ks


def evaluate(model_path: str | Path, tasks: list[str] | str | None = None, ks: list[int] | str = (1, 8),
             n: int = 16, temperature: float = 0.8, max_new_tokens: int = 256, files: dict | None = None,
             limit: int | None = None, out: str | Path | None = None, seed: int = 0, backend: str = "engine",
             dtype: torch.dtype = torch.float32, device: str = "auto", generate: Generate | None = None) -> dict:
    """pass@k of the model in ``model_path`` on ``tasks``; writes eval.json/eval.md to ``out`` and returns the results.

    ``files`` maps task name to data file (``{"math": ..., "humaneval": ...}``); a ``gsm8k`` or ``humaneval``
    file adds that task. ``generate`` replaces the model (e.g. a remote server): it is called as
    ``generate(prompts, n=, temperature=, max_new_tokens=, seed=)`` and returns ``n`` strings per prompt.
    """
    ks = check_ks(ks, n)
    if temperature < 0:
        raise EvalError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 and n > 1:
        log.warning("temperature 0 makes all %d samples per problem identical; pass@k is then pass@1", n)
    resolved = resolve_tasks(tasks, files or {})
    model_path = Path(model_path)
    if generate is None and not model_path.exists():
        raise EvalError(f"model folder not found: {model_path}")
    # Every data problem surfaces before the (slow) model load.
    data = {task: load_rows(path, task.kind, limit=limit) for task, path in resolved.items()}
    for task, rows in data.items():
        if not rows:
            raise EvalError(f"task {task.name!r}: no problems in {resolved[task]}")
    generate = generate or load_generator(model_path, backend, dtype, device)
    sampling = {"n": n, "temperature": temperature, "top_p": 1.0, "max_new_tokens": max_new_tokens, "seed": seed,
                "backend": backend}
    results: dict[str, dict] = {}
    for task, rows in data.items():
        t0 = time.time()
        log.info("%s: sampling %d x %d completions (T=%.2f)", task.name, len(rows), n, temperature)
        # The same seed per task keeps a task's numbers independent of which other tasks run.
        completions = generate([r["prompt"] for r in rows], n=n, temperature=temperature,
                               max_new_tokens=max_new_tokens, seed=seed)
        if len(completions) != len(rows) or any(len(c) != n for c in completions):
            raise EvalError(f"{task.name}: the sampler returned {[len(c) for c in completions]} completions for "
                            f"{len(rows)} problems x n={n}")
        correct = score(task, rows, completions)
        results[task.name] = {
            "source": str(resolved[task]), "kind": task.kind, "problems": len(rows), "n": n, "k": ks,
            "pass_at_k": {f"pass@{k}": mean_pass_at_k(correct, n, k) for k in ks},
            "correct_per_problem": correct, "model": str(model_path), "sampling": sampling, "seed": seed,
            "seconds": round(time.time() - t0, 2),
        }
        log.info("%s: %s over %d problems", task.name,
                 ", ".join(f"{k} {v:.3f}" for k, v in results[task.name]["pass_at_k"].items()), len(rows))
    report = {"model": str(model_path), "k": ks, "sampling": sampling, "limit": limit, "tasks": results}
    write_report(Path(out) if out is not None else model_path / "eval", report)
    return report


# ------------------------------------------------------------------------------------------------------ writing


def markdown(report: dict) -> str:
    s = report["sampling"]
    keys = [f"pass@{k}" for k in report["k"]]
    lines = [f"# Evaluation of `{report['model']}`", "",
             f"n={s['n']} samples per problem, temperature {s['temperature']}, top-p {s['top_p']}, "
             f"max {s['max_new_tokens']} new tokens, seed {s['seed']}, backend {s['backend']}; "
             "pass@k is the unbiased estimator (Chen et al. 2021).", "",
             "| task | problems | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name, res in report["tasks"].items():
        lines.append(f"| {name} | {res['problems']} | " + " | ".join(f"{res['pass_at_k'][k]:.4f}" for k in keys)
                     + " |")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "eval.json", json.dumps(report, indent=2) + "\n")
    _write_atomic(out / "eval.md", markdown(report))
    log.info("wrote %s and %s", out / "eval.json", out / "eval.md")


# ---------------------------------------------------------------------------------------------------------- CLI


def configure_parser(parser, command: str) -> None:
    add = parser.add_argument
    add("--model", required=True, metavar="DIR", help="stage output folder, LoRA adapter folder or exported folder")
    add("--tasks", default=None, metavar="LIST", help=f"comma-separated, from {', '.join(TASKS)} "
        "(default: math,code, or only the tasks --gsm8k/--humaneval name)")
    add("--k", default="1,8", metavar="LIST", help="comma-separated k values for pass@k (default 1,8)")
    add("--n", type=int, default=16, help="samples per problem, at least the largest k (default 16)")
    add("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    add("--max-new-tokens", type=int, default=256, metavar="N", help="generation budget per completion (default 256)")
    add("--math", default=None, metavar="FILE", help=f"math rows (default {TASKS['math'].default})")
    add("--code", default=None, metavar="FILE", help=f"code rows (default {TASKS['code'].default})")
    add("--gsm8k", default=None, metavar="FILE", help="GSM8K-format jsonl (question, answer with ####)")
    add("--humaneval", default=None, metavar="FILE", help="HumanEval-format jsonl (task_id, prompt, test, entry_point)")
    add("--limit", type=int, default=None, metavar="N", help="evaluate at most this many problems per task")
    add("--out", default=None, metavar="DIR", help="folder for eval.json and eval.md (default <model>/eval)")
    add("--seed", type=int, default=0, help="sampling seed (default 0)")
    add("--backend", choices=("engine", "hf"), default="engine",
        help="engine: the MLA engine (latent KV cache); hf: transformers generate")
    add("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
        help="dtype the model is loaded and sampled in (default float32)")
    add("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def cli_main(args) -> int:
    from align.checkpoint import DTYPES

    files = {"math": args.math, "code": args.code, "gsm8k": args.gsm8k, "humaneval": args.humaneval}
    try:
        report = evaluate(args.model, args.tasks, args.k, n=args.n, temperature=args.temperature,
                          max_new_tokens=args.max_new_tokens, files=files, limit=args.limit, out=args.out,
                          seed=args.seed, backend=args.backend, dtype=DTYPES[args.dtype], device=args.device)
    except (EvalError, FileNotFoundError) as e:
        print(f"align eval: error: {e}", file=sys.stderr)
        return 2
    print(markdown(report))
    return 0
