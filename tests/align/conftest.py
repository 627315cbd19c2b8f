"""Shared helpers: small stage recipes derived from the shipped tiny ones, run in a temp folder."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

# Small enough that a stage runs in seconds on 2 cores, still MLA + MoE (1 dense layer, 1 MoE layer).
MICRO_MODEL = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
               "n_routed_experts": 4, "num_experts_per_tok": 2}


def micro_sft(out_dir: Path, steps: int = 8, **extra) -> dict:
    raw = yaml.safe_load((ROOT / "recipes/tiny/sft.yaml").read_text())
    raw["output_dir"] = str(out_dir)
    raw["model"]["overrides"] = dict(MICRO_MODEL)
    for src in raw["data"]["train"]:
        src["limit"] = 128
    for src in raw["data"]["heldout"]:
        src["limit"] = 32
    raw["eval"].update(limit=8, samples=2, max_new_tokens=16, batch_size=8)
    raw["trainer"].update(max_steps=steps, save_steps=max(1, steps // 2), logging_steps=2,
                          per_device_train_batch_size=8, warmup_steps=0, report_to=[], disable_tqdm=True)
    for key, value in extra.items():
        raw[key] = value
    return raw


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_align(*args, env=None, timeout=600, check=True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    res = subprocess.run([sys.executable, "-m", "align", *map(str, args)], cwd=ROOT, env=full_env,
                         capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"align {' '.join(map(str, args))} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return res


@pytest.fixture
def root(monkeypatch):
    monkeypatch.chdir(ROOT)
    return ROOT


def micro_grpo(out_dir: Path, sft_dir: Path, steps: int = 3, mode: str = "ray", **extra) -> dict:
    raw = yaml.safe_load((ROOT / "recipes/tiny/grpo.yaml").read_text())
    raw["output_dir"] = str(out_dir)
    raw["model"]["path"] = str(sft_dir)
    for src in raw["data"].get("train", []):
        src["limit"] = 64
    raw["curves"] = {"every": 0}
    # One rollout per step, as the version checks below expect; dynamic sampling has its own tests.
    raw["dynamic_sampling"] = {"enabled": False}
    raw["eval"].update(limit=4, samples=2, max_new_tokens=16, batch_size=8)
    raw["rollout"].update(mode=mode, num_cpus=0.5, timeout_s=120)
    raw["trainer"].update(max_steps=steps, save_steps=max(1, steps // 2), logging_steps=1, num_generations=4,
                          per_device_train_batch_size=8, max_completion_length=16, report_to=[], disable_tqdm=True)
    for key, value in extra.items():
        raw[key] = value
    return raw


@pytest.fixture(scope="session")
def micro_sft_dir(tmp_path_factory) -> Path:
    """One small trained SFT folder shared by the GRPO/export tests."""
    base = tmp_path_factory.mktemp("micro_sft")
    out = base / "sft"
    run_align("sft", "--config", write_recipe(base / "sft.yaml", micro_sft(out, steps=10)))
    return out
