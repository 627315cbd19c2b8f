"""Generated training prompts: disjoint from the held-out and validation sets, deterministic, never repeated."""

import pytest

from align.data import DataError, load_rows
from align.recipe import RecipeError
from align.task_stream import build_validation, prompts_of, take, task_stream
from align.tasks_math import MathConfig

from .conftest import ROOT

HELDOUT = ROOT / "data/math/heldout.jsonl"
VALIDATION = ROOT / "data/math/validation.jsonl"


def test_stream_never_yields_an_excluded_or_repeated_prompt():
    avoid = prompts_of([HELDOUT, VALIDATION], "math")
    # Without the exclusion the generator does hit held-out prompts: the check below is not vacuous.
    free = {r["prompt"] for r in take(task_stream("math", seed=1), 20_000)}
    assert free & avoid
    rows = take(task_stream("math", seed=1, exclude=avoid), 20_000)
    prompts = [r["prompt"] for r in rows]
    assert len(prompts) == len(set(prompts)) == 20_000
    assert not set(prompts) & avoid
    assert all(r["answer"] and "\\boxed" in r["solution"] for r in rows)


def test_stream_is_fixed_by_its_seed():
    a = take(task_stream("math", seed=3), 50)
    assert a == take(task_stream("math", seed=3), 50)
    assert a != take(task_stream("math", seed=4), 50)


def test_exhausted_stream_says_so(monkeypatch):
    import align.task_stream as ts

    few = [{"prompt": f"p{i}", "answer": str(i), "solution": f"\\boxed{{{i}}}"} for i in range(3)]
    monkeypatch.setattr(ts, "math_problem", lambda rng, cfg: dict(rng.choice(few)))   # a space of 3 problems
    assert len(take(task_stream("math", seed=0, max_misses=500), 3)) == 3
    with pytest.raises(DataError, match="no new problem in 500 draws"):
        take(task_stream("math", seed=0, max_misses=500), 4)


def test_unknown_kind_and_difficulty_keys_fail_clearly():
    from align.task_stream import math_config_of

    with pytest.raises(DataError, match="cannot generate 'chat'"):
        next(task_stream("chat", seed=0))
    with pytest.raises(DataError, match="unknown math_config key"):
        math_config_of({"max_step": 3})
    assert math_config_of({"max_steps": 3}) == MathConfig(max_steps=3)


def test_code_stream_rows_pass_their_own_tests():
    rows = take(task_stream("code", seed=0), 6)
    assert all(("tests" in r and r["entry_point"]) or "io_cases" in r for r in rows)


def test_shipped_validation_split_is_reproducible_and_disjoint(tmp_path):
    out = build_validation(tmp_path / "v.jsonl", [ROOT / "data/math/train.jsonl", HELDOUT], n=200, seed=0)
    assert out.read_bytes() == VALIDATION.read_bytes()    # `align data validation` rebuilds the shipped file
    with pytest.raises(FileExistsError, match="--force"):  # an existing split is never overwritten silently
        build_validation(out, [HELDOUT], n=5, seed=1)
    assert out.read_bytes() == VALIDATION.read_bytes()
    assert len(build_validation(out, [HELDOUT], n=5, seed=1, force=True).read_text().splitlines()) == 5
    val = {r["prompt"] for r in load_rows(VALIDATION, "math")}
    assert len(val) == 200
    assert not val & prompts_of([HELDOUT, ROOT / "data/math/train.jsonl"], "math")


def test_grpo_recipe_checks_generated_sources_before_any_work(tmp_path):
    import yaml

    from align import recipe as recipes
    import align.grpo  # noqa: F401  (registers the stage)

    raw = yaml.safe_load((ROOT / "recipes/tiny/grpo.yaml").read_text())
    raw["data"]["generate"][0]["exclude"].append(str(tmp_path / "missing.jsonl"))
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=r"data.generate\[0\].exclude\[2\]: file not found"):
        recipes.load("grpo", path)
    raw["data"] = {"generate": []}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match="give prompt files"):
        recipes.load("grpo", path)
