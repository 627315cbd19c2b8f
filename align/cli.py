"""The ``align`` command: one sub-command per pipeline stage.

Recipe-driven stages (``sft``, ``rm``, ``grpo``) share the recipe arguments and each module's ``run(loaded, resume)``.
Other commands live in their own module, which provides ``configure_parser(parser, command)`` and
``cli_main(args) -> int`` (``args.command`` names the command);
a command appears in ``align --help`` once its module exists.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from align.data import DataError
from align.recipe import RecipeError

# command -> (module, help, recipe stage)
RECIPE_STAGES = {
    "run": ("align.pipeline", "run the whole pipeline from one recipe (stage by stage, resumable) with a report",
            "pipeline"),
    "sft": ("align.sft", "supervised fine-tuning (TRL SFTTrainer)", "sft"),
    "rm": ("align.reward_model", "train a learned reward model from verifier-labelled pairs (TRL RewardTrainer)",
           "rm"),
    "grpo": ("align.grpo", "GRPO with engine rollouts from a Ray actor pool (TRL GRPOTrainer)", "grpo"),
}
COMMANDS = {
    "export": ("align.export", "merge adapters and write a Hugging Face folder (safetensors, tokenizer, card)"),
    "eval": ("align.evaluate", "pass@k on held-out math/code (or HumanEval/GSM8K jsonl) with the engine"),
    "submit": ("ray_jobs.submit", "submit a stage recipe as a Ray Job to a running cluster"),
    "jobs": ("ray_jobs.submit", "list / status / logs / stop Ray Jobs"),
}


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="stage recipe YAML, or a recipe.lock.yaml to re-run")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in output_dir")
    p.add_argument("--allow-drift", action="store_true",
                   help="run a lock file even if installed package versions differ from it")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description="SFT + GRPO alignment pipeline for "
                                     "DeepSeek-V2-style (MLA + MoE) models.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="stage")

    data = sub.add_parser("data", help="build the shipped task data and tokenizer (`align data build`)")
    data_sub = data.add_subparsers(dest="action", required=True)
    build = data_sub.add_parser("build", help="generate task data + tokenizer deterministically from a seed")
    build.add_argument("--out", default="data")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--force", action="store_true", help="replace existing generated files")
    val = data_sub.add_parser("validation", help="write a math validation split disjoint from the given files "
                                                 "(choose recipe settings on it, not on the held-out set)")
    val.add_argument("--out", default="data/math/validation.jsonl")
    val.add_argument("--avoid", nargs="+", default=["data/math/train.jsonl", "data/math/heldout.jsonl"])
    val.add_argument("--n", type=int, default=200)
    val.add_argument("--seed", type=int, default=0)
    val.add_argument("--force", action="store_true", help="replace an existing file")

    for stage, (module, help_text, _) in RECIPE_STAGES.items():
        if _available(module):
            _add_recipe_args(sub.add_parser(stage, help=help_text))
    for name, (module, help_text) in COMMANDS.items():
        if _available(module):
            p = sub.add_parser(name, help=help_text)
            p.set_defaults(_module=module)
            importlib.import_module(module).configure_parser(p, name)
    return parser


def _run_stage(command: str, args) -> int:
    from align import recipe

    module_name, _, stage = RECIPE_STAGES[command]
    module = importlib.import_module(module_name)  # registers the stage's recipe type
    loaded = recipe.load(stage, args.config, args.overrides, allow_drift=args.allow_drift)
    for name, (locked, installed) in loaded.drift.items():
        logging.warning("version drift: %s locked %s, installed %s", name, locked, installed)
    module.run(loaded, resume=args.resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "data" and args.action == "validation":
            from align.task_stream import build_validation

            print(build_validation(args.out, args.avoid, n=args.n, seed=args.seed, force=args.force))
            return 0
        if args.command == "data":
            from align.data import build_all

            summary = build_all(args.out, seed=args.seed, force=args.force)
            print({k: v for k, v in summary.items() if k != "sha256"})
            return 0
        if args.command in RECIPE_STAGES:
            return _run_stage(args.command, args)
        return importlib.import_module(args._module).cli_main(args)
    except (RecipeError, DataError, FileExistsError) as e:
        print(f"align: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
