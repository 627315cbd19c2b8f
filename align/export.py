"""``align export``: turn a stage's output folder into a Hugging Face model folder others can load.

The folder holds a plain ``DeepseekV2ForCausalLM`` (LoRA adapters merged into their base), so
``AutoModelForCausalLM.from_pretrained``, vLLM, SGLang and ``align.engine.Engine.from_pretrained`` all read it:

* ``config.json`` (``model_type: deepseek_v2``) and ``generation_config.json`` (bos/eos/pad from the tokenizer),
* safetensors weights, sharded with ``model.safetensors.index.json`` once they pass ``max_shard_size``,
* the tokenizer with its chat template,
* ``README.md``: a model card with the recipe lock of every stage that made the model (the checkpoint's
  ``recipe.lock.yaml``, then the lock of its ``model.path``, and so on) and each stage's evaluation numbers.

Everything is written into a temporary folder next to ``--out`` and renamed into place, so a failed export
never leaves a half-written folder behind, and an existing folder is replaced (``--force``) only once the new
one is complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from align.recipe import LOCK_NAME

log = logging.getLogger(__name__)

EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Files a stage output may use for its evaluation numbers; `align eval` writes <model>/eval/eval.json by default.
EVAL_FILES = ("eval/eval.json", "eval.json")
METRIC_KEYS = ("heldout_math_accuracy", "heldout_math_pass1")


class ExportError(ValueError):
    """A checkpoint or destination that cannot be exported; the message names the path and the problem."""


# ------------------------------------------------------------------------------------------------------ lineage


@dataclass
class Stage:
    """One stage output folder in a model's ancestry, newest first in :func:`lineage`."""

    path: Path
    lock: dict | None       # the parsed recipe.lock.yaml, None if the folder has none
    lock_text: str | None   # the lock exactly as written, for the model card
    metrics: dict | None    # metrics.json
    evals: dict | None      # eval.json written by `align eval`
    note: str = ""          # why the walk stopped here, if it did early


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError as e:
        log.warning("ignoring %s: not valid JSON (%s)", path, e)
        return None


def _lock_dir(folder: Path) -> Path | None:
    # An intermediate `checkpoint-N/` has no lock of its own; the run that holds it does.
    for cand in (folder, folder.parent):
        if (cand / LOCK_NAME).is_file():
            return cand
    return None


def lineage(path: str | Path, max_depth: int = 32) -> list[Stage]:
    """Every stage that led to the model in ``path``, newest first, following each lock's ``model.path``.

    The walk ends at a stage built from a preset, at a hub id (no local folder), or at a folder without a lock.
    """
    stages: list[Stage] = []
    seen: set[Path] = set()
    current: Path | None = Path(path)
    while current is not None and len(stages) < max_depth:
        folder = current.resolve()
        if folder in seen:
            stages[-1].note = f"lineage loops back to {folder}; stopped"
            break
        seen.add(folder)
        lock_dir = _lock_dir(folder)
        lock_text = (lock_dir / LOCK_NAME).read_text() if lock_dir else None
        lock = yaml.safe_load(lock_text) if lock_text else None
        evals = next((e for e in (_read_json(folder / f) for f in EVAL_FILES) if e), None)
        stage = Stage(folder, lock, lock_text, _read_json(folder / "metrics.json"), evals)
        if lock_dir is not None and lock_dir != folder:
            stage.note = f"an intermediate checkpoint of the run in {lock_dir}"
        stages.append(stage)
        parent = ((lock or {}).get("recipe") or {}).get("model", {}).get("path") if lock else None
        if not parent:
            break
        if not Path(parent).exists():
            where = f"starts from {parent} (a hub id or a folder not present here)"
            stage.note = f"{stage.note}; {where}" if stage.note else where
            break
        current = Path(parent)
    return stages


def tokenizer_source(path: str | Path) -> Path | str:
    """The nearest folder in the lineage that holds a tokenizer (adapters may be saved without one)."""
    for stage in lineage(path):
        if (stage.path / "tokenizer_config.json").is_file():
            return stage.path
        model = ((stage.lock or {}).get("recipe") or {}).get("model") or {}
        if model.get("tokenizer"):
            return model["tokenizer"]
    raise ExportError(f"{path}: no tokenizer in the folder or in any stage its {LOCK_NAME} leads to")


# --------------------------------------------------------------------------------------------------- model card


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("–" if value is None else str(value))


def _eval_columns(evals: dict | None) -> dict[str, float]:
    """``{"math pass@1": 0.4, ...}`` from an eval.json written by ``align eval``."""
    out: dict[str, float] = {}
    for task, res in ((evals or {}).get("tasks") or {}).items():
        for key, value in (res.get("pass_at_k") or {}).items():
            out[f"{task} {key}"] = value
    return out


def eval_table(stages: list[Stage]) -> str:
    cols = list(METRIC_KEYS)
    for s in stages:
        cols += [c for c in _eval_columns(s.evals) if c not in cols]
    lines = ["| stage | folder | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for s in stages:
        values = {**{k: (s.metrics or {}).get(k) for k in METRIC_KEYS}, **_eval_columns(s.evals)}
        stage_name = (s.lock or {}).get("stage", "?")
        lines.append(f"| {stage_name} | `{s.path.name}` | " + " | ".join(_fmt(values.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def model_card(stages: list[Stage], checkpoint: Path, dtype: str, out: Path | None = None) -> str:
    head = stages[0]
    sha = (head.lock or {}).get("sha256")
    front = {"library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["deepseek_v2", "mla", "moe", "trl"] + [(s.lock or {}).get("stage") for s in stages
                                                              if (s.lock or {}).get("stage")]}
    parts = [
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n",
        f"# {checkpoint.name}\n",
        "A DeepSeek-V2-style chat model (Multi-head Latent Attention + DeepSeekMoE) exported from "
        f"`{checkpoint}` (dtype {dtype}). LoRA adapters, if any, are merged into the weights.\n",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"path = {str(out or checkpoint.name)!r}\n"
        "tok = AutoTokenizer.from_pretrained(path)\nmodel = AutoModelForCausalLM.from_pretrained(path)\n"
        "ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"What is 2 + 3?\"}],\n"
        "                              add_generation_prompt=True, return_tensors=\"pt\")\n"
        "print(tok.decode(model.generate(ids, max_new_tokens=64)[0, ids.shape[1]:]))\n```\n",
        "## Evaluation\n",
        "`heldout_math_accuracy`: greedy exact match on the held-out math set; `heldout_math_pass1`: mean "
        "correctness of sampled answers (from each stage's `metrics.json`). `pass@k` columns come from "
        "`align eval` (unbiased estimator).\n",
        eval_table(stages) + "\n",
        "## Lineage\n",
        f"Recipe sha256 of the final stage: `{sha}`. Stages, newest first; each lock re-runs its stage with "
        "`align <stage> --config recipe.lock.yaml`.\n",
    ]
    for i, s in enumerate(stages, start=1):
        lock = s.lock or {}
        title = f"### {i}. {lock.get('stage', 'unknown stage')}: `{s.path}`\n"
        if s.lock_text is None:
            parts += [title, f"No `{LOCK_NAME}` here, so the lineage stops at this folder.\n"]
            continue
        parts += [title, f"recipe sha256 `{lock.get('sha256')}`, git commit `{lock.get('git_commit')}`\n",
                  f"```yaml\n{s.lock_text.rstrip()}\n```\n"]
        if s.note:
            parts.append(s.note + "\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------- export


def _check_paths(checkpoint: Path, out: Path, force: bool) -> None:
    if not checkpoint.is_dir():
        raise ExportError(f"checkpoint folder not found: {checkpoint}")
    if not ((checkpoint / "config.json").is_file() or (checkpoint / "adapter_config.json").is_file()):
        raise ExportError(f"{checkpoint} holds no model (no config.json) and no LoRA adapter (no adapter_config.json)")
    ck, dst = checkpoint.resolve(), out.resolve()
    if dst == ck or dst in ck.parents:
        raise ExportError(f"--out {out} would replace the checkpoint {checkpoint} it exports; choose another folder")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it (it is kept until the new "
                              "export is complete)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")


def _install(tmp: Path, out: Path) -> None:
    """Move the finished export into place; an old folder is swapped out, then deleted."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)  # put the previous export back
        raise
    shutil.rmtree(old)


def export(checkpoint: str | Path, out: str | Path, dtype: str | None = None, force: bool = False,
           max_shard_size: str | int = "2GB") -> Path:
    """Write ``checkpoint`` (a stage output folder, full model or LoRA adapter) to ``out`` as a HF model folder.

    ``dtype`` is ``bf16``, ``fp16`` or ``fp32`` (default: keep the checkpoint's). Returns ``out``.
    """
    from align.checkpoint import is_adapter, load_trained
    from align.model import load_tokenizer
    from transformers import GenerationConfig

    checkpoint, out = Path(checkpoint), Path(out)
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}")
    _check_paths(checkpoint, out, force)
    stages = lineage(checkpoint)
    source = tokenizer_source(checkpoint)
    try:
        tokenizer = load_tokenizer(source)
    except (OSError, ValueError) as e:
        raise ExportError(f"{checkpoint}: cannot load its tokenizer from {source}: {e}") from e

    dtype = dtype or _checkpoint_dtype(checkpoint, stages)
    # An adapter is merged in fp32 and cast afterwards, so the merged weights are as exact as the dtype allows;
    # a full model loads straight in the export dtype (the same rounding, without an fp32 copy in memory).
    load_dtype = torch.float32 if is_adapter(checkpoint) else EXPORT_DTYPES[dtype]
    model = load_trained(checkpoint, load_dtype).to(EXPORT_DTYPES[dtype])
    model.eval()
    # Training turns the KV cache off; an exported model is for inference.
    model.config.use_cache = True
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, key, getattr(tokenizer, key))
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        log.info("writing %s weights (%.2fM parameters) to %s", dtype,
                 sum(p.numel() for p in model.parameters()) / 1e6, out)
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        tokenizer.save_pretrained(str(tmp))
        if tokenizer.chat_template and not _has_chat_template(tmp):
            raise ExportError(f"tokenizer from {source} lost its chat template on save")
        (tmp / "README.md").write_text(model_card(stages, checkpoint, dtype, out))
        # Stage bookkeeping travels as part of the card, not as files loaders might trip over.
        for leftover in ("training_args.bin",):
            (tmp / leftover).unlink(missing_ok=True)
        if out.exists() and not force:  # appeared while we were writing
            raise FileExistsError(f"{out} already exists; pass --force to replace it")
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s -> %s", checkpoint, out)
    return out


def _checkpoint_dtype(checkpoint: Path, stages: list[Stage]) -> str:
    """The dtype the checkpoint was trained in (its config, else its lock), as an EXPORT_DTYPES key."""
    names = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    config = _read_json(checkpoint / "config.json") or {}
    model_section = ((stages[0].lock or {}).get("recipe") or {}).get("model") or {}
    return names.get(config.get("dtype") or config.get("torch_dtype") or model_section.get("dtype"), "fp32")


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file():
        return True
    config = _read_json(folder / "tokenizer_config.json") or {}
    return bool(config.get("chat_template"))


# ---------------------------------------------------------------------------------------------------------- CLI


def configure_parser(parser, command: str) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a stage output folder (full model or LoRA adapter)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder to write; refused if it exists, unless --force")
    parser.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default=None,
                        help="convert the weights (default: keep the checkpoint's dtype)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing --out (only after the new export is fully written)")
    parser.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                        help="split the safetensors into shards of at most this size, e.g. 200MB (default 2GB)")


def cli_main(args) -> int:
    import sys

    try:
        out = export(args.checkpoint, args.out, dtype=args.dtype, force=args.force,
                     max_shard_size=args.max_shard_size)
    except (ExportError, FileNotFoundError, FileExistsError) as e:
        print(f"align export: error: {e}", file=sys.stderr)
        return 2
    files = sorted(p.name for p in out.iterdir())
    print(f"exported {args.checkpoint} -> {out} ({', '.join(files)})")
    return 0
