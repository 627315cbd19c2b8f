"""The ``align`` command: one sub-command per pipeline stage."""

from __future__ import annotations

import argparse
import logging
import sys

from align.data import DataError
from align.recipe import RecipeError

STAGE_HELP = {
    "data": "build the shipped task data and tokenizer (`align data build`)",
    "sft": "supervised fine-tuning (TRL SFTTrainer)",
    "grpo": "GRPO reinforcement learning with engine rollouts (TRL GRPOTrainer + Ray pool)",
}


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

    data = sub.add_parser("data", help=STAGE_HELP["data"])
    data_sub = data.add_subparsers(dest="action", required=True)
    build = data_sub.add_parser("build", help="generate task data + tokenizer deterministically from a seed")
    build.add_argument("--out", default="data")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--force", action="store_true", help="replace existing generated files")

    for stage in ("sft", "grpo"):
        _add_recipe_args(sub.add_parser(stage, help=STAGE_HELP[stage]))
    return parser


def _run_stage(stage: str, args) -> int:
    import importlib

    from align import recipe

    module = importlib.import_module(f"align.{stage}")  # registers the stage's recipe type
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
        if args.command == "data":
            from align.data import build_all

            summary = build_all(args.out, seed=args.seed, force=args.force)
            print({k: v for k, v in summary.items() if k != "sha256"})
            return 0
        return _run_stage(args.command, args)
    except (RecipeError, DataError, FileExistsError) as e:
        print(f"align: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
