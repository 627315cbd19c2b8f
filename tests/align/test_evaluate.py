"""``align eval``: the pass@k estimator, the scoring/aggregation path with fixed completions (known answers),
HumanEval/GSM8K-format files, and one real engine run on a micro SFT model."""

import json
from math import comb

import pytest

from align.cli import main as align_main
from align.data import load_rows
from align.evaluate import EvalError, evaluate, pass_at_k


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pass_at_k_hand_values_and_closed_form():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - comb(3, 2) / comb(5, 2)) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0 and pass_at_k(5, 5, 1) == 1.0   # n - c < k: every draw holds a correct one
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    assert 0.0 < pass_at_k(10_000, 3, 100) < 1.0   # large n stays finite
    with pytest.raises(ValueError, match="k=3 must be between 1 and the number of samples n=2"):
        pass_at_k(2, 1, 3)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(2, 3, 1)
    import doctest

    import align.evaluate

    assert doctest.testmod(align.evaluate).failed == 0


def _stub(completions_by_prompt: dict[str, list[str]], calls: list | None = None):
    """A sampler that returns fixed completions per prompt, so correctness is known."""

    def generate(prompts, *, n, temperature, max_new_tokens, seed):
        if calls is not None:
            calls.append(dict(n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed))
        return [completions_by_prompt[p][:n] for p in prompts]

    return generate


def test_scoring_and_aggregation_with_fixed_completions(tmp_path):
    math = _jsonl(tmp_path / "math.jsonl", [{"prompt": "2+2?", "answer": "4"}, {"prompt": "3*3?", "answer": "9"}])
    code = _jsonl(tmp_path / "code.jsonl", [
        {"prompt": "Write add(a, b).", "tests": "assert add(1, 2) == 3\nassert add(0, 0) == 0", "entry_point": "add"},
        {"prompt": "Echo the input doubled.", "io_cases": [{"stdin": "4\n", "stdout": "8\n"}]}])
    good_add, half_add = "```python\ndef add(a, b):\n    return a + b\n```", "def add(a, b):\n    return 3"
    fixed = {
        # problem 1: 2 of 5 correct, problem 2: none
        "2+2?": ["\\boxed{4}", "\\boxed{5}", "so \\boxed{4}", "7", "\\boxed{3}"],
        "3*3?": ["\\boxed{6}"] * 5,
        # one passes all tests; one passes one of two asserts, which is wrong in all-or-nothing scoring
        "Write add(a, b).": [good_add, half_add, half_add, "no code", half_add],
        "Echo the input doubled.": ["print(int(input()) * 2)"] * 4 + ["print(8 + 1)"],
    }
    calls = []
    out = tmp_path / "res"
    report = evaluate(tmp_path / "unused", ["math", "code"], [1, 2, 5], n=5, temperature=0.7, max_new_tokens=32,
                      files={"math": str(math), "code": str(code)}, out=out, seed=3, generate=_stub(fixed, calls))
    assert calls == [dict(n=5, temperature=0.7, max_new_tokens=32, seed=3)] * 2
    m, c = report["tasks"]["math"], report["tasks"]["code"]
    assert m["correct_per_problem"] == [2, 0] and c["correct_per_problem"] == [1, 4]
    assert m["pass_at_k"]["pass@1"] == pytest.approx((0.4 + 0.0) / 2)
    assert m["pass_at_k"]["pass@2"] == pytest.approx((0.7 + 0.0) / 2)
    assert m["pass_at_k"]["pass@5"] == pytest.approx(0.5)
    assert c["pass_at_k"]["pass@1"] == pytest.approx((0.2 + 0.8) / 2)
    assert c["pass_at_k"]["pass@2"] == pytest.approx(((1 - comb(4, 2) / comb(5, 2)) + 1.0) / 2)
    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["tasks"]["math"]["problems"] == 2 and on_disk["tasks"]["math"]["k"] == [1, 2, 5]
    md = (out / "eval.md").read_text()
    assert "| task | problems | pass@1 | pass@2 | pass@5 |" in md and "| math | 2 | 0.2000 | 0.3500 | 0.5000 |" in md
    assert not [p for p in out.iterdir() if p.name not in ("eval.json", "eval.md")]  # no temp files left


def test_humaneval_and_gsm8k_files_score_canonical_solutions_as_correct(tmp_path):
    humaneval = _jsonl(tmp_path / "he.jsonl", [
        {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n",
         "canonical_solution": "    return a + b\n", "entry_point": "add",
         "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"},
        {"task_id": "HumanEval/1", "prompt": "def rev(s: str) -> str:\n", "canonical_solution": "    return s[::-1]\n",
         "entry_point": "rev", "test": "def check(candidate):\n    assert candidate('ab') == 'ba'\n"}])
    gsm8k = _jsonl(tmp_path / "gsm.jsonl", [
        {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "A box holds 1,200 pens; 200 are sold. How many remain?", "answer": "1200-200=1000\n#### 1,000"}])
    # The canonical solutions, as the converted rows present them to the policy.
    canonical = {r["prompt"]: [r["solution"]] for r in load_rows(humaneval, "code") + load_rows(gsm8k, "math")}
    report = evaluate(tmp_path / "unused", None, [1], n=1, files={"humaneval": str(humaneval), "gsm8k": str(gsm8k)},
                      out=tmp_path / "res", generate=_stub(canonical))
    assert list(report["tasks"]) == ["gsm8k", "humaneval"]   # the files pick the tasks
    for task in ("gsm8k", "humaneval"):
        assert report["tasks"][task]["problems"] == 2 and report["tasks"][task]["pass_at_k"] == {"pass@1": 1.0}
    wrong = {p: ["\\boxed{0}" if "apples" in p or "pens" in p else "def add(a, b): return 0"] for p in canonical}
    report = evaluate(tmp_path / "unused", "humaneval,gsm8k", "1", n=1, files={"humaneval": str(humaneval),
                      "gsm8k": str(gsm8k)}, out=tmp_path / "res", generate=_stub(wrong))
    assert all(t["pass_at_k"]["pass@1"] == 0.0 for t in report["tasks"].values())


def test_bad_arguments_fail_before_any_work(tmp_path, capsys):
    stub = _stub({})
    with pytest.raises(EvalError, match="unknown task 'poetry'; choose from math, code, gsm8k, humaneval"):
        evaluate(tmp_path, "math,poetry", [1], n=1, generate=stub)
    with pytest.raises(EvalError, match="k=8 > n=4"):
        evaluate(tmp_path, "math", [1, 8], n=4, generate=stub)
    with pytest.raises(EvalError, match="task 'humaneval' needs a data file: --humaneval FILE"):
        evaluate(tmp_path, "humaneval", [1], n=1, generate=stub)
    with pytest.raises(EvalError, match="data file not found: .*nope.jsonl"):
        evaluate(tmp_path, "math", [1], n=1, files={"math": str(tmp_path / "nope.jsonl")}, generate=stub)
    assert align_main(["eval", "--model", str(tmp_path / "missing"), "--n", "2", "--k", "1"]) == 2
    assert f"model folder not found: {tmp_path / 'missing'}" in capsys.readouterr().err
    assert align_main(["eval", "--model", str(tmp_path), "--k", "1,x"]) == 2
    assert "--k must be comma-separated integers" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_align_eval_on_micro_sft_model_writes_results(micro_sft_dir, tmp_path, capsys):
    sft = micro_sft_dir
    out = tmp_path / "eval"
    assert align_main(["eval", "--model", str(sft), "--tasks", "math,code", "--limit", "4", "--n", "2", "--k", "1,2",
                       "--max-new-tokens", "16", "--out", str(out), "--seed", "1"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["model"] == str(sft) and report["k"] == [1, 2]
    assert report["sampling"] == {"n": 2, "temperature": 0.8, "top_p": 1.0, "max_new_tokens": 16, "seed": 1,
                                  "backend": "engine"}
    for task in ("math", "code"):
        res = report["tasks"][task]
        assert res["problems"] == 4 and res["n"] == 2 and res["k"] == [1, 2] and res["seed"] == 1
        assert set(res["pass_at_k"]) == {"pass@1", "pass@2"}
        assert all(0.0 <= v <= 1.0 for v in res["pass_at_k"].values())
        assert res["pass_at_k"]["pass@1"] <= res["pass_at_k"]["pass@2"]
    md = (out / "eval.md").read_text()
    assert "| math | 4 |" in md and "| code | 4 |" in md and md in capsys.readouterr().out


def test_sampling_gives_each_prompt_its_own_random_numbers():
    """The same prompt twice in one call must not get the same samples: a shared seed would tie sample i of every
    prompt together (all right or all wrong at once) and make pass@k far noisier than its sample count says."""
    import torch

    from align.generation import sample
    from align.model import build_model, load_tokenizer
    from .conftest import MICRO_MODEL, ROOT

    tokenizer = load_tokenizer(str(ROOT / "data/tokenizer"))
    model = build_model("tiny", None, tokenizer, torch.float32, 0, dict(MICRO_MODEL))   # random: high entropy
    a, b = sample(model, tokenizer, ["What is 2 + 2?"] * 2, n=3, temperature=1.0, max_new_tokens=12, seed=5,
                  progress=False)
    assert a != b
    again = sample(model, tokenizer, ["What is 2 + 2?"] * 2, n=3, temperature=1.0, max_new_tokens=12, seed=5,
                   progress=False)
    assert again == [a, b]   # still reproducible from the one seed
