"""Recipes: YAML files mapped 1:1 onto typed dataclasses, validated before any work starts.

A recipe's sections are dataclasses (``model``, ``data``, ``peft``, ``eval``, ...), except ``trainer``, which is
handed straight to TRL's config class (``SFTConfig``, ``GRPOConfig``, ``RewardConfig``) so every TRL option is
available.  Every key is checked: an unknown key or a value of the wrong type fails with the file and the dotted
key.  ``key.sub=value`` arguments override the file.  Each run writes ``recipe.lock.yaml`` (the resolved recipe,
its sha256, installed package versions and the git commit) into its output folder; passing that lock back as
``--config`` re-runs the same recipe and refuses if installed versions drifted, unless ``--allow-drift``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import importlib
import importlib.metadata
import subprocess
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from align.expert_balance import MoESection
from align.grad_guard import GradGuardSection

LOCK_NAME = "recipe.lock.yaml"
LOCKED_PACKAGES = ("torch", "transformers", "trl", "accelerate", "peft", "datasets", "ray", "align")


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and the key."""


# ---------------------------------------------------------------------------------------------------------------
# Sections shared by the stage recipes


@dataclasses.dataclass
class ModelSection:
    preset: str | None = dataclasses.field(default=None, metadata={"help": "build from scratch: tiny|small|lite|v2"})
    path: str | None = dataclasses.field(default=None, metadata={"help": "start from a local folder or hub id"})
    tokenizer: str | None = dataclasses.field(
        default=None, metadata={"help": "tokenizer folder or hub id; defaults to `path`"})
    dtype: Literal["float32", "bfloat16", "float16"] = dataclasses.field(
        default="float32", metadata={"help": "dtype the weights are loaded/built in"})
    overrides: dict = dataclasses.field(
        default_factory=dict, metadata={"help": "DeepseekV2Config fields that replace the preset's"})
    experts_implementation: Literal["eager", "grouped_mm", "batched_mm"] | None = dataclasses.field(
        default=None, metadata={"help": "how the trainer runs the routed experts (transformers' kernels); "
                                        "None = transformers' default, grouped_mm where the device has it"})
    cudnn_attention: bool = dataclasses.field(
        default=False, metadata={"help": "let PyTorch's SDPA use cuDNN's attention kernels on CUDA while this model "
                                         "trains. Off by default: on H100/H200 with torch 2.11-2.13 their backward "
                                         "returns NaN grad_q when a padding mask is passed and the padded length is "
                                         "64 mod 128 (pytorch#196678); the memory-efficient kernel takes over (flash "
                                         "needs equal q and v head dims, which MLA does not have)"})


@dataclasses.dataclass
class DataSource:
    path: str = dataclasses.field(metadata={"help": ".jsonl, .parquet, or a `datasets` hub id / folder"})
    kind: Literal["math", "code", "chat"] = dataclasses.field(metadata={"help": "row schema"})
    columns: dict = dataclasses.field(default_factory=dict, metadata={"help": "source column -> our column"})
    split: str = dataclasses.field(default="train", metadata={"help": "split for hub datasets"})
    limit: int | None = dataclasses.field(default=None, metadata={"help": "use at most this many rows"})


@dataclasses.dataclass
class PeftSection:
    r: int = dataclasses.field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = dataclasses.field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = dataclasses.field(default=0.0, metadata={"help": "LoRA dropout"})
    target_modules: list[str] = dataclasses.field(
        default_factory=lambda: ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                                 "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "module names that get adapters (PEFT also wraps the stacked routed-expert tensors "
                      "`gate_up_proj`/`down_proj` when `down_proj` is listed)"})


@dataclasses.dataclass
class EvalSection:
    heldout_math: str = dataclasses.field(metadata={"help": "held-out math set scored at the end of the stage"})
    limit: int | None = dataclasses.field(default=None, metadata={"help": "score at most this many problems"})
    max_new_tokens: int = dataclasses.field(default=64, metadata={"help": "generation budget per answer"})
    samples: int = dataclasses.field(default=4, metadata={"help": "samples per problem for heldout_math_pass1"})
    temperature: float = dataclasses.field(default=1.0, metadata={"help": "sampling temperature for pass1"})
    batch_size: int = dataclasses.field(default=64, metadata={"help": "prompts per generation batch"})


@dataclasses.dataclass
class SFTData:
    train: list[DataSource] = dataclasses.field(metadata={"help": "training sources, mixed"})
    heldout: list[DataSource] = dataclasses.field(
        default_factory=list, metadata={"help": "sources for held-out loss"})


@dataclasses.dataclass
class SFTRecipe:
    output_dir: str
    seed: int
    model: ModelSection
    data: SFTData
    eval: EvalSection
    trainer: dict = dataclasses.field(default_factory=dict, metadata={"help": "passed to trl.SFTConfig"})
    peft: PeftSection | None = None
    moe: MoESection = dataclasses.field(default_factory=MoESection)
    grad_guard: GradGuardSection = dataclasses.field(default_factory=GradGuardSection)


STAGES: dict[str, type] = {"sft": SFTRecipe}
# Stage modules register their recipe types on import; `load` imports them on demand.
STAGE_MODULES = {"sft": "align.sft", "rm": "align.reward_model", "grpo": "align.grpo", "pipeline": "align.pipeline"}
TRAINER_CONFIGS = {"sft": "SFTConfig", "grpo": "GRPOConfig", "rm": "RewardConfig"}
# Set by the stage itself (the recipe owns them at top level).
_TRAINER_RESERVED = {"output_dir", "seed", "reward_weights"}


def register_stage(name: str, recipe_cls: type, trainer_config: str | None = None) -> None:
    """Stage modules register their recipe dataclass (keeps this module free of stage imports)."""
    STAGES[name] = recipe_cls
    if trainer_config:
        TRAINER_CONFIGS[name] = trainer_config


# ---------------------------------------------------------------------------------------------------------------
# Type checking of plain YAML values against dataclass annotations


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise RecipeError naming ``where``."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except RecipeError as e:
                errors.append(e)
        if len(errors) == 1:  # `X | None`: report what X wanted
            raise errors[0]
        raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool):   # YAML 1.1 reads a bare off / on / no / yes as a bool
            value = next((w for w in (("on", "yes", "true") if value else ("off", "no", "false"))
                          if w in typing.get_args(tp)), value)
        if value not in typing.get_args(tp):
            raise RecipeError(f"{where}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]
        if isinstance(value, bool) and ("yes" if value else "no") in values:
            return "yes" if value else "no"   # YAML 1.1 reads a bare `no` as false
        if value not in values:
            raise RecipeError(f"{where}: expected one of {values}, got {value!r}")
        return value
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML reads 1e-3 as a string; accept numeric strings for floats only.
        if isinstance(value, bool):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    return value  # annotations we do not model (enums, callables) are left to the consumer


def build_dataclass(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping for {cls.__name__}, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise RecipeError(f"{where}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(fields))})"
                          .replace(": .", ": "))
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{key}: required key is missing")
    try:
        return cls(**kwargs)
    except ValueError as e:   # a section's own checks (__post_init__)
        raise RecipeError(f"{where or cls.__name__}: {e}") from None


def _trainer_config_class(stage: str):
    import trl

    return getattr(trl, TRAINER_CONFIGS[stage])


def check_trainer_section(stage: str, trainer: dict, where: str) -> dict:
    """Unknown or mistyped ``trainer:`` keys fail here, not deep inside TRL; returns the typed values."""
    cfg_cls = _trainer_config_class(stage)
    hints = typing.get_type_hints(cfg_cls)
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    typed = {}
    for key, value in trainer.items():
        if key in _TRAINER_RESERVED:
            raise RecipeError(f"{where}trainer.{key}: set this in the recipe's own section "
                              "(`output_dir`/`seed` at top level, weights under `rewards:`)")
        if key not in names:
            raise RecipeError(f"{where}trainer.{key}: not an option of trl.{cfg_cls.__name__}")
        typed[key] = _coerce(value, hints.get(key, Any), f"{where}trainer.{key}")
    return typed


# ---------------------------------------------------------------------------------------------------------------
# Loading, overrides, locks


def parse_overrides(pairs: list[str]) -> list[tuple[list[str], Any]]:
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise RecipeError(f"command line: override {pair!r} is not key.sub=value")
        key, _, text = pair.partition("=")
        out.append((key.strip().split("."), yaml.safe_load(text) if text else None))
    return out


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for keys, value in parse_overrides(overrides):
        node = raw
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise RecipeError(f"command line: {'.'.join(keys)}: {k} is not a section")
            node = node[k]
        node[keys[-1]] = value
    return raw


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in LOCKED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    return res.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def recipe_sha256(resolved: dict) -> str:
    canonical = yaml.safe_dump(resolved, sort_keys=True, default_flow_style=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclasses.dataclass
class Loaded:
    stage: str
    recipe: Any           # the stage's dataclass
    resolved: dict        # plain dict, as written to the lock
    sha256: str
    source: Path
    drift: dict           # package -> (locked, installed) where they differ; empty unless loaded from a lock


def to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections")
    return raw


def load(stage: str, path: str | Path, overrides: list[str] = (), allow_drift: bool = False,
         check_files: bool = True) -> Loaded:
    """Read, override, validate; returns the typed recipe.  Nothing is written here."""
    path = Path(path)
    raw = read_yaml(path)
    drift: dict = {}
    if "sha256" in raw and "recipe" in raw and "versions" in raw:  # a lock file
        if raw.get("stage") != stage:
            raise RecipeError(f"{path}: this lock is for stage {raw.get('stage')!r}, not {stage!r}")
        installed = package_versions()
        drift = {k: (v, installed.get(k)) for k, v in raw["versions"].items()
                 if k != "align" and installed.get(k) != v}
        if drift and not allow_drift:
            lines = ", ".join(f"{k} locked {a} installed {b}" for k, (a, b) in drift.items())
            raise RecipeError(f"{path}: package versions drifted from the lock ({lines}); "
                              "install the locked versions or pass --allow-drift")
        raw = raw["recipe"]
    if stage not in STAGES and stage in STAGE_MODULES:
        importlib.import_module(STAGE_MODULES[stage])
    if stage not in STAGES:
        raise RecipeError(f"unknown stage {stage!r}")
    try:
        raw = apply_overrides(raw, list(overrides))
        recipe = build_dataclass(STAGES[stage], raw, "")
        if "trainer" in raw:
            recipe.trainer = check_trainer_section(stage, raw["trainer"] or {}, "")
        if check_files:
            check_paths(recipe)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
    resolved = to_plain(recipe)
    return Loaded(stage, recipe, resolved, recipe_sha256(resolved), path, drift)


def _is_local_path(p: str) -> bool:
    return p.startswith((".", "/")) or Path(p).suffix in (".jsonl", ".json", ".parquet") or Path(p).exists()


def check_paths(recipe: Any, prefix: str = "") -> None:
    """Files the recipe names must exist before any work starts (hub ids are left to the loader)."""
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_paths(value, key + ".")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if dataclasses.is_dataclass(v):
                    check_paths(v, f"{key}[{i}].")
                elif f.name == "exclude" and isinstance(v, str) and not Path(v).exists():
                    raise RecipeError(f"{key}[{i}]: file not found: {v}")
        elif f.name in ("path", "heldout_math", "tokenizer") and isinstance(value, str):
            if key in ("model.path", "model.tokenizer") and not _is_local_path(value):
                continue  # a hub id
            if f.name == "path" and not _is_local_path(value):
                continue
            if not Path(value).exists():
                raise RecipeError(f"{key}: file not found: {value}")


def write_lock(loaded: Loaded, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = {
        "stage": loaded.stage,
        "sha256": loaded.sha256,
        "source": str(loaded.source),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "recipe": loaded.resolved,
    }
    tmp = out_dir / (LOCK_NAME + ".tmp")
    tmp.write_text(yaml.safe_dump(lock, sort_keys=False))
    tmp.replace(out_dir / LOCK_NAME)
    return out_dir / LOCK_NAME


def trainer_config(stage: str, recipe: Any, **fixed):
    """The TRL config object for a stage: the recipe's ``trainer:`` plus the top-level output_dir/seed."""
    cfg_cls = _trainer_config_class(stage)
    return cfg_cls(output_dir=recipe.output_dir, seed=recipe.seed, **{**recipe.trainer, **fixed})


def stage_of(path: str | Path) -> str:
    """The stage a recipe file is for, from its name: ``sft.yaml``, ``grpo_stage2.yaml``, ``rm.yaml`` ..."""
    stem = Path(path).stem.split(".")[0]
    for stage in sorted(STAGE_MODULES, key=len, reverse=True):
        if stem == stage or stem.startswith(stage + "_") or stem.startswith(stage + "-"):
            return stage
    raise RecipeError(f"{path}: cannot tell the stage from the file name (expected one of {sorted(STAGE_MODULES)})")
