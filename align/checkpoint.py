"""Loading what a stage wrote: a full model folder, or a LoRA adapter on top of the model its lock names."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from align.recipe import LOCK_NAME

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def stage_lock(path: str | Path) -> dict | None:
    lock = Path(path) / LOCK_NAME
    return yaml.safe_load(lock.read_text()) if lock.exists() else None


def load_base(model_section: dict, tokenizer, seed: int, dtype: torch.dtype):
    """The starting model a stage's lock describes (recursing through earlier adapters)."""
    from align.model import build_model

    if model_section.get("path"):
        model = load_trained(model_section["path"], dtype)
    else:
        model = build_model(model_section["preset"], None, tokenizer, dtype, seed,
                            model_section.get("overrides") or {})
    if model_section.get("experts_implementation"):
        model.set_experts_implementation(model_section["experts_implementation"])
    # Process-wide: the stage trains this model in this process (the rollout engine has its own kernels).
    torch.backends.cuda.enable_cudnn_sdp(bool(model_section.get("cudnn_attention", False)))
    return model


def load_trained(path: str | Path, dtype: torch.dtype = torch.float32):
    """A plain ``DeepseekV2ForCausalLM`` from a stage's output folder; adapters are merged into their base."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not is_adapter(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    from peft import PeftModel

    lock = stage_lock(path)
    if lock is None:
        raise FileNotFoundError(f"{path} holds a LoRA adapter but no {LOCK_NAME} naming its base model")
    recipe = lock["recipe"]
    from align.model import load_tokenizer

    tok_src = recipe["model"].get("tokenizer") or recipe["model"].get("path") or str(path)
    base = load_base(recipe["model"], load_tokenizer(tok_src), recipe["seed"], dtype)
    return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
