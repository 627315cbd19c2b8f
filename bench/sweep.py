"""Sweep GRPO settings from one SFT: every (setting, seed) run side by side, one table of held-out results.

    python bench/sweep.py --sft outputs/tiny/sft --grid bench/grids/tiny.txt --seeds 0 1 --jobs 2 --out sweeps/a
    python bench/sweep.py ... --device cuda --jobs 12        # many runs on one GPU (fp32, colocated rollouts)

A grid file holds one setting per line, ``name | key=value key=value`` (recipe overrides; ``#`` starts a comment).
Every run scores the split given by ``--split`` (default: the validation split, so settings are never chosen on
the held-out set), both at the start (the SFT) and at the end.  Results: ``<out>/results.jsonl`` (one line per run),
``<out>/table.md`` (setting -> greedy / pass@1 per seed, mean change against the SFT), ``<out>/curves.png`` (each
setting's held-out pass@1 curve, seeds averaged) and each run's folder with its logs and curves.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE_ARGS = {
    "cpu": ["rollout.mode=colocated"],
    "cuda": ["trainer.use_cpu=false", "rollout.mode=colocated", "rollout.device=cuda", "rollout.dtype=float32"],
}


def read_grid(path: Path) -> list[tuple[str, list[str]]]:
    grid = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "|" not in line:
            raise SystemExit(f"{path}:{n}: expected `name | key=value ...`, got {line!r}")
        name, overrides = (part.strip() for part in line.split("|", 1))
        grid.append((name, shlex.split(overrides)))
    if len({name for name, _ in grid}) != len(grid):
        raise SystemExit(f"{path}: setting names must be unique")
    return grid


def run_one(args, name: str, seed: int, overrides: list[str], slot: int) -> dict:
    out = args.out / f"{name}_s{seed}"
    cmd = [sys.executable, "-m", "align", "grpo", "--config", str(args.recipe), f"model.path={args.sft}",
           f"output_dir={out}", f"seed={seed}", f"eval.heldout_math={args.split}", "trainer.report_to=[]",
           "trainer.disable_tqdm=true", "trainer.save_strategy=no", *DEVICE_ARGS[args.device], *args.set,
           *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if args.device == "cpu" and args.pin:
        cmd = ["taskset", "-c", str(slot % os.cpu_count()), *cmd]
    t0 = time.time()
    with open(args.out / f"{name}_s{seed}.log", "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=args.budget).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    row = {"setting": name, "seed": seed, "overrides": overrides, "rc": rc, "seconds": round(time.time() - t0)}
    metrics = out / "metrics.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        row.update({k: m.get(k) for k in ("start_heldout_math_accuracy", "start_heldout_math_pass1",
                                          "heldout_math_accuracy", "heldout_math_pass1", "global_step",
                                          "train_runtime")})
    print(json.dumps(row), flush=True)
    return row


def _f(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "–"


def table(rows: list[dict], seeds: list[int], split: str) -> str:
    head = ["setting"] + [f"seed {s} greedy / pass@1" for s in seeds] + ["mean Δ greedy", "mean Δ pass@1"]
    lines = [f"Split: `{split}`; Δ against the starting SFT scored the same way in each run.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in dict.fromkeys(r["setting"] for r in rows):
        cells, dg, dp = [name], [], []
        for s in seeds:
            r = next((r for r in rows if r["setting"] == name and r["seed"] == s), {})
            if r.get("heldout_math_pass1") is None:
                cells.append(f"failed ({r.get('rc')})" if r else "–")
                continue
            cells.append(f"{_f(r['heldout_math_accuracy'])} / {_f(r['heldout_math_pass1'])}")
            if r.get("start_heldout_math_pass1") is not None:
                dg.append(r["heldout_math_accuracy"] - r["start_heldout_math_accuracy"])
                dp.append(r["heldout_math_pass1"] - r["start_heldout_math_pass1"])
        cells += [f"{100 * sum(d) / len(d):+.1f}" if d else "–" for d in (dg, dp)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name in dict.fromkeys(r["setting"] for r in rows):
        runs = [[json.loads(x) for x in p.read_text().splitlines()]
                for r in rows if r["setting"] == name and (p := out / f"{name}_s{r['seed']}" / "curves.jsonl").exists()]
        if not runs:
            continue
        steps = sorted(set.intersection(*[{p["step"] for p in run} for run in runs]))
        for ax, key in zip(axes, ("heldout_greedy", "heldout_pass1")):
            ys = [sum(next(p[key] for p in run if p["step"] == s) for run in runs) / len(runs) for s in steps]
            ax.plot(steps, ys, marker="o", ms=3, label=name)
    for ax, title in zip(axes, ("greedy accuracy (subset, seeds averaged)", "pass@1 (subset, seeds averaged)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", required=True, type=Path, help="the starting SFT folder, shared by every run")
    p.add_argument("--grid", required=True, type=Path, help="settings file: `name | key=value ...` per line")
    p.add_argument("--recipe", type=Path, default=ROOT / "recipes/tiny/grpo.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--split", default="data/math/validation.jsonl", help="what every run is scored on")
    p.add_argument("--device", choices=sorted(DEVICE_ARGS), default="cpu")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="runs at a time (one thread each)")
    p.add_argument("--pin", action="store_true", help="cpu: pin each run to one core")
    p.add_argument("--budget", type=float, default=None, help="seconds a run may take before it is stopped")
    p.add_argument("--set", nargs="*", default=[], help="overrides for every run")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    if not (args.sft / "config.json").exists():
        raise SystemExit(f"--sft {args.sft}: no model folder there (config.json missing)")
    grid = read_grid(args.grid)
    args.out.mkdir(parents=True, exist_ok=True)
    args.sft, args.out = args.sft.resolve(), args.out.resolve()
    todo = [(name, seed, ov) for name, ov in grid for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: run_one(args, *job[1], slot=job[0]), enumerate(todo)))
    with open(args.out / "results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (args.out / "table.md").write_text(table(rows, args.seeds, args.split))
    draw(args.out, rows)
    print((args.out / "table.md").read_text())
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
