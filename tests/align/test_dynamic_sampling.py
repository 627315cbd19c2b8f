"""Dynamic sampling: groups with all-equal rewards are replaced by fresh prompts, within a bounded number of rounds."""

import itertools

import pytest
import torch

from align.dynamic_sampling import DynamicSamplingSection, GroupFilter, RewardMemo, informative
from align.recipe import RecipeError, build_dataclass

G = 4


def rows_for(answers):
    return [{"prompt": [{"role": "user", "content": f"q{a}"}], "answer": a} for a in answers for _ in range(G)]


def fake_generate(solvable):
    """Completion i of a group is right when ``solvable(answer, i)``: the filter only sees the rewards."""
    def generate(rows):
        ids = [[int(solvable(r["answer"], i % G))] for i, r in enumerate(rows)]
        return {"prompt_ids": [[1]] * len(rows), "completion_ids": ids, "logprobs": [[-0.5]] * len(rows),
                "policy_version": [0] * len(rows)}
    return generate


def decode(completion_ids):
    return [[{"role": "assistant", "content": str(ids[0])}] for ids in completion_ids]


def correct(completions, answer, **_):
    return [float(c[0]["content"] == "1") for c in completions]


def make_filter(refill_answers, max_rounds=4, funcs=(correct,)):
    cfg = DynamicSamplingSection(enabled=True, max_rounds=max_rounds)
    refill = ({"prompt": [{"role": "user", "content": f"q{a}"}], "answer": a} for a in refill_answers)
    return GroupFilter(cfg, list(funcs), [1.0] * len(funcs), refill, G)


def test_informative_groups():
    rewards = torch.tensor([1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, float("nan"), 1, 1, 1.])
    assert informative(rewards, G).tolist() == [False, True, False, False]


def test_all_equal_groups_are_refilled_with_fresh_prompts():
    # Even answers: every sample right or every sample wrong (no signal); odd answers: half right.
    solvable = lambda a, i: (a % 4 == 0) if a % 2 == 0 else i < 2   # noqa: E731
    filt = make_filter(refill_answers=itertools.count(100))
    rows, out, stats = filt.fill(rows_for([0, 2, 4, 1]), fake_generate(solvable), decode)
    answers = [r["answer"] for r in rows[::G]]
    assert len(rows) == 4 * G and len(out["completion_ids"]) == 4 * G
    assert 1 in answers and all(a % 2 == 1 for a in answers)          # only informative groups, the first kept
    assert len(set(answers)) == 4 and set(answers) - {1} <= set(range(100, 200))   # refills are fresh prompts
    assert stats["rounds"] >= 2 and stats["unfilled_groups"] == 0
    assert stats["fresh_zero_std_frac"] == 0.75
    assert stats["fresh_reward"] == pytest.approx((1 + 0 + 1 + 0.5) / 4) == stats["fresh_correct"]
    assert stats["generated_groups"] - stats["dropped_groups"] >= 4      # enough informative groups were found
    assert stats["refilled_groups"] == stats["generated_groups"] - 4      # all but the first round are refills
    # Rows and rollout output stay aligned: row j's completions are the ones generated for its prompt.
    for j in range(4):
        expect = [int(solvable(answers[j], i)) for i in range(G)]
        assert [c[0] for c in out["completion_ids"][j * G:(j + 1) * G]] == expect


def test_retry_bound_holds_and_is_reported():
    calls = []
    generate = fake_generate(lambda a, i: True)            # every group all-right: nothing is ever informative

    def counting(rows):
        calls.append(len(rows) // G)
        return generate(rows)

    filt = make_filter(refill_answers=itertools.count(100), max_rounds=3)
    rows, out, stats = filt.fill(rows_for([0, 1, 2]), counting, decode)
    assert len(calls) == 3 == stats["rounds"]
    assert stats["unfilled_groups"] == 3                    # the batch keeps its shape with dropped groups
    assert len(rows) == 3 * G and len(out["logprobs"]) == 3 * G
    assert stats["generated_groups"] == sum(calls) and stats["dropped_groups"] == sum(calls)
    assert max(calls[1:]) <= 3 * filt.cfg.max_oversample     # a refill round never asks for more than the cap


def test_refill_running_dry_ends_the_rounds():
    filt = make_filter(refill_answers=[7], max_rounds=5)
    rows, _, stats = filt.fill(rows_for([0, 2]), fake_generate(lambda a, i: True), decode)
    assert stats["rounds"] == 2 and stats["unfilled_groups"] == 2 and len(rows) == 2 * G


def test_reward_memo_scores_each_batch_once():
    seen = []

    def counted(completions, answer, **_):
        seen.append(len(completions))
        return correct(completions, answer)

    memo = RewardMemo()
    fn = memo.wrap(counted)
    filt = make_filter(refill_answers=itertools.count(100), funcs=(fn,))
    rows, out, _ = filt.fill(rows_for([1, 3]), fake_generate(lambda a, i: i < 2), decode)
    n_calls = len(seen)
    again = fn(decode(out["completion_ids"]), answer=[r["answer"] for r in rows], trainer_state=None)
    assert len(seen) == n_calls and again == [1.0, 1.0, 0.0, 0.0] * 2
    fn(decode(out["completion_ids"]), answer=[r["answer"] + 1 for r in rows])   # other columns: scored anew
    assert len(seen) == n_calls + 1


def test_bad_settings_fail_in_the_recipe():
    with pytest.raises(RecipeError, match="max_rounds"):
        build_dataclass(DynamicSamplingSection, {"enabled": True, "max_rounds": 0}, "dynamic_sampling")
