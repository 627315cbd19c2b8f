"""Rollout throughput: align.engine against transformers' ``model.generate`` on the same model and prompts.

Random weights, random prompts of ``--prompt-len`` tokens, ``--new-tokens`` sampled at temperature 1 with EOS
ignored, so both sides produce exactly batch x new-tokens tokens. Prints a markdown table. On CUDA it also
prints the peak memory of each run and the fraction of the memory-bandwidth bound reached: the bytes a decode
step cannot avoid reading (all non-expert weights, the routed experts the batch is expected to touch under
uniform routing, the latent cache) over the run's time, against ``--peak-gbps``. Each measured run follows a
warm-up on the same prompts (the engine's a full one, so decode graphs are already captured; transformers' a
4-token one).

    python bench/rollout.py                                   # tiny preset, CPU, fp32, batches 1 and 32
    python bench/rollout.py --preset lite --device cuda --dtype bfloat16 --batches 1 32 128
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DeepseekV2ForCausalLM

from align.engine import Engine, SamplingParams
from align.model import build_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="align.model preset: tiny, small, lite, v2")
    p.add_argument("--vocab-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--skip-hf", action="store_true", help="engine only (transformers is slow at large shapes)")
    p.add_argument("--peak-gbps", type=float, default=4800.0, help="memory bandwidth bound (H200: 4800 GB/s)")
    return p.parse_args(argv)


def build_model(args, dtype, device):
    config = build_config(args.preset, vocab_size=args.vocab_size)
    torch.manual_seed(args.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the target dtype: no fp32 copy of a large model
    try:
        with torch.device(device):
            model = DeepseekV2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None
    return model.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_hf(model, prompts, new_tokens, device):
    ids = torch.tensor(prompts, device=device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    return out.shape[0] * (out.shape[1] - ids.shape[1])


def run_engine(engine, prompts, new_tokens, device):
    sp = SamplingParams(temperature=1.0, max_tokens=new_tokens, ignore_eos=True, seed=0, logprobs=True)
    outs = engine.generate(prompts, sp, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs)


def bound_bytes(config, engine: Engine, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Bytes the decode steps must read at least: weights touched per step plus the latent cache."""
    w = engine.weights
    item = engine.dtype.itemsize
    e, k = config.n_routed_experts, config.num_experts_per_tok
    expert = 3 * config.hidden_size * config.moe_intermediate_size * item
    n_moe = sum(hasattr(layer.mlp, "router") for layer in w.layers)
    routed_all = n_moe * e * expert
    dense = w.num_bytes() - routed_all - w.embed.numel() * item * (0 if w.tied else 1)  # embedding: a row each
    touched = e * (1 - (1 - k / e) ** batch)  # expected distinct experts per layer, uniform routing
    per_step_weights = dense + n_moe * touched * expert
    kv = engine.kv_bytes_per_token() * batch * sum(prompt_len + t for t in range(new_tokens - 1))
    return per_step_weights * (new_tokens - 1) + kv


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    cuda = device.type == "cuda"
    model = build_model(args, dtype, device)
    config = model.config
    engine = Engine.from_model(model, max_num_seqs=max(args.batches),
                               max_num_batched_tokens=max(args.batches) * args.prompt_len,
                               block_size=args.block_size, use_tqdm=False, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    header = ["impl", "batch", "prompt", "new", "time s", "tokens/s", "engine speedup"]
    if cuda:
        header += ["peak GiB", "run extra GiB", "BW-bound fraction"]
    rows = []
    for batch in args.batches:
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len), generator=g).tolist()
        results = {}
        impls = [("engine", lambda: run_engine(engine, prompts, args.new_tokens, device))]
        if not args.skip_hf:
            impls.append(("transformers generate", lambda: run_hf(model, prompts, args.new_tokens, device)))
        for name, fn in impls:
            if name == "engine":
                fn()  # a full warm-up run: CUDA graphs are captured once per shape bucket, then replayed
            else:
                run_hf(model, prompts, 4, device)
            sync(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            n = fn()
            sync(device)
            dt = time.perf_counter() - t0
            extra = {}
            if cuda:
                peak = torch.cuda.max_memory_allocated(device)
                bound = bound_bytes(config, engine, batch, args.prompt_len, args.new_tokens)
                extra = {"peak": peak / 2**30, "extra": (peak - base) / 2**30,
                         "bw": bound / (args.peak_gbps * 1e9) / dt}
            results[name] = (dt, n, extra)
        hf = results.get("transformers generate")
        for name, (dt, n, extra) in results.items():
            speed = f"{hf[0] / dt:.2f}x" if (hf and name == "engine") else ""
            row = [name, batch, args.prompt_len, args.new_tokens, f"{dt:.2f}", f"{n / dt:.1f}", speed]
            if cuda:
                row += [f"{extra['peak']:.2f}", f"{extra['extra']:.2f}", f"{extra['bw']:.3f}"]
            rows.append(row)
    print(f"\npreset {args.preset} (vocab {config.vocab_size}), {args.dtype} on {device}, random weights, "
          f"temperature 1, EOS ignored; engine KV {engine.kv_bytes_per_token()} B/token, "
          f"moe backend {engine.runner.moe_backend}, cuda graphs {bool(engine.graphs and engine.graphs.capture)}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


if __name__ == "__main__":
    main()
