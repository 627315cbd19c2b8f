"""Seconds per GRPO step and its split: TRL's built-in `generate` vs our engine (Ray pool, colocated), one run.

Runs the same GRPO recipe (default: recipes/tiny/grpo.yaml from an SFT checkpoint) once per rollout mode for
``--steps`` steps, then prints the mean per-step time of generation / reward / weight sync / training, skipping
the first step (start-up). Outputs go to a temporary folder.

    python bench/grpo_step.py --sft outputs/tiny/sft --steps 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

KEYS = ("time/generation_s", "time/reward_s", "time/sync_s", "time/training_s", "time/step_s")


def run_mode(recipe: str, sft: str, mode: str, steps: int, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "align", "grpo", "--config", recipe, f"model.path={sft}", f"output_dir={out}",
           f"rollout.mode={mode}", f"trainer.max_steps={steps}", "trainer.logging_steps=1", "trainer.save_strategy=no",
           "trainer.report_to=[]", "eval.limit=1", "eval.samples=1", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    history = json.loads((out / "log_history.json").read_text())["log_history"]
    rows = [h for h in history if "time/step_s" in h][1:]
    return {k: sum(h[k] for h in rows) / len(rows) for k in KEYS}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/tiny/grpo.yaml")
    p.add_argument("--sft", default="outputs/tiny/sft")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--modes", nargs="+", choices=["trl", "ray", "colocated"], default=["trl", "ray", "colocated"])
    p.add_argument("overrides", nargs="*", help="extra key.sub=value recipe overrides (before --modes, which takes "
                                               "every word after it)")
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            results[mode] = run_mode(args.recipe, args.sft, mode, args.steps, Path(tmp) / mode, args.overrides)
    print(f"| rollout | {' | '.join(k.split('/')[1][:-2] + ' (s)' for k in KEYS)} |")
    print("|---" * (len(KEYS) + 1) + "|")
    for mode, r in results.items():
        print(f"| {mode} | " + " | ".join(f"{r[k]:.2f}" for k in KEYS) + " |")


if __name__ == "__main__":
    main()
