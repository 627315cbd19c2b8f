"""The reward-model stage: TRL ``RewardTrainer`` on preference pairs labelled by the math and code verifiers.

DeepSeek-V2's RL scores math and code with verifiers and also trains reward models on that feedback.  This stage
does the second part at any size: ``setup`` samples ``pairs.samples`` completions per prompt from the SFT policy
with the MLA/MoE engine, labels each with the verifier (``math_accuracy`` / ``code_tests``), and pairs a correct
completion (chosen) with an incorrect one of the same prompt (rejected); ``train`` fits a
``DeepseekV2ForSequenceClassification`` (one output, trunk from the SFT checkpoint) with the Bradley-Terry loss;
``save`` writes the reward model (or LoRA adapter) and tokenizer into ``output_dir``; ``evaluate`` scores held-out
pairs (prompts never seen in training) and writes ``metrics.json`` with ``heldout_pairwise_accuracy``.

A small policy often solves few prompts.  When no sample of a prompt is correct, the row's reference ``solution``
(checked by the same verifier) stands in as chosen; ``metrics.json`` counts pairs by where their chosen came from.
The pairs are written to ``pairs/train.jsonl`` and ``pairs/heldout.jsonl`` (TRL's conversational preference format
plus the verifier columns), and reused by ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from align import recipe as recipes
from align.chat import prompt_messages
from align.checkpoint import DTYPES, load_trained
from align.data import load_rows
from align.metrics import write_metrics
from align.model import count_parameters, load_tokenizer
from align.recipe import DataSource, ModelSection, PeftSection, RecipeError
from align.stage import claim_output_dir, lineage, process_group, save_final, train_or_resume, write_json

log = logging.getLogger(__name__)

PAIRS_DIR = "pairs"
# What the verifiers need from a row, kept with each pair so anyone can re-check its labels.
VERIFIER_COLUMNS = ("answer", "tests", "entry_point", "io_cases")
VERIFY_CHUNK = 256  # sandboxed executions per progress-bar step


@dataclasses.dataclass
class RMData:
    train: list[DataSource] = dataclasses.field(
        metadata={"help": "prompt sources: math rows (`answer`) and code rows (`tests`+`entry_point` or `io_cases`); "
                      "a `solution` column is the fallback chosen answer"})


@dataclasses.dataclass
class PairsSection:
    samples: int = dataclasses.field(default=8, metadata={"help": "completions sampled per prompt"})
    temperature: float = dataclasses.field(default=1.0, metadata={"help": "sampling temperature"})
    max_new_tokens: int = dataclasses.field(default=64, metadata={"help": "generation budget per completion"})
    heldout_fraction: float = dataclasses.field(
        default=0.2, metadata={"help": "share of prompts whose pairs are held out for pairwise accuracy"})
    per_prompt: int = dataclasses.field(default=2, metadata={"help": "at most this many pairs per prompt"})
    reference_fallback: bool = dataclasses.field(
        default=True, metadata={"help": "use the row's verified `solution` as chosen when no sample is correct"})
    code_timeout_s: float = dataclasses.field(default=5.0, metadata={"help": "time limit per code execution"})


@dataclasses.dataclass
class RMEval:
    batch_size: int = dataclasses.field(default=32, metadata={"help": "sequences scored per forward pass"})
    train_limit: int | None = dataclasses.field(
        default=256, metadata={"help": "also report pairwise accuracy on at most this many training pairs"})


@dataclasses.dataclass
class RMRecipe:
    output_dir: str
    seed: int
    model: ModelSection
    data: RMData
    pairs: PairsSection = dataclasses.field(default_factory=PairsSection)
    eval: RMEval = dataclasses.field(default_factory=RMEval)
    trainer: dict = dataclasses.field(default_factory=dict, metadata={"help": "passed to trl.RewardConfig"})
    peft: PeftSection | None = None


recipes.register_stage("rm", RMRecipe, "RewardConfig")


def check_recipe(loaded: recipes.Loaded) -> None:
    """What the dataclass types cannot say; fails before any work, naming the file and key."""
    r, where = loaded.recipe, loaded.source
    if not r.model.path:
        raise RecipeError(f"{where}: model.path: required for the rm stage (the SFT folder the reward model "
                          "starts from); `model.preset` cannot be used here")
    for i, src in enumerate(r.data.train):
        if src.kind not in ("math", "code"):
            raise RecipeError(f"{where}: data.train[{i}].kind: {src.kind!r} has no verifier; use math or code rows")
    p = r.pairs
    if p.samples < 1:
        raise RecipeError(f"{where}: pairs.samples: must be at least 1, got {p.samples}")
    if p.per_prompt < 1:
        raise RecipeError(f"{where}: pairs.per_prompt: must be at least 1, got {p.per_prompt}")
    if not 0.0 < p.heldout_fraction < 1.0:
        raise RecipeError(f"{where}: pairs.heldout_fraction: must be between 0 and 1 (exclusive), "
                          f"got {p.heldout_fraction}")
    if p.samples < 2 and not p.reference_fallback:
        raise RecipeError(f"{where}: pairs.samples: one sample per prompt can never give a correct and an incorrect "
                          "completion; sample more or enable pairs.reference_fallback")


# ------------------------------------------------------------------------------------------------ pair building


def load_prompt_rows(sources, seed: int) -> list[dict]:
    """Rows of every source tagged with their kind, one per distinct prompt, in a seeded order."""
    rows, seen = [], set()
    for src in sources:
        for row in load_rows(src.path, src.kind, columns=src.columns or None, split=src.split, limit=src.limit):
            key = (src.kind, row["prompt"])
            if key in seen:  # a prompt on both sides of the split would leak held-out pairs into training
                continue
            seen.add(key)
            rows.append({"kind": src.kind, **row})
    random.Random(seed).shuffle(rows)
    return rows


def split_rows(rows: list[dict], heldout_fraction: float, where: str = "") -> tuple[list[dict], list[dict]]:
    """Training and held-out rows; the prompts are distinct, so held-out pairs never share a training prompt."""
    if len(rows) < 2:
        raise RecipeError(f"{where}data.train: {len(rows)} distinct prompt(s); the rm stage needs at least 2 "
                          "(some for training, some held out)")
    n_heldout = min(len(rows) - 1, max(1, round(len(rows) * heldout_fraction)))
    return rows[n_heldout:], rows[:n_heldout]


def verify(kind_rows: list[dict], texts: list[str], code_timeout_s: float) -> list[float | None]:
    """Verifier label of ``texts[i]`` as an answer to ``kind_rows[i]``: 1.0 correct, 0.0 wrong, None unknown."""
    from rewards.code import code_tests
    from rewards.math import math_accuracy

    labels: list[float | None] = [None] * len(texts)
    math_idx = [i for i, r in enumerate(kind_rows) if r["kind"] == "math"]
    if math_idx:
        scores = math_accuracy([texts[i] for i in math_idx], answer=[kind_rows[i]["answer"] for i in math_idx])
        for i, s in zip(math_idx, scores):
            labels[i] = s
    code_idx = [i for i, r in enumerate(kind_rows) if r["kind"] == "code"]
    chunks = [code_idx[k:k + VERIFY_CHUNK] for k in range(0, len(code_idx), VERIFY_CHUNK)]
    for chunk in tqdm(chunks, desc="code tests", unit="chunk", disable=len(chunks) < 2):
        # mode="all": a completion that fails any test is wrong; partial credit would blur the preference.
        scores = code_tests([texts[i] for i in chunk], tests=[kind_rows[i].get("tests") for i in chunk],
                            entry_point=[kind_rows[i].get("entry_point") for i in chunk],
                            io_cases=[kind_rows[i].get("io_cases") for i in chunk],
                            mode="all", timeout_s=code_timeout_s)
        for i, s in zip(chunk, scores):
            labels[i] = s
    return labels


def label_samples(rows: list[dict], samples: list[list[str]], code_timeout_s: float) -> list[dict[str, float]]:
    """Per row: each distinct sampled text -> its verifier label (unlabelled texts dropped)."""
    flat_rows, flat_texts, owner = [], [], []
    for i, (row, texts) in enumerate(zip(rows, samples)):
        for text in dict.fromkeys(texts):  # identical samples run the sandbox once
            flat_rows.append(row)
            flat_texts.append(text)
            owner.append(i)
    labels = verify(flat_rows, flat_texts, code_timeout_s)
    out: list[dict[str, float]] = [{} for _ in rows]
    for i, text, label in zip(owner, flat_texts, labels):
        if label is not None:
            out[i][text] = label
    return out


def make_pairs(rows: list[dict], labelled: list[dict[str, float]], references_ok: dict[int, bool],
               per_prompt: int, seed: int) -> tuple[list[dict], dict]:
    """Preference pairs (chosen correct, rejected incorrect, same prompt) and counts of how they were made."""
    rng = random.Random(seed)
    pairs: list[dict] = []
    stats = {"prompts": len(rows), "prompts_with_sampled_correct": 0, "prompts_all_correct": 0,
             "prompts_without_correct": 0, "pairs_from_samples": 0, "pairs_from_references": 0,
             "distinct_samples_correct": 0, "distinct_samples_labelled": 0}
    for i, (row, labels) in enumerate(zip(rows, labelled)):
        correct = [t for t, s in labels.items() if s == 1.0]
        wrong = [t for t, s in labels.items() if s == 0.0]
        stats["distinct_samples_correct"] += len(correct)
        stats["distinct_samples_labelled"] += len(labels)
        if correct:
            stats["prompts_with_sampled_correct"] += 1
        if not wrong:
            stats["prompts_all_correct"] += bool(correct)
            continue
        if correct:
            chosen_pool, source = correct, "sample"
        elif references_ok.get(i):
            chosen_pool, source = [row["solution"]], "reference"
        else:
            stats["prompts_without_correct"] += 1
            continue
        rng.shuffle(chosen_pool)
        rng.shuffle(wrong)
        for j in range(min(per_prompt, len(wrong))):
            pairs.append({
                "prompt": prompt_messages(row["prompt"]),
                "chosen": [{"role": "assistant", "content": chosen_pool[j % len(chosen_pool)]}],
                "rejected": [{"role": "assistant", "content": wrong[j]}],
                "kind": row["kind"], "chosen_source": source,
                **{k: row.get(k) for k in VERIFIER_COLUMNS},
            })
            stats[f"pairs_from_{'samples' if source == 'sample' else 'references'}"] += 1
    stats["pairs"] = len(pairs)
    return pairs, stats


def build_pairs(policy, tokenizer, rows: list[dict], cfg: PairsSection, seed: int) -> tuple[list[dict], dict]:
    from align.generation import sample

    log.info("sampling %d completions for each of %d prompts (T=%.2f, %d new tokens)", cfg.samples, len(rows),
             cfg.temperature, cfg.max_new_tokens)
    samples = sample(policy, tokenizer, [r["prompt"] for r in rows], n=cfg.samples, temperature=cfg.temperature,
                     max_new_tokens=cfg.max_new_tokens, seed=seed)
    log.info("verifying %d completions", sum(len(s) for s in samples))
    labelled = label_samples(rows, samples, cfg.code_timeout_s)
    # References are checked only where they would be used: prompts with wrong samples and no right one.
    need = [i for i, labels in enumerate(labelled)
            if cfg.reference_fallback and labels and 1.0 not in labels.values() and 0.0 in labels.values()
            and isinstance(rows[i].get("solution"), str)]
    ref_labels = verify([rows[i] for i in need], [rows[i]["solution"] for i in need], cfg.code_timeout_s)
    references_ok = {i: label == 1.0 for i, label in zip(need, ref_labels)}
    pairs, stats = make_pairs(rows, labelled, references_ok, cfg.per_prompt, seed)
    stats["references_failing_verifier"] = sum(not ok for ok in references_ok.values())
    if stats["references_failing_verifier"]:
        log.warning("%d reference solution(s) failed their own verifier and were not used",
                    stats["references_failing_verifier"])
    return pairs, stats


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def preference_dataset(pairs: list[dict]) -> Dataset:
    # Only TRL's columns: the verifier columns mix types across rows (io_cases vs tests) that Arrow cannot hold.
    return Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])


def pair_margins(reward_fn, pairs: list[dict]) -> list[float]:
    """score(chosen) - score(rejected) for each pair."""
    if not pairs:
        return []
    prompts = [p["prompt"] for p in pairs]
    chosen = reward_fn([p["chosen"] for p in pairs], prompts=prompts)
    rejected = reward_fn([p["rejected"] for p in pairs], prompts=prompts)
    return [c - r for c, r in zip(chosen, rejected)]


def pairwise_accuracy(margins: list[float]) -> float | None:
    """Share of pairs whose chosen completion outscores the rejected one (ties count as misses)."""
    return sum(m > 0 for m in margins) / len(margins) if margins else None


# ---------------------------------------------------------------------------------------------------- the stage


def lora_config(peft_section):
    from peft import LoraConfig

    # SEQ_CLS keeps the new score head fully trainable and saved with the adapter.
    return LoraConfig(r=peft_section.r, lora_alpha=peft_section.lora_alpha, lora_dropout=peft_section.lora_dropout,
                      target_modules=peft_section.target_modules, task_type="SEQ_CLS", modules_to_save=["score"])


class RMRun:
    def __init__(self, loaded: recipes.Loaded, resume: bool = False):
        check_recipe(loaded)
        self.loaded, self.recipe, self.resume = loaded, loaded.recipe, resume
        self.out = Path(self.recipe.output_dir)
        self.args = recipes.trainer_config("rm", self.recipe)
        self.state = process_group(self.args)

    def setup(self) -> None:
        from trl import RewardTrainer

        from rewards.learned import sequence_classifier

        r = self.recipe
        self.tokenizer = load_tokenizer(r.model.tokenizer or r.model.path)
        train_rows, heldout_rows = split_rows(load_prompt_rows(r.data.train, r.seed), r.pairs.heldout_fraction,
                                               f"{self.loaded.source}: ")
        claim_output_dir(self.loaded, self.out, self.resume, self.state)
        if self.state.is_main_process:
            self._ensure_pairs(train_rows, heldout_rows)
        self.state.wait_for_everyone()
        pairs_dir = self.out / PAIRS_DIR
        self.train_pairs = read_jsonl(pairs_dir / "train.jsonl")
        self.heldout_pairs = read_jsonl(pairs_dir / "heldout.jsonl")
        self.pair_stats = json.loads((pairs_dir / "stats.json").read_text())
        if not self.train_pairs:
            raise RecipeError(f"{self.loaded.source}: no training pairs could be made (see "
                              f"{pairs_dir / 'stats.json'}); sample more per prompt, use more prompts, or keep "
                              "pairs.reference_fallback on")
        self.inherited = lineage(r.model.path)
        model = sequence_classifier(r.model.path, DTYPES[r.model.dtype])
        model.config.pad_token_id = self.tokenizer.pad_token_id
        log.info("reward model: %.2fM parameters, dtype %s; %d training pairs, %d held-out pairs",
                 count_parameters(model) / 1e6, r.model.dtype, len(self.train_pairs), len(self.heldout_pairs))
        self.trainer = RewardTrainer(
            model=model, args=self.args, train_dataset=preference_dataset(self.train_pairs),
            eval_dataset=preference_dataset(self.heldout_pairs) if self.heldout_pairs else None,
            processing_class=self.tokenizer, peft_config=lora_config(r.peft) if r.peft else None)

    def _ensure_pairs(self, train_rows: list[dict], heldout_rows: list[dict]) -> None:
        """Sample and label once; a resumed run keeps the pairs its checkpoints were trained on."""
        pairs_dir = self.out / PAIRS_DIR
        if (pairs_dir / "stats.json").exists():
            log.info("reusing the preference pairs in %s", pairs_dir)
            return
        r = self.recipe
        policy = load_trained(r.model.path, DTYPES[r.model.dtype])
        train_pairs, train_stats = build_pairs(policy, self.tokenizer, train_rows, r.pairs, r.seed)
        heldout_pairs, heldout_stats = build_pairs(policy, self.tokenizer, heldout_rows, r.pairs, r.seed + 1)
        del policy
        stats = {"train": train_stats, "heldout": heldout_stats}
        for name, s in stats.items():
            log.info("%s pairs: %d (%d from samples, %d from references) over %d prompts; %d of %d distinct "
                     "samples correct", name, s["pairs"], s["pairs_from_samples"], s["pairs_from_references"],
                     s["prompts"], s["distinct_samples_correct"], s["distinct_samples_labelled"])
        tmp = self.out / ".pairs.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write_jsonl(tmp / "train.jsonl", train_pairs)
        write_jsonl(tmp / "heldout.jsonl", heldout_pairs)
        write_json(tmp / "stats.json", stats)  # last: its presence means the pairs are complete
        if pairs_dir.exists():
            shutil.rmtree(pairs_dir)
        os.replace(tmp, pairs_dir)

    def train(self) -> dict:
        metrics = train_or_resume(self.trainer, self.out, self.resume, self.state.num_processes)
        logged = [h for h in self.trainer.state.log_history if "accuracy" in h]
        if logged:  # TRL's running pairwise accuracy on the last logged training batches
            metrics["train_batch_accuracy"] = logged[-1]["accuracy"]
        return metrics

    def save(self) -> None:
        save_final(self.trainer, self.tokenizer, self.out, self.state)

    def evaluate(self, train_metrics: dict) -> dict | None:
        if not self.state.is_main_process:
            return None
        from rewards.learned import load_reward_fn

        # Score with the saved folder through the same function GRPO uses, so the number describes what ships.
        reward_fn = load_reward_fn(self.out, batch_size=self.recipe.eval.batch_size)
        heldout = pair_margins(reward_fn, self.heldout_pairs)
        limit = self.recipe.eval.train_limit
        train = pair_margins(reward_fn, self.train_pairs[:limit] if limit is not None else self.train_pairs)
        # Reference-vs-sample pairs differ in style as well as correctness; sample-vs-sample pairs are the harder test.
        by_source = {src: pairwise_accuracy([m for m, p in zip(heldout, self.heldout_pairs)
                                             if p["chosen_source"] == src]) for src in ("sample", "reference")}
        counts = {f"{split}_{key}": self.pair_stats[split][key] for split in ("train", "heldout")
                  for key in ("pairs", "pairs_from_samples", "pairs_from_references", "prompts")}
        metrics = {**train_metrics, **counts,
                   "heldout_pairwise_accuracy": pairwise_accuracy(heldout),
                   "heldout_mean_margin": sum(heldout) / len(heldout) if heldout else None,
                   "heldout_pairwise_accuracy_sampled_chosen": by_source["sample"],
                   "heldout_pairwise_accuracy_reference_chosen": by_source["reference"],
                   "train_pairwise_accuracy": pairwise_accuracy(train), "train_pairwise_accuracy_pairs": len(train),
                   "pair_stats": self.pair_stats, "recipe_sha256": self.loaded.sha256, "inherited": self.inherited,
                   "world_size": self.state.num_processes}
        if not heldout:
            log.warning("no held-out pairs could be made; heldout_pairwise_accuracy is null")
        else:
            log.info("held-out pairwise accuracy %.3f over %d pairs (sampled chosen: %s, reference chosen: %s); "
                     "train %.3f", metrics["heldout_pairwise_accuracy"], len(heldout), by_source["sample"],
                     by_source["reference"], metrics["train_pairwise_accuracy"])
        write_metrics(self.out, metrics)
        return metrics


def run(loaded: recipes.Loaded, resume: bool = False) -> dict | None:
    torch.manual_seed(loaded.recipe.seed)
    job = RMRun(loaded, resume)
    job.setup()
    train_metrics = job.train()
    job.save()
    return job.evaluate(train_metrics)
