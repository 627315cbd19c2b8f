"""The GRPO stage: TRL ``GRPOTrainer`` whose ``rollout_func`` is served by MLA/MoE engines.

``rollout.mode: ray`` spreads prompt groups over a ``RolloutPool`` of Ray actors; ``rollout.mode: colocated`` runs
one engine inside the trainer process.  Before each rollout the pool is brought to the trainer's current policy
version (``global_step``), so no rollout mixes versions.  The engine's sampling log-probabilities go back to TRL, so
its importance-sampling correction (``trainer.vllm_importance_sampling_correction``) works for our engine too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Literal

import torch
from transformers import TrainerCallback

from align import recipe as recipes
from align.checkpoint import DTYPES, load_base, load_trained
from align.curves import CurvesSection, LearningCurves, draw_curves
from align.data import DataError
from align.dynamic_sampling import DynamicSamplingSection, GroupFilter, RewardMemo
from align.engine_rollout import EngineRollout, Timers, timed_reward
from align.expert_load import health_metrics
from align import grad_guard
from align.grad_guard import GradGuardSection
from align.overlap import Overlap
from align.grpo_prompts import GRPOData, PromptSource
from align.metrics import heldout_footing, heldout_math, write_metrics
from align.model import load_tokenizer
from align.recipe import EvalSection, ModelSection, PeftSection
from align.router_hooks import RouterHooks
from align.routing_replay import MoERLSection, RoutingReplay
from align.rollout import ColocatedRollout
from align.sft import lora_config
from align.stage import claim_output_dir, lineage, process_group, save_final, train_or_resume

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RewardSpec:
    name: str = dataclasses.field(metadata={"help": "math_accuracy | code_tests | format | learned:<path>"})
    weight: float = dataclasses.field(default=1.0, metadata={"help": "weight in the summed reward"})
    options: dict = dataclasses.field(default_factory=dict, metadata={"help": "keyword options of the reward"})


@dataclasses.dataclass
class RolloutSection:
    mode: Literal["ray", "colocated", "trl"] = dataclasses.field(
        default="ray", metadata={"help": "Ray actor pool of engines; one engine in the trainer process; or TRL's "
                                         "own `generate` (the baseline, no engine)"})
    workers: int = dataclasses.field(default=2, metadata={"help": "rollout actors (ray mode)"})
    num_cpus: float = dataclasses.field(default=1, metadata={"help": "CPUs per rollout actor"})
    num_gpus: float = dataclasses.field(default=0, metadata={"help": "GPUs per rollout actor"})
    timeout_s: float = dataclasses.field(default=600, metadata={"help": "a worker silent this long is replaced"})
    max_num_seqs: int = dataclasses.field(default=256, metadata={"help": "engine: sequences decoded together"})
    max_model_len: int | None = dataclasses.field(
        default=None, metadata={"help": "engine: longest prompt + completion, which sizes its latent cache; "
                                        "null = the model's max_position_embeddings"})
    return_routing: bool = dataclasses.field(default=True, metadata={"help": "record routed experts (expert load)"})
    min_load_entropy: float = dataclasses.field(
        default=0.0, metadata={"help": "warn when a MoE layer's expert-load entropy over a step's rollouts (1 = "
                                       "uniform, 0 = one expert takes every token) falls below this; 0 = never"})
    device: str | None = dataclasses.field(default=None, metadata={"help": "engine device; default: cuda if any"})
    dtype: Literal["float32", "bfloat16", "float16"] | None = dataclasses.field(
        default=None, metadata={"help": "engine dtype; default: the policy's (bf16 rollouts from fp32 masters work; "
                                        "keep importance-sampling correction on)"})
    kv_dtype: Literal["auto", "fp8"] = dataclasses.field(
        default="auto", metadata={"help": "engine latent cache: the engine's dtype, or fp8 (e4m3, a scale per "
                                          "token: half the bytes; read by the fused kernels on CUDA)"})
    weight_dtype: Literal["auto", "fp8"] = dataclasses.field(
        default="auto", metadata={"help": "engine projection weights: the engine's dtype, or fp8 (e4m3, 128x128 "
                                          "block scales, quantised at every weight sync: about half the weight "
                                          "memory; the torch path)"})
    max_staleness: int = dataclasses.field(
        default=0, metadata={"help": "0 = sample each batch with the current policy; k >= 1 = sample the next batch "
                                     "while the trainer steps, with weights up to k optimizer steps old (needs "
                                     "trainer.vllm_importance_sampling_correction)"})

    def __post_init__(self):
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")


@dataclasses.dataclass
class RaySection:
    address: str | None = dataclasses.field(default=None, metadata={"help": "join a cluster; null = embedded"})
    num_cpus: int | None = dataclasses.field(default=None, metadata={"help": "CPUs of the embedded Ray"})


@dataclasses.dataclass
class GRPORecipe:
    output_dir: str
    seed: int
    model: ModelSection
    data: GRPOData
    eval: EvalSection
    rewards: list[RewardSpec]
    rollout: RolloutSection = dataclasses.field(default_factory=RolloutSection)
    dynamic_sampling: DynamicSamplingSection = dataclasses.field(default_factory=DynamicSamplingSection)
    curves: CurvesSection = dataclasses.field(default_factory=CurvesSection)
    moe: MoERLSection = dataclasses.field(default_factory=MoERLSection)
    grad_guard: GradGuardSection = dataclasses.field(default_factory=GradGuardSection)
    ray: RaySection = dataclasses.field(default_factory=RaySection)
    trainer: dict = dataclasses.field(default_factory=dict, metadata={"help": "passed to trl.GRPOConfig"})
    peft: PeftSection | None = None


recipes.register_stage("grpo", GRPORecipe, "GRPOConfig")


class StepMetrics(TrainerCallback):
    """Adds the time split (generation / reward / sync / training), expert-load health and the routing mismatch
    (and balance terms) to the logged metrics."""

    def __init__(self, trainer_ref, rollout: EngineRollout, timers: Timers, min_load_entropy: float = 0.0,
                 moe: RoutingReplay | None = None):
        self.trainer_ref, self.rollout, self.timers = trainer_ref, rollout, timers
        self.min_load_entropy, self.moe = min_load_entropy, moe
        self.t0 = 0.0

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()
        if self.rollout.overlap is not None:   # a generation serving several steps: start the next k steps ahead
            self.rollout.overlap.submit_if_due(self.trainer_ref())

    def on_step_end(self, args, state, control, **kw):
        metrics = self.trainer_ref()._metrics["train"]
        split = self.timers.pop()
        step_s = time.perf_counter() - self.t0
        for key in ("generation", "reward", "sync"):
            metrics[f"time/{key}_s"].append(split.get(key, 0.0))
        metrics["time/training_s"].append(max(0.0, step_s - sum(split.values())))
        metrics["time/step_s"].append(step_s)
        # The rollouts this step trained on (with num_iterations > 1, the batch sampled for an earlier step).
        if self.rollout.step_load:
            for key, value in health_metrics(self.rollout.step_load, self.min_load_entropy, state.global_step).items():
                metrics[key].append(value)
        if self.moe is not None:
            for key, value in self.moe.pop_metrics().items():
                metrics[key].append(value)
        if self.rollout.overlap is not None:
            for key, value in self.rollout.overlap.pop_metrics().items():
                metrics[key].append(value)


def make_trainer_class():
    from trl import GRPOTrainer

    class AlignGRPOTrainer(GRPOTrainer):
        """GRPOTrainer that lets a custom rollout's sampling log-probs drive TRL's importance-sampling correction.

        TRL gates that correction on ``use_vllm``; after construction we raise the flag (when the recipe asks for the
        correction) and keep TRL's vLLM weight-sync path idle, since our rollout syncs its own engines.
        """

        def model_wrapped_unwrapped(self):
            return self.accelerator.unwrap_model(self.model)

        def _generate(self, prompts):
            self._last_loaded_step = self.state.global_step  # our rollout syncs the engines itself
            return super()._generate(prompts)

        def _generate_and_score_completions(self, inputs):
            # Dynamic sampling swaps uninformative groups for fresh prompts before TRL scores the batch; with
            # overlap the batch is the one sampled in the background, on the rows TRL gave the previous time.
            ahead = getattr(self.rollout_func, "overlap", None) is not None
            if (self.align_filter is not None or ahead) and self.model.training:
                inputs = self.rollout_func.prepare(inputs, self, self.align_filter)
            if self.align_moe is None:
                return super()._generate_and_score_completions(inputs)
            self.align_moe.begin_batch()
            try:
                output = super()._generate_and_score_completions(inputs)
            finally:
                self.align_moe.hooks.set_routes(None, None)
            return self.align_moe.attach(output, self._align_rows())

        def _align_rows(self):
            """The engine's routing records of the batch TRL is working on (None: TRL generated it)."""
            return getattr(self.rollout_func, "handed_routing", None)

        def _compute_loss(self, model, inputs):
            moe = self.align_moe
            if moe is None:
                return super()._compute_loss(model, inputs)
            self._align_loss_routes = inputs.get("routed_experts")
            try:
                with moe.hooks.measuring(capture=moe.cfg.balancing):
                    loss = super()._compute_loss(model, inputs)
                mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
                extra = moe.loss_extra(mask)
            finally:
                self._align_loss_routes = None
            if extra is not None:   # scaled for gradient accumulation as TRL scales the policy loss
                loss = loss + extra / (self.current_gradient_accumulation_steps if self.model.training else 1.0)
            return loss

        def training_step(self, *args, **kwargs):
            try:
                return super().training_step(*args, **kwargs)
            finally:   # the loss forward's routes stay set through the backward (gradient checkpointing recomputes)
                if self.align_moe is not None:
                    self.align_moe.hooks.set_routes(None, None)

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, **kwargs):
            moe = self.align_moe
            routes = None
            if moe is not None:
                routes = self._align_loss_routes if self._align_loss_routes is not None else \
                    moe.generation_routes(self._align_rows(), input_ids, attention_mask, logits_to_keep)
            if routes is None:
                return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                                  batch_size, **kwargs)
            if tuple(routes.shape[:2]) != tuple(input_ids.shape):
                raise RuntimeError(f"routes cover {tuple(routes.shape[:2])} tokens, the batch {tuple(input_ids.shape)}")
            extra = {k: v for k, v in kwargs.items() if k not in ("compute_entropy", "compute_aux_loss")}
            if any(v is not None for v in extra.values()):
                raise RuntimeError("routing replay supports text-only batches")
            size = batch_size or input_ids.size(0)
            parts = []
            for start in range(0, input_ids.size(0), size):
                rows = slice(start, start + size)
                moe.hooks.set_routes(routes[rows], input_ids.device)
                parts.append(super()._get_per_token_logps_and_entropies(
                    model, input_ids[rows], attention_mask[rows], logits_to_keep, None, **kwargs))
            logps = torch.cat([p[0] for p in parts])
            entropies = torch.cat([p[1] for p in parts]) if parts[0][1] is not None else None
            aux = torch.stack([p[2] for p in parts]).mean() if parts[0][2] is not None else None
            return logps, entropies, aux

        def _generate_single_turn(self, *args, **kwargs):
            # TRL's own generation (rollout.mode: trl), timed like ours so the step split compares.
            t0 = time.perf_counter()
            try:
                return super()._generate_single_turn(*args, **kwargs)
            finally:
                self.align_timers.add("generation", time.perf_counter() - t0)

    return AlignGRPOTrainer


class GRPORun:
    def __init__(self, loaded: recipes.Loaded, resume: bool = False):
        self.loaded, self.recipe, self.resume = loaded, loaded.recipe, resume
        self.out = Path(self.recipe.output_dir)
        self.backend = None
        self.timers = Timers()
        from rewards.registry import combine

        try:
            self.reward_funcs, self.reward_weights = combine(
                [{"name": s.name, "weight": s.weight, **s.options} for s in self.recipe.rewards])
        except ValueError as e:
            raise recipes.RecipeError(f"{loaded.source}: rewards: {e}") from None
        self.args = recipes.trainer_config("grpo", self.recipe, reward_weights=self.reward_weights)
        self.state = process_group(self.args)
        if self.recipe.dynamic_sampling.enabled:
            self._check_dynamic_sampling()
        self._check_moe()
        if self.recipe.rollout.max_staleness:
            self._check_overlap()
        try:
            self.prompts = PromptSource(self.recipe.data, self._prompts_needed(), self.recipe.seed)
        except DataError as e:
            raise DataError(f"{loaded.source}: data: {e}") from None

    def setup(self) -> None:
        r = self.recipe
        self.tokenizer = load_tokenizer(r.model.tokenizer or r.model.path)
        train_ds = self.prompts.dataset()
        claim_output_dir(self.loaded, self.out, self.resume, self.state)
        self.inherited = lineage(r.model.path)
        model = load_base(dataclasses.asdict(r.model), self.tokenizer, r.seed, DTYPES[r.model.dtype])
        engine = r.rollout.mode != "trl"
        self.backend = self._backend(model) if engine and self.state.is_main_process else None
        hooks = RouterHooks()
        moe = RoutingReplay(r.moe, hooks, getattr(model.config, "num_experts_per_tok", 0)) \
            if hooks.attach(model) and (r.rollout.return_routing or r.moe.balancing) else None
        if r.moe.routing_replay == "rollout" and moe is None:
            raise recipes.RecipeError(f"{self.loaded.source}: moe.routing_replay: the model has no MoE layer")
        self.rollout = EngineRollout(self.backend, self.tokenizer, r.seed, r.rollout.return_routing, self.timers,
                                     self.out / "rollouts.jsonl", getattr(model.config, "n_routed_experts", None),
                                     keep_routing=moe is not None)
        cls = make_trainer_class()
        memo = RewardMemo()
        reward_funcs = [timed_reward(memo.wrap(f), self.timers) for f in self.reward_funcs]
        self.trainer = cls(model=model, reward_funcs=reward_funcs,
                           args=self.args, train_dataset=train_ds,
                           processing_class=self.tokenizer, peft_config=lora_config(r.peft) if r.peft else None,
                           rollout_func=self.rollout if engine else None)
        self.trainer.align_timers = self.timers
        self.trainer.align_moe, self.trainer._align_loss_routes = moe, None
        if moe is not None and self.trainer.ref_model is not None:
            hooks.attach(self.trainer.ref_model)   # the reference's log-probs see the same routing
        self.refill = self.prompts.refill()   # one stream: dynamic sampling's and overlap's rows never repeat
        self.trainer.align_filter = self._group_filter(reward_funcs) if r.dynamic_sampling.enabled else None
        if r.rollout.max_staleness and engine:
            self.rollout.overlap = Overlap(self.rollout, r.rollout.max_staleness, self._generation_interval(),
                                           self.refill, self.args.num_generations, r.dynamic_sampling.max_oversample)
        if engine and self.args.vllm_importance_sampling_correction:
            self.trainer.use_vllm = True
        import weakref

        ref = weakref.ref(self.trainer)
        self.trainer.add_callback(StepMetrics(ref, self.rollout, self.timers, r.rollout.min_load_entropy, moe))
        self.trainer.add_callback(LearningCurves(ref, r.curves, r.eval, self.tokenizer, r.seed, self.out))
        grad_guard.attach(self.trainer, r.grad_guard, self.out)

    def _prompts_needed(self) -> int | None:
        """Unique prompts a run consumes when each step's come fresh (None when the run is sized in epochs)."""
        a = self.args
        if a.max_steps is None or a.max_steps <= 0:
            return None
        # One generation batch (all processes: generation_batch_size rows, G per prompt) serves
        # steps_per_generation x num_iterations optimizer steps.
        generations = math.ceil(a.max_steps / (a.steps_per_generation * a.num_iterations))
        return generations * a.generation_batch_size // a.num_generations

    def _check_dynamic_sampling(self) -> None:
        where = f"{self.loaded.source}: dynamic_sampling"
        if self.recipe.rollout.mode == "trl":
            raise recipes.RecipeError(f"{where}: needs an engine rollout (rollout.mode ray or colocated), not trl")
        if self.state.num_processes > 1:
            # Each process would run its own number of refill rounds, and rollouts are collective calls.
            raise recipes.RecipeError(f"{where}: runs in a single training process; launch without accelerate's "
                                      "multi-process mode or turn it off")

    def _check_moe(self) -> None:
        r, where = self.recipe, f"{self.loaded.source}: moe.routing_replay"
        if r.moe.routing_replay == "rollout":
            if r.rollout.mode == "trl":
                raise recipes.RecipeError(f"{where}: replays the engine's routing; needs rollout.mode ray or colocated")
            if not r.rollout.return_routing:
                raise recipes.RecipeError(f"{where}: needs rollout.return_routing: true (the engine's routing record)")

    def _generation_interval(self) -> int:
        """Optimizer steps one generation batch serves."""
        a = self.args
        return a.steps_per_generation * a.num_iterations // a.gradient_accumulation_steps

    def _check_overlap(self) -> None:
        where, a = f"{self.loaded.source}: rollout.max_staleness", self.args
        if self.recipe.rollout.mode == "trl":
            raise recipes.RecipeError(f"{where}: overlaps our engine's rollouts; needs rollout.mode ray or colocated")
        if not a.vllm_importance_sampling_correction:
            raise recipes.RecipeError(f"{where}: off-policy batches need trainer.vllm_importance_sampling_correction: "
                                      "true (the engine's behaviour log-probs correct the loss)")
        if self.state.num_processes > 1:
            raise recipes.RecipeError(f"{where}: runs in a single training process")
        if (a.steps_per_generation * a.num_iterations) % a.gradient_accumulation_steps:
            raise recipes.RecipeError(f"{where}: a generation batch must serve whole optimizer steps "
                                      "(steps_per_generation x num_iterations a multiple of "
                                      "gradient_accumulation_steps)")

    def _group_filter(self, reward_funcs) -> GroupFilter:
        return GroupFilter(self.recipe.dynamic_sampling, reward_funcs, self.reward_weights, self.refill,
                           self.args.num_generations)

    def _backend(self, model):
        r = self.recipe
        opts = {"max_num_seqs": r.rollout.max_num_seqs}
        if r.rollout.max_model_len:
            opts["max_model_len"] = r.rollout.max_model_len
        if r.rollout.device:
            opts["device"] = r.rollout.device
        if r.rollout.dtype:
            opts["dtype"] = DTYPES[r.rollout.dtype]
        if r.rollout.kv_dtype != "auto":
            opts["kv_dtype"] = r.rollout.kv_dtype
        if r.rollout.weight_dtype != "auto":
            opts["weight_dtype"] = r.rollout.weight_dtype
        if r.rollout.mode == "colocated":
            return ColocatedRollout(model, opts)
        from ray_jobs.pool import RolloutPool, init_ray

        init_ray(r.ray.address, r.ray.num_cpus)
        return RolloutPool(model.config, r.rollout.workers, r.rollout.num_cpus, r.rollout.num_gpus, opts,
                           timeout_s=r.rollout.timeout_s)

    def train(self) -> dict:
        return train_or_resume(self.trainer, self.out, self.resume, self.state.num_processes)

    def save(self) -> None:
        save_final(self.trainer, self.tokenizer, self.out, self.state)

    def evaluate(self, train_metrics: dict) -> dict | None:
        if not self.state.is_main_process:
            return None
        model = load_trained(self.out, DTYPES[self.recipe.model.dtype])
        metrics = {**train_metrics, **self._start_metrics(),
                   **heldout_math(model, self.tokenizer, self.recipe.eval, self.recipe.seed),
                   "recipe_sha256": self.loaded.sha256, "inherited": self.inherited,
                   "pool": dataclasses.asdict(self.backend.stats) if hasattr(self.backend, "stats") else {}}
        write_metrics(self.out, metrics)
        draw_curves(self.out, self.out / "curves.png", history=self.trainer.state.log_history,
                    title=f"GRPO {self.out.name}: seed {self.recipe.seed}")
        return metrics

    def _start_metrics(self) -> dict:
        """Held-out scores of the starting model: the upstream stage's when they were taken the same way (same
        problems, samples, temperature, token budget and seed), else scored here, so before and after compare."""
        if not self.recipe.model.path:
            return {}
        ev, start = self.recipe.eval, Path(self.recipe.model.path)
        prev = json.loads((start / "metrics.json").read_text()) if (start / "metrics.json").exists() else {}
        if not all(prev.get(k) == v for k, v in heldout_footing(ev, self.recipe.seed).items()):
            log.info("scoring the starting model %s on held-out math (its own metrics were taken differently)", start)
            prev = heldout_math(load_trained(start, DTYPES[self.recipe.model.dtype]), self.tokenizer, ev,
                                self.recipe.seed)
        return {f"start_{k}": prev[k] for k in ("heldout_math_accuracy", "heldout_math_pass1") if k in prev}

    def cleanup(self) -> None:
        overlap = getattr(getattr(self, "rollout", None), "overlap", None)
        if overlap is not None:
            unused = overlap.close()
            log.info("overlap: %d groups sampled ahead were not trained on (the run ended); %d stale groups "
                     "were dropped and sampled again", unused, overlap.dropped_total)
        if self.backend is not None:
            self.backend.shutdown()


def run(loaded: recipes.Loaded, resume: bool = False) -> dict | None:
    torch.manual_seed(loaded.recipe.seed)
    job = GRPORun(loaded, resume)
    try:
        job.setup()
        train_metrics = job.train()
        job.save()
        return job.evaluate(train_metrics)
    finally:
        job.cleanup()
