"""Learned reward models: verifier-labelled pairs, TRL RewardTrainer on a micro model, and the reward function."""

import doctest
import importlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from align import recipe
from align.reward_model import check_recipe, make_pairs, split_rows  # importing registers the "rm" stage

from .conftest import ROOT, micro_grpo, run_align, write_recipe

MODEL_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
               "recipe.lock.yaml", "metrics.json", "log_history.json"}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "recipe.lock.yaml", "metrics.json", "log_history.json"}


def micro_rm(out_dir: Path, sft_dir: Path, steps: int = 30, math: int = 10, code: int = 4, **extra) -> dict:
    """A handful of prompts and one pair per prompt, trained long and fast enough to fit them."""
    raw = yaml.safe_load((ROOT / "recipes/tiny/rm.yaml").read_text())
    raw["output_dir"] = str(out_dir)
    raw["model"]["path"] = str(sft_dir)
    raw["data"]["train"][0]["limit"] = math
    raw["data"]["train"][1]["limit"] = code
    raw["pairs"].update(samples=4, max_new_tokens=24, heldout_fraction=0.3, per_prompt=1)
    raw["eval"].update(batch_size=16)
    raw["trainer"].update(max_steps=steps, save_steps=max(1, steps // 2), logging_steps=5, learning_rate=2e-3,
                          lr_scheduler_type="constant", per_device_train_batch_size=8, warmup_steps=0, report_to=[],
                          disable_tqdm=True)
    for key, value in extra.items():
        raw[key] = value
    return raw


def _files(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.is_file()}


def _read_pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _verify(pairs: list[dict], side: str) -> list[float | None]:
    from rewards.code import code_tests
    from rewards.math import math_accuracy

    out = []
    for p in pairs:
        text = p[side][0]["content"]
        if p["kind"] == "math":
            out += math_accuracy([text], answer=[p["answer"]])
        else:
            out += code_tests([text], tests=[p["tests"]], entry_point=[p["entry_point"]], io_cases=[p["io_cases"]],
                              mode="all")
    return out


def _untrained_margin(sft_dir: Path, pairs: list[dict]) -> float:
    import torch

    from align.model import load_tokenizer
    from rewards.learned import sequence_classifier

    tok = load_tokenizer(sft_dir)
    torch.manual_seed(0)
    model = sequence_classifier(sft_dir).eval()

    def score(messages):
        ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            return float(model(input_ids=torch.tensor([ids])).logits[0, 0])

    return sum(score(p["prompt"] + p["chosen"]) - score(p["prompt"] + p["rejected"]) for p in pairs) / len(pairs)


@pytest.fixture(scope="module")
def micro_rm_dir(tmp_path_factory, micro_sft_dir) -> Path:
    base = tmp_path_factory.mktemp("micro_rm")
    out = base / "rm"
    run_align("rm", "--config", write_recipe(base / "rm.yaml", micro_rm(out, micro_sft_dir)))
    return out


# ------------------------------------------------------------------------------------------------- fast checks


def test_recipe_errors_name_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    raw = micro_rm(tmp_path / "out", ROOT / "data/tokenizer")  # any existing folder: only validation runs

    def load(mutate):
        data = yaml.safe_load(yaml.safe_dump(raw))
        mutate(data)
        loaded = recipe.load("rm", write_recipe(tmp_path / "rm.yaml", data))
        check_recipe(loaded)

    with pytest.raises(recipe.RecipeError, match=r"rm\.yaml: model\.path: required"):
        load(lambda d: d["model"].update(path=None, preset="tiny"))
    with pytest.raises(recipe.RecipeError, match=r"data\.train\[0\]\.kind: 'chat' has no verifier"):
        load(lambda d: d["data"]["train"][0].update(path="data/chat/train.jsonl", kind="chat"))
    with pytest.raises(recipe.RecipeError, match=r"pairs\.heldout_fraction"):
        load(lambda d: d["pairs"].update(heldout_fraction=0.0))
    with pytest.raises(recipe.RecipeError, match=r"pairs\.nonsense: unknown key"):
        load(lambda d: d["pairs"].update(nonsense=1))
    with pytest.raises(recipe.RecipeError, match=r"trainer\.nonsense: not an option of trl\.RewardConfig"):
        load(lambda d: d["trainer"].update(nonsense=1))
    assert not (tmp_path / "out").exists()


def test_pairs_prefer_verified_samples_then_references():
    rows = [{"kind": "math", "prompt": f"q{i}", "answer": "1", "solution": f"ref{i}"} for i in range(4)]
    labelled = [
        {"right": 1.0, "wrong a": 0.0, "wrong b": 0.0},  # sampled chosen, two pairs
        {"wrong": 0.0},                                  # no correct sample: the reference stands in
        {"right": 1.0},                                  # nothing to reject
        {"wrong": 0.0},                                  # reference failed its verifier: no pair
    ]
    pairs, stats = make_pairs(rows, labelled, references_ok={1: True, 3: False}, per_prompt=2, seed=0)
    assert [(p["prompt"][0]["content"], p["chosen"][0]["content"], p["chosen_source"]) for p in pairs] == [
        ("q0", "right", "sample"), ("q0", "right", "sample"), ("q1", "ref1", "reference")]
    assert {p["rejected"][0]["content"] for p in pairs[:2]} == {"wrong a", "wrong b"}
    assert stats["pairs_from_samples"] == 2 and stats["pairs_from_references"] == 1
    assert stats["prompts_all_correct"] == 1 and stats["prompts_without_correct"] == 1
    assert pairs[0]["answer"] == "1" and pairs[0]["kind"] == "math"


def test_doctests():
    assert doctest.testmod(importlib.import_module("rewards.learned")).failed == 0


def test_split_keeps_prompts_apart():
    rows = [{"kind": "math", "prompt": str(i)} for i in range(10)]
    train, heldout = split_rows(rows, 0.3)
    assert len(heldout) == 3 and len(train) == 7
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    with pytest.raises(recipe.RecipeError, match="at least 2"):
        split_rows(rows[:1], 0.5)


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_rm_stage_writes_model_pairs_and_metrics(micro_rm_dir, micro_sft_dir):
    out = micro_rm_dir
    assert MODEL_FILES <= _files(out)
    assert not (_files(out) - MODEL_FILES - {"training_args.bin", "README.md"})
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-30"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV2ForSequenceClassification"]
    assert len(config["id2label"]) == 1  # num_labels=1: one score per sequence
    assert config["pad_token_id"] is not None
    lock = yaml.safe_load((out / "recipe.lock.yaml").read_text())
    assert lock["stage"] == "rm" and lock["recipe"]["model"]["path"] == str(micro_sft_dir)

    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["heldout_pairwise_accuracy"] <= 1.0
    assert metrics["global_step"] == 30 and metrics["recipe_sha256"] == lock["sha256"]
    assert metrics["inherited"]["stage"] == "sft"
    train, heldout = _read_pairs(out / "pairs/train.jsonl"), _read_pairs(out / "pairs/heldout.jsonl")
    assert metrics["train_pairs"] == len(train) >= 4 and metrics["heldout_pairs"] == len(heldout) >= 1
    for split, pairs in (("train", train), ("heldout", heldout)):
        assert metrics[f"{split}_pairs_from_samples"] + metrics[f"{split}_pairs_from_references"] == len(pairs)
        assert metrics[f"{split}_pairs_from_references"] == sum(p["chosen_source"] == "reference" for p in pairs)

    # Labels hold up when re-checked: every chosen passes its verifier and every rejected fails it.
    assert _verify(train + heldout, "chosen") == [1.0] * len(train + heldout)
    assert _verify(train + heldout, "rejected") == [0.0] * len(train + heldout)
    # Held-out pairs come from prompts training never saw.
    assert not {p["prompt"][0]["content"] for p in train} & {p["prompt"][0]["content"] for p in heldout}
    assert {p["kind"] for p in train + heldout} == {"math", "code"}

    # A finished run is never overwritten.
    res = run_align("rm", "--config", out / "recipe.lock.yaml", check=False)
    assert res.returncode == 2 and "holds a finished run" in res.stderr


@pytest.mark.slow
def test_reward_fn_scores_and_ranks_overfit_training_pairs(micro_rm_dir, micro_sft_dir):
    from rewards.learned import load_reward_fn

    fn = load_reward_fn(micro_rm_dir, batch_size=4)
    assert fn.__name__ == "learned_rm"
    assert load_reward_fn(str(micro_rm_dir) + "/", batch_size=8).model is fn.model  # loaded once per path
    train = _read_pairs(micro_rm_dir / "pairs/train.jsonl")
    prompts = [p["prompt"] for p in train]
    chosen = fn([p["chosen"] for p in train], prompts=prompts)
    # Plain-string prompts and completions score the same conversation as TRL's message lists.
    rejected = fn([p["rejected"][0]["content"] for p in train], prompts=[p["prompt"][0]["content"] for p in train])
    assert len(chosen) == len(rejected) == len(train) and all(isinstance(x, float) for x in chosen + rejected)
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(train)
    assert accuracy >= 0.75, (accuracy, chosen, rejected)
    # A fresh score head can rank these pairs well by chance (chosen answers look alike); it cannot separate them
    # by a wide margin, so the margin shows the ranking was learned.
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(train)
    assert margin > _untrained_margin(micro_sft_dir, train) + 1.0, margin
    metrics = json.loads((micro_rm_dir / "metrics.json").read_text())
    assert metrics["train_pairwise_accuracy"] == pytest.approx(accuracy)
    # Padding does not leak into scores: one at a time equals batched.
    single = load_reward_fn(micro_rm_dir, batch_size=1)([p["chosen"] for p in train], prompts=prompts)
    assert single == pytest.approx(chosen, abs=1e-4)
    with pytest.raises(ValueError, match="pass `prompts`"):
        fn(["x"])
    with pytest.raises(ValueError, match="no option"):
        load_reward_fn(micro_rm_dir, temperature=1.0)


@pytest.mark.slow
def test_learned_reward_in_registry_and_grpo_recipe(micro_rm_dir, micro_sft_dir, tmp_path, monkeypatch):
    from rewards.registry import combine, get_reward

    monkeypatch.chdir(ROOT)
    importlib.import_module("align.grpo")  # registers the "grpo" recipe
    fn = get_reward(f"learned:{micro_rm_dir}", batch_size=2)
    assert fn.__name__ == "learned_rm"
    raw = micro_grpo(tmp_path / "grpo", micro_sft_dir, mode="colocated")
    raw["rewards"] = [{"name": "math_accuracy", "weight": 1.0},
                      {"name": f"learned:{micro_rm_dir}", "weight": 0.5, "options": {"batch_size": 8}}]
    loaded = recipe.load("grpo", write_recipe(tmp_path / "grpo.yaml", raw))
    funcs, weights = combine([{"name": s.name, "weight": s.weight, **s.options} for s in loaded.recipe.rewards])
    assert [f.__name__ for f in funcs] == ["math_accuracy", "learned_rm"] and weights == [1.0, 0.5]
    # Called the way GRPOTrainer calls reward functions: conversational prompts and completions, every column.
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}]] * 2
    completions = [[{"role": "assistant", "content": "2 + 3 = 5. \\boxed{5}"}],
                   [{"role": "assistant", "content": "banana"}]]
    scores = funcs[1](prompts=prompts, completions=completions, completion_ids=[[1], [2]], answer=["5", "5"],
                      trainer_state=None, log_metric=lambda *a: None)
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    assert funcs[0](prompts=prompts, completions=completions, answer=["5", "5"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"rewards\[0\].*no option"):
        combine([{"name": f"learned:{micro_rm_dir}", "top_k": 3}])
    with pytest.raises(ValueError, match="cannot load the reward model: .*no reward model folder"):
        get_reward(f"learned:{tmp_path / 'missing'}")   # a recipe error (exit 2), not a crash


@pytest.mark.slow
def test_lora_reward_model_resumes_and_loads_as_reward(tmp_path, micro_sft_dir):
    from rewards.learned import load_reward_fn

    out = tmp_path / "rm"
    raw = micro_rm(out, micro_sft_dir, steps=4, math=6, code=0,
                   peft={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "o_proj"]})
    recipe_path = write_recipe(tmp_path / "rm.yaml", raw)
    run_align("rm", "--config", recipe_path)
    assert ADAPTER_FILES <= _files(out)
    pairs_before = (out / "pairs/train.jsonl").read_bytes()
    # An unfinished run (no metrics.json) continues from its last checkpoint and keeps its pairs.
    (out / "metrics.json").unlink()
    res = run_align("rm", "--config", recipe_path, "--resume", "trainer.max_steps=6")
    assert "checkpoint-4" in res.stderr and "reusing the preference pairs" in res.stderr
    assert (out / "pairs/train.jsonl").read_bytes() == pairs_before
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and 0.0 <= metrics["heldout_pairwise_accuracy"] <= 1.0
    fn = load_reward_fn(out)
    heldout = _read_pairs(out / "pairs/heldout.jsonl")
    scores = fn([p["chosen"] for p in heldout], prompts=[p["prompt"] for p in heldout])
    assert len(scores) == len(heldout) and all(isinstance(s, float) for s in scores)
    shutil.rmtree(out)
