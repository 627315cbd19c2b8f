"""`align run`: stages in order, skip when unchanged, resume after a kill mid-GRPO, report with plots."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from .conftest import ROOT, micro_grpo, micro_sft, run_align, write_recipe


def _pipeline(tmp_path, grpo_steps=3):
    sft = write_recipe(tmp_path / "sft.yaml", micro_sft(tmp_path / "unused", steps=6))
    grpo_raw = micro_grpo(tmp_path / "unused", tmp_path / "unused", steps=grpo_steps, mode="colocated")
    grpo_raw["trainer"].update(save_steps=1, save_total_limit=None)
    grpo_raw["curves"] = {"every": 4, "limit": 3, "samples": 2}
    grpo = write_recipe(tmp_path / "grpo.yaml", grpo_raw)
    raw = {"output_dir": str(tmp_path / "run"), "seed": 0,
           "stages": [{"name": "sft", "recipe": str(sft)},
                      {"name": "grpo", "recipe": str(grpo), "start_from": "sft"}],
           "export": {"out": str(tmp_path / "exported"), "dtype": "fp32"},
           "eval": {"tasks": ["math", "code"], "k": [1, 2], "n": 2, "max_new_tokens": 16, "limit": 3}}
    return write_recipe(tmp_path / "pipeline.yaml", raw)


def _mtime(path):
    return path.stat().st_mtime_ns


@pytest.mark.slow
def test_pipeline_runs_skips_and_resumes(tmp_path):
    recipe = _pipeline(tmp_path, grpo_steps=12)
    run = tmp_path / "run"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "align", "run", "--config", str(recipe)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (run / "grpo" / "checkpoint-2" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)          # killed mid-GRPO
    proc.wait()
    sft_done = _mtime(run / "sft" / "metrics.json")
    assert not (run / "grpo" / "metrics.json").exists()

    res = run_align("run", "--config", recipe, timeout=1200)
    assert "stage sft: unchanged and finished, skipped" in res.stderr
    assert "stage grpo: resuming the interrupted run" in res.stderr
    assert _mtime(run / "sft" / "metrics.json") == sft_done      # SFT was not redone
    assert json.loads((run / "grpo" / "metrics.json").read_text())["global_step"] == 12
    report = (run / "report.md").read_text()
    for name in ("base", "sft", "grpo"):
        assert f"| {name} |" in report
    assert (run / "figures" / "sft_loss.png").exists() and (run / "figures" / "grpo_reward.png").exists()
    assert (run / "figures" / "grpo_expert_load.png").exists()
    assert (run / "figures" / "grpo_expert_entropy.png").exists()
    # Learning curves survive the kill: points before it are kept, the resumed run adds the rest.
    steps = [json.loads(x)["step"] for x in (run / "grpo" / "curves.jsonl").read_text().splitlines()]
    assert steps[0] == 0 and steps[-1] == 12 and {4, 8} <= set(steps) and len(steps) == len(set(steps))
    assert (run / "figures" / "grpo_curves.png").exists() and "figures/grpo_curves.png" in report
    assert "`grpo` against its starting model" in report
    assert (tmp_path / "exported" / "config.json").exists()
    for name in ("base", "sft", "grpo"):
        assert (run / "eval" / name / "eval.json").exists()

    # Unchanged: everything is skipped. Changed GRPO recipe: only GRPO re-runs, the old run is kept aside.
    res = run_align("run", "--config", recipe, timeout=1200)
    assert "stage grpo: unchanged and finished, skipped" in res.stderr
    assert "eval grpo: up to date, skipped" in res.stderr
    raw = yaml.safe_load((tmp_path / "grpo.yaml").read_text())
    raw["trainer"]["max_steps"] = 2
    write_recipe(tmp_path / "grpo.yaml", raw)
    res = run_align("run", "--config", recipe, timeout=1200)
    assert "stage sft: unchanged and finished, skipped" in res.stderr
    assert "stage grpo: inputs changed" in res.stderr
    assert list(run.glob("grpo.replaced-*"))
    assert json.loads((run / "grpo" / "metrics.json").read_text())["global_step"] == 2


def test_stage_fingerprint_names_the_files_generated_prompts_avoid(root):
    from align.pipeline import _data_files

    raw = yaml.safe_load((ROOT / "recipes/tiny/grpo.yaml").read_text())
    files = {str(p) for p in _data_files(raw)}
    assert files == {"data/math/heldout.jsonl", "data/math/validation.jsonl"}
    raw["data"]["train"] = [{"path": "data/math/train.jsonl", "kind": "math"}]
    assert "data/math/train.jsonl" in {str(p) for p in _data_files(raw)}
