"""FP8 latent cache against the bf16 one: greedy agreement and log-prob gap on held-out math prompts.

Greedy-decodes the first ``--limit`` held-out problems with a checkpoint on the engine, once with a bf16 cache and
once with ``kv_dtype="fp8"`` (same compute dtype), and prints: the share of positions whose tokens agree, the share
of tokens before the first disagreement, the mean / max |log-prob gap| over those shared prefixes, and the cache
bytes per token. Also compares fp32 against bf16, for scale.

    python bench/fp8_cache.py --model outputs/tiny/sft --limit 32 [--device cuda]
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--heldout", default="data/math/heldout.jsonl")
    p.add_argument("--limit", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in open(args.heldout)][:args.limit]
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=True,
                                       add_generation_prompt=True, return_dict=True)["input_ids"] for r in rows]
    params = SamplingParams(n=1, temperature=0.0, max_tokens=args.max_tokens, logprobs=True)

    def run(dtype, **opts):
        engine = Engine.from_model(model, device=args.device, dtype=dtype, use_tqdm=False, **opts)
        return engine.generate(prompts, params), engine.kv_bytes_per_token()

    ref, ref_bytes = run(torch.bfloat16)
    print(f"| against bf16 cache ({ref_bytes} B/token) | B/token | positions agree | shared prefix | "
          "mean / max log-prob gap |\n|---|---|---|---|---|")
    for name, dtype, opts in (("fp32 engine", torch.float32, {}), ("bf16, fp8 cache", torch.bfloat16,
                                                                  {"kv_dtype": "fp8"})):
        out, nbytes = run(dtype, **opts)
        c = compare(ref, out)
        print(f"| {name} | {nbytes} | {c['positions_agree']:.3f} | {c['shared_prefix']:.3f} | "
              f"{c['gap_mean']:.4f} / {c['gap_max']:.3f} |")


if __name__ == "__main__":
    main()
