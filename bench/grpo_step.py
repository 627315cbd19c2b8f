"""Seconds per GRPO step and its split: TRL's built-in `generate` vs our engine (Ray pool, colocated), one run.

Runs the same GRPO recipe (default: recipes/tiny/grpo.yaml from an SFT checkpoint) once per rollout mode for
``--steps`` steps, then prints the mean per-step time of generation / reward / weight sync / training, skipping
the first step (start-up). Outputs go to a temporary folder.

    python bench/grpo_step.py --sft outputs/tiny/sft --steps 8

``--variants`` compares recipe settings under each mode, runs interleaved (base, variant, base, variant, ...) and
repeated ``--repeats`` times so that drift of a shared machine hits both alike; each row is the mean over repeats:

    python bench/grpo_step.py --sft outputs/tiny/sft --repeats 3 --variants replay=moe.routing_replay=rollout --modes ray
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
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                   help="settings compared with the base recipe (before --modes)")
    p.add_argument("--modes", nargs="+", choices=["trl", "ray", "colocated"], default=["trl", "ray", "colocated"])
    p.add_argument("overrides", nargs="*", help="extra key.sub=value recipe overrides (before --modes, which takes "
                                               "every word after it)")
    args = p.parse_args(argv)
    variants = {"base": []}
    for v in args.variants:
        name, _, settings = v.partition("=")
        if not name or "=" not in settings:
            p.error(f"--variants {v!r}: expected NAME=KEY=VALUE[,KEY=VALUE]")
        variants[name] = settings.split(",")
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            for rep in range(args.repeats):
                for name, settings in variants.items():
                    r = run_mode(args.recipe, args.sft, mode, args.steps, Path(tmp) / f"{mode}_{name}_{rep}",
                                 [*args.overrides, *settings])
                    runs.setdefault((mode, name), []).append(r)
                    print(f"{mode} {name} #{rep}: step {r['time/step_s']:.3f} s", file=sys.stderr, flush=True)
    label = "rollout" if len(variants) == 1 else "rollout, setting"
    print(f"| {label} | {' | '.join(k.split('/')[1][:-2] + ' (s)' for k in KEYS)} | step, each repeat (s) |")
    print("|---" * (len(KEYS) + 2) + "|")
    for (mode, name), rs in runs.items():
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in KEYS}
        row = mode if len(variants) == 1 else f"{mode}, {name}"
        print(f"| {row} | " + " | ".join(f"{mean[k]:.3f}" for k in KEYS) + " | "
              + " / ".join(f"{r['time/step_s']:.3f}" for r in rs) + " |")


if __name__ == "__main__":
    main()
