"""FP8 rollouts against bf16 ones: greedy agreement and log-prob gap on held-out math prompts.

Greedy-decodes the first ``--limit`` held-out problems with a checkpoint on the engine in bf16, then with an FP8
latent cache (``kv_dtype="fp8"``), FP8 projection weights (``weight_dtype="fp8"``) and both, and prints per
variant: the share of positions whose tokens agree, the share of tokens before the first disagreement, the mean /
max |log-prob gap| over those shared prefixes, cache bytes per token and weight bytes. Also compares fp32
against bf16, for scale.

    python bench/fp8_rollout.py --model outputs/tiny/sft --limit 32 [--device cuda]

``--capacity lite --card-gib 79.1``: instead, the sequences of ``--context`` tokens whose latent cache fits on a card
of that size beside the weights and ``--reserve-gib`` of working memory, per variant, from the engine's own byte
counts on the meta device (arithmetic, not a measurement).
"""

from __future__ import annotations

import argparse
import json

import torch

from align.engine import Engine, SamplingParams
from align.model import load_tokenizer


def compare(ref, out) -> dict:
    agree = total = shared = 0
    gaps: list[float] = []
    for a, b in zip(ref, out):
        x, y = a.outputs[0], b.outputs[0]
        first = next((i for i, (p, q) in enumerate(zip(x.token_ids, y.token_ids)) if p != q), len(x.token_ids))
        agree += sum(p == q for p, q in zip(x.token_ids, y.token_ids))
        total += len(x.token_ids)
        shared += first
        gaps += [abs(p - q) for p, q in zip(x.logprobs[:first], y.logprobs[:first])]
    return {"positions_agree": agree / total, "shared_prefix": shared / total,
            "gap_mean": sum(gaps) / max(len(gaps), 1), "gap_max": max(gaps, default=0.0), "tokens": total}


VARIANTS = (("bf16", {}), ("fp8 cache", {"kv_dtype": "fp8"}), ("fp8 weights", {"weight_dtype": "fp8"}),
            ("fp8 cache + weights", {"kv_dtype": "fp8", "weight_dtype": "fp8"}))


def capacity(preset: str, card_gib: float, reserve_gib: float, context: int) -> None:
    from align.model import build_config

    config = build_config(preset)
    print(f"| {preset}, {card_gib} GiB card, {reserve_gib} GiB reserved | weights GiB | cache B/token | "
          f"sequences of {context} tokens | vs bf16 |\n|---|---|---|---|---|")
    base = None
    for name, opts in VARIANTS:
        e = Engine.from_config(config, device="meta", dtype=torch.bfloat16, num_blocks=8, use_tqdm=False, **opts)
        weights, per_token = e.weights.num_bytes() / 2**30, e.kv_bytes_per_token()
        seqs = int((card_gib - weights - reserve_gib) * 2**30 // (context * per_token))
        base = base or seqs
        print(f"| {name} | {weights:.2f} | {per_token:,} | {seqs} | {seqs / base:.2f}x |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--capacity", metavar="PRESET")
    p.add_argument("--card-gib", type=float, default=79.1)
    p.add_argument("--reserve-gib", type=float, default=8.0)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--heldout", default="data/math/heldout.jsonl")
    p.add_argument("--limit", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.capacity:
        return capacity(args.capacity, args.card_gib, args.reserve_gib, args.context)
    if not args.model:
        p.error("--model (or --capacity) is required")
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in open(args.heldout)][:args.limit]
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=True,
                                       add_generation_prompt=True, return_dict=True)["input_ids"] for r in rows]
    params = SamplingParams(n=1, temperature=0.0, max_tokens=args.max_tokens, logprobs=True)

    def run(dtype, **opts):
        engine = Engine.from_model(model, device=args.device, dtype=dtype, use_tqdm=False, **opts)
        return engine.generate(prompts, params), engine.kv_bytes_per_token(), engine.weights.num_bytes()

    ref, ref_bytes, ref_weights = run(torch.bfloat16)
    print(f"| against bf16 ({ref_bytes} B/token cache, {ref_weights / 2**20:.1f} MiB weights) | cache B/token | "
          "weights MiB | positions agree | shared prefix | mean / max log-prob gap |\n|---|---|---|---|---|---|")
    variants = [("fp32 engine", torch.float32, {})] + [(f"bf16, {n}", torch.bfloat16, o) for n, o in VARIANTS[1:]]
    for name, dtype, opts in variants:
        out, nbytes, wbytes = run(dtype, **opts)
        c = compare(ref, out)
        print(f"| {name} | {nbytes} | {wbytes / 2**20:.1f} | {c['positions_agree']:.3f} | {c['shared_prefix']:.3f} | "
              f"{c['gap_mean']:.4f} / {c['gap_max']:.3f} |")


if __name__ == "__main__":
    main()
