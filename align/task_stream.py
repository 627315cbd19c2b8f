"""Training prompts that never run out: seeded, endless streams of generated tasks.

GRPO wants fresh problems every step from the same distribution as the held-out set, so its training reward is
an unbiased estimate of held-out reward.  A stream draws problems with the generators that built ``data/`` (same
difficulty knobs), skips every prompt of the files it is told to avoid (the held-out and validation sets), and
never yields the same prompt twice.  A seed fixes the stream exactly.

The validation split (``data/math/validation.jsonl``) comes from its own stream, disjoint from the shipped
train and held-out files: recipe settings are chosen on it, never on the held-out set.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Iterator
from pathlib import Path

from align.data import DataError, load_rows, write_jsonl
from align.tasks_code import code_task, check_row
from align.tasks_math import MathConfig, math_problem

KINDS = ("math", "code")


def prompts_of(paths: list[str | Path], kind: str) -> set[str]:
    """Every prompt in ``paths`` (rows of ``kind``): the set a stream must avoid."""
    return {row["prompt"] for p in paths for row in load_rows(p, kind)}


def task_stream(kind: str, seed: int, exclude: set[str] = frozenset(), math_config: MathConfig = MathConfig(),
                io_share: float = 0.25, max_misses: int = 100_000) -> Iterator[dict]:
    """Endless distinct rows of ``kind`` (``math`` or ``code``), none of whose prompts is in ``exclude``.

    ``max_misses`` consecutive draws that are excluded or already seen end the stream with a ``DataError``:
    the templated space is finite, and a stream that can no longer find new problems should say so, not spin.
    """
    if kind not in KINDS:
        raise DataError(f"cannot generate {kind!r} tasks; generated kinds: {', '.join(KINDS)}")
    rng = random.Random(f"{kind}-stream:{seed}")
    seen = set(exclude)
    misses = 0
    while True:
        if kind == "math":
            row = math_problem(rng, math_config)
        else:
            row = code_task(rng, io=rng.random() < io_share)
        if row["prompt"] in seen:
            misses += 1
            if misses >= max_misses:
                raise DataError(f"the {kind} stream (seed {seed}) found no new problem in {max_misses} draws; "
                                f"{len(seen)} prompts seen or excluded")
            continue
        misses = 0
        seen.add(row["prompt"])
        if kind == "code":
            check_row(row)  # a reference that fails its own tests would reward the wrong thing
        yield row


def take(stream: Iterator[dict], n: int) -> list[dict]:
    """The next ``n`` rows (no more are drawn: the stream goes on where this stops)."""
    return list(itertools.islice(stream, n))


def build_validation(out: str | Path, avoid: list[str | Path], n: int = 200, seed: int = 0,
                     math_config: MathConfig = MathConfig(), force: bool = False) -> Path:
    """Write ``n`` math problems disjoint from every file in ``avoid`` (train, held-out) to ``out``; an existing
    ``out`` is kept unless ``force``."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass force=True (--force) to replace it")
    stream = task_stream("math", seed=10_000 + seed, exclude=prompts_of(avoid, "math"), math_config=math_config)
    rows = take(stream, n)
    tmp = out.with_suffix(".jsonl.tmp")
    write_jsonl(tmp, rows)
    tmp.replace(out)
    return out


def math_config_of(options: dict) -> MathConfig:
    """``MathConfig`` from a recipe's ``math_config`` mapping, naming the key that does not exist."""
    names = {f.name for f in dataclasses.fields(MathConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise DataError(f"unknown math_config key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    try:
        return MathConfig(**options)
    except ValueError as e:
        raise DataError(f"math_config: {e}") from None
