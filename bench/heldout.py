"""Score checkpoints on the held-out math set the way every stage does (greedy accuracy and sampled pass@1), with
more samples per problem and on the CPU, so runs trained on different machines are compared on one footing.

    python bench/heldout.py outputs/tiny/sft outputs/tiny/grpo [--samples 16] [--seeds 0 1] [--out scores.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ["CUDA_VISIBLE_DEVICES"] = ""   # always the CPU engine in fp32: no bf16 rounding in the comparison
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.checkpoint import load_trained  # noqa: E402
from align.metrics import heldout_math  # noqa: E402
from align.model import load_tokenizer  # noqa: E402
from align.recipe import EvalSection  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--data", default="data/math/heldout.jsonl")
    ap.add_argument("--samples", type=int, default=16, help="samples per problem for pass@1 (T=1)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds; one row each")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", help="append one JSON line per checkpoint and seed")
    args = ap.parse_args(argv)
    for path in args.checkpoints:   # all checked before any scoring starts
        if not any((Path(path) / name).is_file() for name in ("config.json", "adapter_config.json")):
            ap.error(f"{path}: not a checkpoint folder (no config.json or adapter_config.json)")
    if not Path(args.data).is_file():
        ap.error(f"--data {args.data}: no such file")
    cfg = EvalSection(heldout_math=args.data, max_new_tokens=args.max_new_tokens, samples=args.samples,
                      temperature=1.0, batch_size=100)
    for path in args.checkpoints:
        model, tokenizer = load_trained(path), load_tokenizer(path)
        for seed in args.seeds:
            m = heldout_math(model, tokenizer, cfg, seed)
            row = {"checkpoint": path, "seed": seed, "samples": args.samples,
                   "greedy": round(m["heldout_math_accuracy"], 4), "pass1": round(m["heldout_math_pass1"], 4)}
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
