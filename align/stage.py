"""What every training stage does around its trainer: output folder rules, final-model writing, lineage."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from align.recipe import LOCK_NAME, RecipeError

log = logging.getLogger(__name__)

FINAL_MARKER = "metrics.json"  # the last file a stage writes: its presence means the stage finished


def prepare_output_dir(out: Path, resume: bool) -> None:
    """A finished or foreign run in ``out`` is never overwritten; ``--resume`` continues an unfinished one."""
    if out.exists() and any(out.iterdir()):
        if (out / FINAL_MARKER).exists():
            raise RecipeError(f"output_dir {out} holds a finished run ({FINAL_MARKER}); "
                              "choose another output_dir or remove it")
        if not resume:
            raise RecipeError(f"output_dir {out} is not empty; pass --resume to continue the run in it, "
                              "or choose another output_dir")
    out.mkdir(parents=True, exist_ok=True)


def last_checkpoint(out: Path) -> Path | None:
    """The latest complete ``checkpoint-N/`` in ``out``. The Trainer writes ``trainer_state.json`` last, so a
    folder without it was cut off mid-write (a killed run) and is passed over, with a warning."""
    ckpts = sorted((p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for p in ckpts:
        if (p / "trainer_state.json").is_file():
            return p
        log.warning("%s has no trainer_state.json (its save was interrupted); not resuming from it", p)
    return None


def install_final(tmp: Path, out: Path) -> None:
    """Move a fully written model folder's files into ``out`` (each move is an atomic rename)."""
    for item in tmp.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    tmp.rmdir()


def lineage(model_path: str | None) -> dict:
    """What the starting checkpoint says about the stage that made it (nanochat-style inheritance log)."""
    if model_path is None:
        return {}
    lock = Path(model_path) / LOCK_NAME
    if not lock.exists():
        return {"from": model_path}
    import yaml

    data = yaml.safe_load(lock.read_text())
    info = {"from": model_path, "stage": data.get("stage"), "sha256": data.get("sha256")}
    log.info("starting from %s (stage %s, recipe sha256 %s)", model_path, info["stage"], str(info["sha256"])[:12])
    return info


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def throughput_metrics(log_history: list[dict], runtime_s: float, world_size: int) -> dict:
    """Tokens/s (per process) from TRL's ``num_tokens`` log and peak accelerator memory."""
    import torch

    tokens = max((h["num_tokens"] for h in log_history if "num_tokens" in h), default=None)
    out = {}
    if tokens and runtime_s:
        out["train_tokens"] = tokens
        out["train_tokens_per_second_per_process"] = tokens / runtime_s / world_size
    if torch.cuda.is_available():
        out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def train_or_resume(trainer, out: Path, resume: bool, world_size: int) -> dict:
    """Run the trainer (from the last ``checkpoint-N/`` when resuming); the stage's training metrics."""
    ckpt = last_checkpoint(out) if resume else None
    if ckpt:
        log.info("resuming from %s", ckpt)
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    return {"train_loss": result.training_loss, "global_step": result.global_step,
            **throughput_metrics(trainer.state.log_history, result.metrics.get("train_runtime", 0.0), world_size),
            **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}


def save_final(trainer, tokenizer, out: Path, state) -> None:
    """Write the final model (or adapter), tokenizer and log history into ``out`` via a temp folder."""
    tmp = out / ".final.tmp"
    trainer.save_model(str(tmp))  # collective under FSDP; writes only on the main process
    state.wait_for_everyone()
    if state.is_main_process:
        tokenizer.save_pretrained(str(tmp))
        write_json(tmp / "log_history.json", {"log_history": trainer.state.log_history})
        install_final(tmp, out)
    state.wait_for_everyone()


def process_group(args):
    """The run's accelerate state, made from the TRL config so the recipe's ``use_cpu`` holds.

    Touching ``args.device`` creates the process group; a ``PartialState`` made before it would pin cpu=False, and
    on a CPU box accelerate then runs N unrelated single processes. That fallback is caught here too.
    """
    import os

    from accelerate import PartialState

    _ = args.device
    state = PartialState()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != state.num_processes:
        raise RuntimeError(
            f"launched {launched} processes but the process group has {state.num_processes}: accelerate fell back "
            "to independent single processes (on CPU set `trainer.use_cpu: true` in the recipe)")
    return state


def claim_output_dir(loaded, out: Path, resume: bool, state) -> None:
    """Check the output folder on the main process, then write the lock there; all ranks wait for it."""
    from align.recipe import write_lock

    if state.is_main_process:
        prepare_output_dir(out, resume)
        write_lock(loaded, out)
    state.wait_for_everyone()
