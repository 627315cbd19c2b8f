"""Held-out math metrics every training stage writes to ``metrics.json``.

``heldout_math_accuracy``: greedy exact match (via the math verifier) on the held-out set.
``heldout_math_pass1``: mean correctness of ``samples`` completions per problem at the recipe's temperature.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from align.data import load_rows
from align.generation import make_engine, sample

log = logging.getLogger(__name__)


def heldout_math(model, tokenizer, eval_cfg, seed: int, backend: str = "engine", engine=None,
                 progress: bool = True) -> dict:
    """Greedy accuracy and sampled pass@1 of ``model`` (or of ``engine``, an engine already holding the policy)."""
    from rewards.math import math_accuracy

    rows = load_rows(eval_cfg.heldout_math, "math", limit=eval_cfg.limit)
    prompts = [r["prompt"] for r in rows]
    answers = [r["answer"] for r in rows]
    if backend == "engine" and engine is None:
        engine = make_engine(model)   # one engine serves both passes
    greedy = sample(model, tokenizer, prompts, n=1, temperature=0.0, max_new_tokens=eval_cfg.max_new_tokens,
                    seed=seed, backend=backend, batch_size=eval_cfg.batch_size, engine=engine, progress=progress)
    greedy_scores = math_accuracy([g[0] for g in greedy], answer=answers)
    sampled = sample(model, tokenizer, prompts, n=eval_cfg.samples, temperature=eval_cfg.temperature,
                     max_new_tokens=eval_cfg.max_new_tokens, seed=seed + 1, backend=backend,
                     batch_size=eval_cfg.batch_size, engine=engine, progress=progress)
    flat = [c for group in sampled for c in group]
    flat_answers = [a for a in answers for _ in range(eval_cfg.samples)]
    sampled_scores = math_accuracy(flat, answer=flat_answers)
    out = {
        "heldout_math_accuracy": _mean(greedy_scores),
        "heldout_math_pass1": _mean(sampled_scores),
        "heldout_math_problems": len(rows),
        **heldout_footing(eval_cfg, seed),
    }
    log.info("held-out math: greedy accuracy %.3f, pass@1 (T=%.2f, %d samples) %.3f over %d problems",
             out["heldout_math_accuracy"], eval_cfg.temperature, eval_cfg.samples, out["heldout_math_pass1"],
             len(rows))
    return out


def heldout_footing(eval_cfg, seed: int) -> dict:
    """How held-out scores are taken (problems, samples, temperature, token budget, seed): two runs' scores compare
    only when these match. Recorded in ``metrics.json`` next to the scores."""
    return {
        "heldout_math_file": str(eval_cfg.heldout_math),
        "heldout_math_limit": eval_cfg.limit,
        "heldout_math_samples": eval_cfg.samples,
        "heldout_math_temperature": eval_cfg.temperature,
        "heldout_math_max_new_tokens": eval_cfg.max_new_tokens,
        "heldout_math_seed": seed,
    }


def _mean(scores: list[float | None]) -> float:
    vals = [s for s in scores if s is not None]
    return sum(vals) / len(vals) if vals else 0.0


def write_metrics(out_dir: Path, metrics: dict) -> Path:
    path = Path(out_dir) / "metrics.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
