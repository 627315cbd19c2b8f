"""Learning curves of a GRPO run: held-out scores every N steps next to what the trainer logs, drawn as one PNG.

Every ``curves.every`` steps (and at the start) the policy is scored on a fixed subset of the held-out set:
greedy accuracy and sampled pass@1.  Each point goes to ``curves.jsonl`` in the run folder and into the trainer's
metrics (``curve/heldout_greedy``, ``curve/heldout_pass1``: TensorBoard or any ``report_to``).  ``curves.png``
draws them with the training reward (on fresh prompts when dynamic sampling reports it), token entropy, the
share of zero-variance groups, KL to the reference and completion length, taken from the trainer's log history.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger(__name__)

CURVE_KEYS = ("heldout_greedy", "heldout_pass1")


@dataclasses.dataclass
class CurvesSection:
    every: int = dataclasses.field(default=25, metadata={"help": "score the policy every this many steps; 0 = off"})
    limit: int = dataclasses.field(default=100, metadata={"help": "the first this many problems of eval.heldout_math"})
    samples: int = dataclasses.field(default=4, metadata={"help": "samples per problem for the pass@1 curve"})

    def __post_init__(self):
        if self.every < 0 or self.limit < 1 or self.samples < 1:
            raise ValueError(f"need every >= 0, limit >= 1, samples >= 1; got {self}")


def history_of(run_dir: Path) -> list[dict]:
    """The trainer's logged metrics of a finished stage (``log_history.json``), oldest first."""
    path = Path(run_dir) / "log_history.json"
    return json.loads(path.read_text())["log_history"] if path.exists() else []


def read_curves(run_dir: Path) -> list[dict]:
    """The held-out points of a run, oldest first (a line cut short by a killed run is skipped)."""
    path = Path(run_dir) / "curves.jsonl"
    points = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            points.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: skipping an unreadable line (%r)", path, line[:80])
    return points


class LearningCurves(TrainerCallback):
    """Scores the policy on the held-out subset at step 0 and every ``every`` steps; see the module docstring."""

    def __init__(self, trainer_ref, cfg: CurvesSection, eval_cfg, tokenizer, seed: int, out: Path):
        self.trainer_ref, self.cfg, self.tokenizer, self.seed = trainer_ref, cfg, tokenizer, seed
        self.eval_cfg = dataclasses.replace(eval_cfg, limit=cfg.limit, samples=cfg.samples)
        self.path = Path(out) / "curves.jsonl"
        self.engine = None
        self.done = {p["step"] for p in read_curves(out)}

    def _score(self, step: int) -> dict:
        from align.metrics import heldout_math
        from align.rollout import plain_model, policy_state_dict
        from align.generation import make_engine

        model = self.trainer_ref().accelerator.unwrap_model(self.trainer_ref().model)
        t0 = time.perf_counter()
        if self.engine is None:
            self.engine = make_engine(plain_model(model))
        else:
            self.engine.load_weights(policy_state_dict(model), step)
        scores = heldout_math(None, self.tokenizer, self.eval_cfg, self.seed, engine=self.engine, progress=False)
        point = {"step": step, "heldout_greedy": scores["heldout_math_accuracy"],
                 "heldout_pass1": scores["heldout_math_pass1"], "problems": scores["heldout_math_problems"],
                 "samples": self.cfg.samples, "seconds": round(time.perf_counter() - t0, 2)}
        with open(self.path, "a") as f:
            f.write(json.dumps(point) + "\n")
        log.info("step %d: held-out subset greedy %.3f, pass@1 %.3f (%d problems, %.1f s)", step,
                 point["heldout_greedy"], point["heldout_pass1"], point["problems"], point["seconds"])
        return point

    def _maybe(self, state, force: bool = False):
        step = state.global_step
        if not state.is_world_process_zero or self.cfg.every == 0 or step in self.done:
            return
        if not force and step % self.cfg.every:
            return
        point = self._score(step)
        self.done.add(step)
        metrics = self.trainer_ref()._metrics["train"]
        for key in CURVE_KEYS:
            metrics[f"curve/{key}"].append(point[key])

    def on_train_begin(self, args, state, control, **kw):
        if self.cfg.every:
            self._maybe(state, force=True)

    def on_step_end(self, args, state, control, **kw):
        self._maybe(state)

    def on_train_end(self, args, state, control, **kw):
        if self.cfg.every:
            self._maybe(state, force=True)   # the last point is the final policy
        self.engine = None


def series(history: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of one logged metric."""
    pts = [(h["step"], float(h[key])) for h in history if key in h and "step" in h]
    return [p[0] for p in pts], [p[1] for p in pts]


def draw_curves(run_dir: Path, path: Path, history: list[dict] | None = None, title: str = "") -> Path | None:
    """One PNG, six panels: held-out scores, training reward, entropy, zero-variance groups, KL, length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if history is None:
        history = history_of(run_dir)
    points = read_curves(run_dir)
    if not points and not history:
        return None
    # With dynamic sampling the trained batch is filtered; its first round is the unbiased view of the policy.
    dynamic = any("dynamic/fresh_reward" in h for h in history)
    zero = "dynamic/fresh_zero_std_frac" if dynamic else "frac_reward_zero_std"
    accuracy = "dynamic/fresh_math_accuracy" if dynamic else "rewards/math_accuracy/mean"
    panels = [
        ("math accuracy: held-out subset vs training prompts",
         {"held-out greedy": ([p["step"] for p in points], [p["heldout_greedy"] for p in points]),
          "held-out pass@1": ([p["step"] for p in points], [p["heldout_pass1"] for p in points]),
          "fresh training prompts (sampled)": series(history, accuracy)}),
        ("training reward", {"fresh prompts (before filtering)": series(history, "dynamic/fresh_reward"),
                             "trained batch": series(history, "reward")}),
        ("token entropy (nats)", {"entropy": series(history, "entropy")}),
        ("zero-variance groups", {"fraction": series(history, zero)}),
        ("KL to reference", {"kl": series(history, "kl")}),
        ("completion length (tokens)", {"mean": series(history, "completions/mean_length")}),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (name, curves) in zip(axes.flat, panels):
        for label, (x, y) in curves.items():
            if x:
                ax.plot(x, y, marker="o" if label.startswith("held-out") else None, ms=3, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if sum(bool(x) for x, _ in curves.values()) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
