"""Rollout throughput: align.engine against transformers' ``model.generate`` on the same model and prompts.

Random weights, random prompts of ``--prompt-len`` tokens, ``--new-tokens`` sampled at temperature 1 with EOS
ignored, so both sides produce exactly batch x new-tokens tokens. Prints a markdown table. On CUDA it also
prints the peak memory of each run and the fraction of the memory-bandwidth bound reached: the bytes the decode
steps cannot avoid reading (all non-expert weights, the routed experts the batch is expected to touch under
uniform routing, the latent cache) over the run's time (prefill included), against the device-to-device copy
bandwidth measured at start (or ``--peak-gbps``); for the engine also per decode step (the bound is defined
per step), a prefill-only run (one new token) of the same prompts taken off the run's time. Each measured run
follows a warm-up on the same prompts (the engine's a full one, so decode graphs are already captured;
transformers' a 4-token one); ``--repeats`` times the engine several times and reports the median.

``--grpo`` adds the GRPO-shaped case (``--grpo-prompts`` prompts x n=``--grpo-n`` samples, prompt
``--grpo-prompt-len``, ``--grpo-new-tokens`` new tokens, engine only) with its tok/s and the latent-cache bytes
its sequences held at the peak. ``--parity N`` samples N completions with the engine and reports the mean and
max |engine - transformers| log-probability of the sampled tokens, transformers scoring the same sequences in
one forward pass in the same dtype; on CUDA the same comparison with the fused decode kernels switched off
(the torch decode path) gives the size of the dtype's own noise. ``--compare-lookahead`` adds rows (and a GRPO
line) for the same engine with its decode look-ahead switched off. ``--fp8-variants`` runs it all for the engine
in ``--dtype``, then with an FP8 latent cache, FP8 weights and both (one engine after another, same model and
prompts; ``--num-blocks`` gives each the same cache), and on CUDA prints each variant's capacity: the sequences
of ``--capacity-context`` tokens whose cache fits beside its resident weights and ``--reserve-gib`` of working
memory (the engine's byte counts, like vLLM's "maximum concurrency").

    python bench/rollout.py                                   # tiny preset, CPU, fp32, batches 1 and 32
    PYTHONPATH=. python bench/rollout.py --preset lite --device cuda --dtype bfloat16 --prompt-len 128 \
        --new-tokens 128 --batches 1 32 128 256 --repeats 3 --grpo --parity 8
"""

from __future__ import annotations

import argparse
import contextlib
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
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="memory bandwidth bound in GB/s (default: a device-to-device copy measured at start)")
    p.add_argument("--hf-max-batch", type=int, default=128, help="run transformers only up to this batch")
    p.add_argument("--repeats", type=int, default=1, help="timed engine runs per batch; the median is reported")
    p.add_argument("--decode-kernels", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "fp8"], help="engine latent cache")
    p.add_argument("--weight-dtype", default="auto", choices=["auto", "fp8"], help="engine projection weights")
    p.add_argument("--compare-lookahead", action="store_true",
                   help="also time the engine with its decode look-ahead off (same engine, same prompts)")
    p.add_argument("--grpo", action="store_true", help="also run the GRPO-shaped case (engine only)")
    p.add_argument("--grpo-prompts", type=int, default=64)
    p.add_argument("--grpo-n", type=int, default=8)
    p.add_argument("--grpo-prompt-len", type=int, default=256)
    p.add_argument("--grpo-new-tokens", type=int, default=512)
    p.add_argument("--parity", type=int, default=0, metavar="N",
                   help="engine vs transformers log-probs of N sampled completions")
    p.add_argument("--fp8-variants", action="store_true",
                   help="run everything for the engine in --dtype, then with an FP8 latent cache, FP8 weights and "
                        "both, one engine after another on the same model and prompts (rows labelled by variant); "
                        "on CUDA also each variant's capacity in sequences of --capacity-context tokens")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="engine cache blocks, the same for every variant (default: the engine's own sizing)")
    p.add_argument("--capacity-context", type=int, default=4096)
    p.add_argument("--reserve-gib", type=float, default=8.0, help="working memory left out of the capacity")
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


def median_time(fn, repeats: int, device):
    """(median seconds of ``repeats`` calls of ``fn``, each to its device sync; the last call's result)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def copy_gbps(device) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second, GB/s), median of 10 copies of 2 GiB."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * (2 << 30) / sorted(times)[len(times) // 2] / 1e9


def step_weight_bytes(config, engine: Engine, batch: int) -> float:
    """Weights one decode step of ``batch`` sequences reads at least, under uniform routing."""
    w = engine.weights
    item = engine.dtype.itemsize
    per_weight = 1 + 4 / 128 if w.fp8 else item  # FP8 projections: a byte plus a per-row block scale per 128
    e, k = config.n_routed_experts, config.num_experts_per_tok
    expert = 3 * config.hidden_size * config.moe_intermediate_size * per_weight
    n_moe = sum(hasattr(layer.mlp, "router") for layer in w.layers)
    routed_all = n_moe * e * expert
    dense = w.num_bytes() - routed_all - w.embed.numel() * item * (0 if w.tied else 1)  # embedding: a row each
    touched = e * (1 - (1 - k / e) ** batch)  # expected distinct experts per layer, uniform routing
    return dense + n_moe * touched * expert


def bound_bytes(config, engine: Engine, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Bytes the decode steps must read at least: weights touched per step plus the latent cache."""
    kv = engine.kv_bytes_per_token() * batch * sum(prompt_len + t for t in range(new_tokens - 1))
    return step_weight_bytes(config, engine, batch) * (new_tokens - 1) + kv


@contextlib.contextmanager
def torch_decode(engine: Engine):
    """The same engine on its torch decode path (fused kernels and graphs off), for a noise reference."""
    fused, graphs = engine.runner.fused, engine.graphs
    engine.runner.fused, engine.graphs = None, None
    try:
        yield
    finally:
        engine.runner.fused, engine.graphs = fused, graphs


def parity(model, engine: Engine, prompts, new_tokens: int, device) -> dict[str, float]:
    """Mean / max |engine - transformers| log-prob of the engine's sampled tokens (same sequences, same dtype)."""
    sp = SamplingParams(temperature=1.0, max_tokens=new_tokens, ignore_eos=True, seed=1, logprobs=True)
    outs = engine.generate(prompts, sp, use_tqdm=False)
    seqs = torch.tensor([p + o.outputs[0].token_ids for p, o in zip(prompts, outs)], device=device)  # (B, T)
    with torch.no_grad():
        logits = model(seqs).logits[:, len(prompts[0]) - 1:-1].float()  # (B, new, V)
    ref = torch.log_softmax(logits, dim=-1).gather(-1, seqs[:, len(prompts[0]):, None]).squeeze(-1).cpu()
    got = torch.tensor([o.outputs[0].logprobs for o in outs])  # (B, new)
    diff = (got - ref).abs()
    return {"mean": diff.mean().item(), "max": diff.max().item(), "ref_mean_logprob": ref.mean().item()}


def run_grpo(args, engine: Engine, config, device, bw_gbps):
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = torch.randint(0, config.vocab_size, (args.grpo_prompts, args.grpo_prompt_len), generator=g).tolist()
    sp = SamplingParams(n=args.grpo_n, temperature=1.0, max_tokens=args.grpo_new_tokens, ignore_eos=True, seed=0)
    engine.generate(prompts, sp, use_tqdm=False)  # warm-up: graph capture for every batch bucket it passes
    sync(device)
    engine.reset_stats()
    torch.cuda.reset_peak_memory_stats(device)
    dt, outs = median_time(lambda: engine.generate(prompts, sp, use_tqdm=False), 1, device)
    n = sum(len(c.token_ids) for o in outs for c in o.outputs)
    st = engine.stats
    block_bytes = engine.kv_bytes_per_token() * engine.blocks.block_size
    print(f"\nGRPO-shaped: {args.grpo_prompts} prompts x n={args.grpo_n}, prompt {args.grpo_prompt_len}, "
          f"{args.grpo_new_tokens} new tokens: {n} tokens in {dt:.2f} s = {n / dt:.1f} tok/s; "
          f"{st.decode_steps} decode steps ({st.lookahead_steps} queued by look-ahead), {st.prefill_steps} "
          f"prefill steps, {st.preemptions} preemptions; "
          f"latent cache held at peak {st.peak_blocks_in_use} blocks = "
          f"{st.peak_blocks_in_use * block_bytes / 2**30:.2f} GiB ({engine.kv_bytes_per_token()} B/token; "
          f"pool {engine.cache.num_bytes() / 2**30:.1f} GiB); "
          f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


# --fp8-variants: the engine in its dtype (labelled by it), then with an FP8 latent cache, FP8 weights and both.
VARIANTS = ((None, "auto", "auto"), ("fp8 cache", "fp8", "auto"), ("fp8 weights", "auto", "fp8"),
            ("fp8 cache + weights", "fp8", "fp8"))


def build_engine(args, model, kv_dtype: str, weight_dtype: str) -> Engine:
    max_seqs = max(args.batches + ([args.grpo_prompts * args.grpo_n] if args.grpo else []))
    longest = max(args.prompt_len + args.new_tokens,
                  args.grpo_prompt_len + args.grpo_new_tokens if args.grpo else 0)
    return Engine.from_model(model, max_num_seqs=max_seqs,
                             max_num_batched_tokens=max(max(args.batches) * args.prompt_len,
                                                        args.grpo_prompts * args.grpo_prompt_len),
                             max_model_len=longest + args.block_size, block_size=args.block_size,
                             num_blocks=args.num_blocks, use_tqdm=False, seed=args.seed,
                             decode_kernels=args.decode_kernels, kv_dtype=kv_dtype, weight_dtype=weight_dtype)


def bench_batches(args, model, engine: Engine, config, device, bw, label: str | None, with_hf: bool) -> list[list]:
    """One table row per batch and implementation (transformers too if ``with_hf``); engine rows carry ``label``."""
    cuda = device.type == "cuda"
    lookahead = engine.lookahead  # what the engine chose; --compare-lookahead switches it off for some runs
    g = torch.Generator().manual_seed(args.seed)  # the same prompts for every variant
    rows = []
    for batch in args.batches:
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len), generator=g).tolist()
        results = {}
        impls = [("engine", lambda: run_engine(engine, prompts, args.new_tokens, device))]
        if args.compare_lookahead:
            impls.append(("engine, no look-ahead", lambda: run_engine(engine, prompts, args.new_tokens, device)))
        if with_hf and not args.skip_hf and batch <= args.hf_max_batch:
            impls.append(("transformers generate", lambda: run_hf(model, prompts, args.new_tokens, device)))
        for name, fn in impls:
            engine.lookahead = lookahead and name != "engine, no look-ahead"
            if name.startswith("engine"):
                fn()  # a full warm-up run: CUDA graphs are captured once per shape bucket, then replayed
            else:
                run_hf(model, prompts, 4, device)
            sync(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            dt, n = median_time(fn, args.repeats if name == "engine" else 1, device)
            extra = {}
            if cuda:
                peak = torch.cuda.max_memory_allocated(device)
                bound = bound_bytes(config, engine, batch, args.prompt_len, args.new_tokens)
                extra = {"peak": peak / 2**30, "extra": (peak - base) / 2**30, "bw": bound / (bw * 1e9) / dt}
                if name.startswith("engine") and args.new_tokens > 1:
                    # Decode steps alone: the run minus a prefill-only run (one token) of the same prompts.
                    pre, _ = median_time(lambda: run_engine(engine, prompts, 1, device), args.repeats, device)
                    step = (dt - pre) / (args.new_tokens - 1)
                    extra.update(step=step, step_bw=bound / (args.new_tokens - 1) / (bw * 1e9) / step)
            results[name] = (dt, n, extra)
        hf = results.get("transformers generate")
        for name, (dt, n, extra) in results.items():
            speed = f"{hf[0] / dt:.2f}x" if (hf and name.startswith("engine")) else ""
            row = [name if label is None or not name.startswith("engine") else f"{name} ({label})", batch,
                   args.prompt_len, args.new_tokens, f"{dt:.2f}", f"{n / dt:.1f}", speed]
            if cuda:
                row += [f"{extra['peak']:.2f}", f"{extra['extra']:.2f}", f"{extra['bw']:.3f}"]
                row += [f"{extra['step'] * 1e3:.3f}", f"{extra['step_bw']:.3f}"] if "step" in extra else ["", ""]
            rows.append(row)
    engine.lookahead = lookahead
    return rows


def capacity_line(args, engine: Engine, device, label: str) -> str:
    """Sequences of ``--capacity-context`` tokens whose cache fits beside this engine's resident weights and
    ``--reserve-gib`` of working memory on the card (the engine's byte counts, as vLLM's maximum concurrency)."""
    total = torch.cuda.get_device_properties(device).total_memory
    room = total - engine.weights.num_bytes() - args.reserve_gib * 2**30
    seqs = int(room // (args.capacity_context * engine.kv_bytes_per_token()))
    return (f"capacity ({label}): weights {engine.weights.num_bytes() / 2**30:.2f} GiB, "
            f"{engine.kv_bytes_per_token()} B/token -> {seqs} sequences of {args.capacity_context} tokens on "
            f"{total / 2**30:.1f} GiB with {args.reserve_gib} GiB reserved")


def md_row(cells) -> str:
    return "| " + " | ".join(str(x) for x in cells) + " |"


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    cuda = device.type == "cuda"
    bw = (args.peak_gbps or copy_gbps(device)) if cuda else None
    model = build_model(args, dtype, device)
    config = model.config
    variants = ([(label or args.dtype, kv, w) for label, kv, w in VARIANTS] if args.fp8_variants
                else [(None, args.kv_dtype, args.weight_dtype)])
    header = ["impl", "batch", "prompt", "new", "time s", "tokens/s", "engine speedup"]
    if cuda:
        header += ["peak GiB", "run extra GiB", "BW fraction, run", "decode ms/step", "BW fraction, step"]
    rows, tails = [], []
    for label, kv_dtype, weight_dtype in variants:
        engine = build_engine(args, model, kv_dtype, weight_dtype)
        new_rows = bench_batches(args, model, engine, config, device, bw, label, with_hf=not rows)
        rows += new_rows
        fused = engine.runner.fused is not None
        print(f"\npreset {args.preset} (vocab {config.vocab_size}), {args.dtype} on {device}"
              + (f" [{label}]" if label else "") + ", random weights, "
              f"temperature 1, EOS ignored; engine KV {engine.kv_bytes_per_token()} B/token, "
              f"weights {engine.weights.num_bytes() / 2**30:.2f} GiB, "
              f"moe backend {engine.runner.moe_backend}, decode kernels {'triton' if fused else 'torch'}, "
              f"cuda graphs {bool(engine.graphs and engine.graphs.capture)}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} CPU threads" + (f", copy bandwidth {bw:.0f} GB/s" if cuda else ""))
        if len(variants) > 1:  # this variant's rows now, in case a later one fails
            print("\n".join(md_row(row) for row in new_rows))
        if cuda and label:
            tails.append(capacity_line(args, engine, device, label))
            print(tails[-1])
        if args.parity:
            g = torch.Generator().manual_seed(args.seed + 2)
            prompts = torch.randint(0, config.vocab_size, (args.parity, args.prompt_len), generator=g).tolist()
            got = parity(model, engine, prompts, args.new_tokens, device)
            line = (f"log-prob parity, {args.parity} sampled completions of {args.new_tokens} tokens, {args.dtype}: "
                    f"|engine - transformers| mean {got['mean']:.4g}, max {got['max']:.4g} (mean log-prob "
                    f"{got['ref_mean_logprob']:.3f})")
            if fused:
                with torch_decode(engine):
                    base = parity(model, engine, prompts, args.new_tokens, device)
                line += f"; torch decode path: mean {base['mean']:.4g}, max {base['max']:.4g}"
            print(line)
        if args.grpo:
            if not cuda:
                raise SystemExit("--grpo is a GPU benchmark")
            run_grpo(args, engine, config, device, bw)
            if args.compare_lookahead:
                lookahead = engine.lookahead
                engine.lookahead = False
                print("same, look-ahead off:", end="")
                run_grpo(args, engine, config, device, bw)
                engine.lookahead = lookahead
        del engine
        if cuda:
            torch.cuda.empty_cache()
    print("\n" + md_row(header))
    print("|" + "---|" * len(header))
    for row in rows:
        print(md_row(row))
    for line in tails:
        print(line)


if __name__ == "__main__":
    main()
