"""The SFT stage: TRL ``SFTTrainer`` on chat-formatted task data, loss on assistant tokens only.

One recipe file drives it (``recipes/*/sft.yaml``): ``setup`` builds tokenizer, model, data and trainer from the
recipe; ``train`` runs (or resumes) it; ``save`` writes the final model (or LoRA adapter) into ``output_dir``;
``evaluate`` scores held-out loss and held-out math and writes ``metrics.json``.
Works unchanged under ``accelerate launch`` (DDP or FSDP2; CPU/gloo or GPU).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback
from datasets import Dataset

from align import recipe as recipes
from align.data import load_rows, to_messages
from align.expert_balance import MoESection, balance_loss
from align import grad_guard
from align.metrics import heldout_math, write_metrics
from align.model import count_parameters, load_tokenizer
from align.router_hooks import RouterHooks
from align.checkpoint import DTYPES, load_base, load_trained
from align.stage import claim_output_dir, lineage, process_group, save_final, train_or_resume

log = logging.getLogger(__name__)


def messages_dataset(sources, seed: int) -> Dataset:
    rows = []
    for src in sources:
        for row in load_rows(src.path, src.kind, columns=src.columns or None, split=src.split, limit=src.limit):
            rows.append({"messages": to_messages(row, src.kind)})
    random.Random(seed).shuffle(rows)  # mix kinds so every batch sees math, code and chat
    return Dataset.from_list(rows)


def lora_config(peft_section):
    from peft import LoraConfig

    return LoraConfig(r=peft_section.r, lora_alpha=peft_section.lora_alpha, lora_dropout=peft_section.lora_dropout,
                      target_modules=peft_section.target_modules, task_type="CAUSAL_LM")


def make_trainer_class(cfg: MoESection):
    """TRL's SFTTrainer, plus DeepSeek-V2's expert / device balance loss when the recipe's ``moe`` section asks."""
    from trl import SFTTrainer

    if not cfg.balancing:
        return SFTTrainer

    class BalancedSFTTrainer(SFTTrainer):
        align_hooks: RouterHooks

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with self.align_hooks.measuring(capture=True):
                out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                           num_items_in_batch=num_items_in_batch)
            extra, stats = balance_loss(self.align_hooks.captured, inputs.get("attention_mask"), cfg)
            self.align_hooks.captured = []
            mode = "train" if model.training else "eval"
            for key, value in stats.items():
                self._metrics[mode][key].append(value)
            # Weighted as the LM loss is: when that is already normalised over the accumulated batch, the
            # Trainer does not divide by the accumulation steps, so the term is divided here.
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                    or self.compute_loss_func is not None
            if scaled and model.training:
                extra = extra / self.current_gradient_accumulation_steps
            if return_outputs:
                return out[0] + extra, out[1]
            return out + extra

    return BalancedSFTTrainer


class RankConsistency(TrainerCallback):
    """Records each rank's parameter checksum at the end, so a run can prove it was one synchronized job."""

    def __init__(self):
        self.checksums: list[float] = []

    def on_train_end(self, args, state, control, model=None, **kw):
        total = sum(float(p.detach().double().sum()) for p in model.parameters())
        self.checksums = gather_object([total])


class SFTRun:
    def __init__(self, loaded: recipes.Loaded, resume: bool = False):
        self.loaded, self.recipe, self.resume = loaded, loaded.recipe, resume
        self.out = Path(self.recipe.output_dir)
        self.args = recipes.trainer_config("sft", self.recipe)
        self.state = process_group(self.args)

    def setup(self) -> None:
        r = self.recipe
        # Everything that can be wrong with the inputs fails before the output folder is touched.
        self.tokenizer = load_tokenizer(r.model.tokenizer or r.model.path)
        self.train_ds = messages_dataset(r.data.train, r.seed)
        self.eval_ds = messages_dataset(r.data.heldout, r.seed) if r.data.heldout else None
        claim_output_dir(self.loaded, self.out, self.resume, self.state)
        self.inherited = lineage(r.model.path)
        model = load_base(dataclasses.asdict(r.model), self.tokenizer, r.seed, DTYPES[r.model.dtype])
        log.info("model: %.2fM parameters, dtype %s", count_parameters(model) / 1e6, r.model.dtype)
        trainer_cls = make_trainer_class(r.moe)
        self.trainer = trainer_cls(model=model, args=self.args, train_dataset=self.train_ds, eval_dataset=self.eval_ds,
                                   processing_class=self.tokenizer, peft_config=lora_config(r.peft) if r.peft else None)
        if r.moe.balancing:
            self.trainer.align_hooks = RouterHooks()
            if not self.trainer.align_hooks.attach(self.trainer.model):
                raise recipes.RecipeError(f"{self.loaded.source}: moe: the balance loss needs a MoE model")
        self.consistency = RankConsistency()
        self.trainer.add_callback(self.consistency)
        grad_guard.attach(self.trainer, r.grad_guard, self.out)

    def train(self) -> dict:
        metrics = train_or_resume(self.trainer, self.out, self.resume, self.state.num_processes)
        if self.eval_ds is not None:
            metrics.update({k: v for k, v in self.trainer.evaluate().items() if isinstance(v, (int, float))})
            metrics["heldout_loss"] = metrics.get("eval_loss")
        return metrics

    def save(self) -> None:
        save_final(self.trainer, self.tokenizer, self.out, self.state)

    def evaluate(self, train_metrics: dict) -> dict | None:
        if not self.state.is_main_process:
            return None
        model = load_trained(self.out, DTYPES[self.recipe.model.dtype])
        metrics = {**train_metrics, **heldout_math(model, self.tokenizer, self.recipe.eval, self.recipe.seed),
                   "recipe_sha256": self.loaded.sha256, "inherited": self.inherited,
                   "world_size": self.state.num_processes,
                   "rank_param_checksums": self.consistency.checksums}
        write_metrics(self.out, metrics)
        return metrics


def run(loaded: recipes.Loaded, resume: bool = False) -> dict | None:
    torch.manual_seed(loaded.recipe.seed)
    job = SFTRun(loaded, resume)
    job.setup()
    train_metrics = job.train()
    job.save()
    return job.evaluate(train_metrics)
