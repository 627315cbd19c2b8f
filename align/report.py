"""The run report: ``report.md`` with PNG plots and the base → SFT → GRPO results table."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training boxes
import matplotlib.pyplot as plt  # noqa: E402

from align.curves import draw_curves, history_of, read_curves, series  # noqa: E402

HELDOUT_KEYS = ("heldout_math_accuracy", "heldout_math_pass1")


def _plot(path: Path, title: str, curves: dict[str, tuple[list, list]], ylabel: str) -> Path | None:
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, (x, y) in curves.items():
        ax.plot(x, y, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _expert_load_plot(stage_dir: Path, path: Path) -> Path | None:
    """Per-layer token share of each routed expert over the last rollouts (a heat map)."""
    log = stage_dir / "rollouts.jsonl"
    if not log.exists():
        return None
    loads = [json.loads(line).get("expert_load") for line in log.read_text().splitlines()]
    loads = [x for x in loads if x]
    if not loads:
        return None
    import numpy as np

    recent = np.array(loads[-10:], dtype=float).sum(axis=0)           # (layers, experts)
    share = recent / recent.sum(axis=1, keepdims=True)
    fig, ax = plt.subplots(figsize=(6, 1 + 0.5 * share.shape[0]))
    im = ax.imshow(share, aspect="auto", cmap="viridis")
    ax.set_xlabel("routed expert")
    ax.set_ylabel("MoE layer")
    ax.set_title("expert load (token share, last 10 rollouts)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _metrics(stage_dir: Path) -> dict:
    path = stage_dir / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "–"


def results_table(out: Path, stage_names: list[str], evals: dict[str, dict]) -> str:
    pass_keys = sorted({(task, k) for res in evals.values() for task, body in res.get("tasks", {}).items()
                        for k in body.get("pass_at_k", {})})
    head = ["model", "held-out math greedy", "held-out math pass@1 (sampled)"]
    head += [f"{task} {k}" if str(k).startswith("pass@") else f"{task} pass@{k}" for task, k in pass_keys]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in ["base", *stage_names]:
        if name not in evals and not (out / name / "metrics.json").exists():
            continue
        m = _metrics(out / name)
        cells = [name, _fmt(m.get("heldout_math_accuracy")), _fmt(m.get("heldout_math_pass1"))]
        tasks = evals.get(name, {}).get("tasks", {})
        cells += [_fmt(tasks.get(task, {}).get("pass_at_k", {}).get(k)) for task, k in pass_keys]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def learning_lines(name: str, stage_dir: Path) -> list[str]:
    """What a GRPO stage did to its starting model, and its held-out curve, as report lines."""
    m, points = _metrics(stage_dir), read_curves(stage_dir)
    if "start_heldout_math_pass1" not in m:
        return []
    d_pass = 100 * (m["heldout_math_pass1"] - m["start_heldout_math_pass1"])
    d_greedy = 100 * (m["heldout_math_accuracy"] - m["start_heldout_math_accuracy"])
    lines = [f"`{name}` against its starting model (full held-out set): sampled pass@1 "
             f"{m['start_heldout_math_pass1']:.3f} → {m['heldout_math_pass1']:.3f} ({d_pass:+.1f} points), greedy "
             f"{m['start_heldout_math_accuracy']:.3f} → {m['heldout_math_accuracy']:.3f} ({d_greedy:+.1f} points)."]
    if points:
        curve = ", ".join(f"{p['step']}: {p['heldout_greedy']:.2f} / {p['heldout_pass1']:.2f}" for p in points)
        lines.append(f"Held-out subset ({points[0]['problems']} problems) greedy / pass@1 by step: {curve}.")
    return lines + [""]


def write_report(out: Path, recipe, evals: dict[str, dict], summary: dict) -> Path:
    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    stage_dirs = {e.name: out / e.name for e in recipe.stages}
    plots = []
    for name, d in stage_dirs.items():
        h = history_of(d)
        plots.append(_plot(figs / f"{name}_loss.png", f"{name}: training loss", {"loss": series(h, "loss")}, "loss"))
        plots.append(_plot(figs / f"{name}_reward.png", f"{name}: reward and accuracy",
                           {"reward": series(h, "reward"),
                            "math accuracy": series(h, "rewards/math_accuracy/mean")}, "mean over completions"))
        plots.append(_plot(figs / f"{name}_kl.png", f"{name}: KL to reference", {"kl": series(h, "kl")}, "KL"))
        plots.append(_plot(figs / f"{name}_length.png", f"{name}: completion length",
                           {"mean": series(h, "completions/mean_length")}, "tokens"))
        plots.append(_expert_load_plot(d, figs / f"{name}_expert_load.png"))
        layers = sorted({int(k[len("experts/layer"):-len("_load_entropy")]) for e in h for k in e
                         if k.startswith("experts/layer") and k.endswith("_load_entropy")})
        plots.append(_plot(figs / f"{name}_expert_entropy.png", f"{name}: expert-load entropy (1 = uniform)",
                           {f"MoE layer {i}": series(h, f"experts/layer{i}_load_entropy") for i in layers},
                           "normalised entropy"))
        if read_curves(d):
            plots.insert(0, draw_curves(d, figs / f"{name}_curves.png", history=h, title=f"{name}: learning curves"))
    lines = [f"# Pipeline report: {out}", "",
             f"Stages: {' → '.join(stage_dirs)}. Wall time {summary['seconds']:.0f} s "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in summary['stage_seconds'].items())}).", "",
             "## Results", "",
             "Held-out math columns come from each stage's `metrics.json` (greedy exact match; mean of sampled "
             "completions at the recipe temperature). pass@k columns come from `align eval` (unbiased estimator).", "",
             results_table(out, list(stage_dirs), evals), ""]
    for name, d in stage_dirs.items():
        lines += learning_lines(name, d)
    for name in stage_dirs:
        m = _metrics(out / name)
        lock = out / name / "recipe.lock.yaml"
        if m:
            lines.append(f"- `{name}`: recipe sha256 `{m.get('recipe_sha256', '?')[:12]}`, lock `{lock}`, "
                         f"steps {m.get('global_step', '?')}, train runtime {_fmt(m.get('train_runtime'))} s")
    if summary.get("exported"):
        lines += ["", f"Exported model: `{summary['exported']}`"]
    lines += ["", "## Plots", ""]
    lines += [f"![{p.stem}](figures/{p.name})" for p in plots if p]
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path
