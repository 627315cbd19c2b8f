"""Where the engine's GPU time goes: kernels of one prefill and of the decode steps, by total time.

Random weights (as ``bench/rollout.py``), one prompt batch per ``--batches`` entry. For each batch it times and
profiles (torch profiler, CUDA activity) a prefill on its own (``max_tokens=1``) and a whole generate, then prints
per phase: wall time, GPU busy time (sum of kernel times), kernel launches, and the top kernels by total time
with their call counts and mean duration. Decode rows are the whole run minus the prefill run. For the profiled
whole run it also sums the device's idle time between kernels and names the largest gaps (the host holding the
device back shows there). ``--variants`` first times the same engine with a feature switched off.

    PYTHONPATH=. python bench/profile_step.py --preset lite --device cuda --dtype bfloat16 --batches 1 256
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from align.engine import Engine, SamplingParams
from align.engine.runner import MAX_FUSED_PREFILL
from bench.rollout import DTYPES, build_model, sync


def _fused_prefill(engine: Engine, tokens: int):
    engine.runner.max_fused_prefill = tokens


def _shared_inside(engine: Engine, on: bool):
    """Shared experts inside the routed-expert kernels (for steps of up to MAX_SHARED_ROWS tokens), or not."""
    if engine.runner.fused is None:
        raise SystemExit("--variants no-shared-inside needs the fused decode kernels (CUDA with Triton)")
    from align.engine.triton_moe import MAX_SHARED_ROWS

    engine.runner.fused.max_shared_rows = MAX_SHARED_ROWS if on else 0
    if engine.graphs is not None:
        engine.graphs.reset()  # graphs replay what they captured


# Name -> (switch it off, switch it back on).
VARIANTS = {"no-fused-prefill": (lambda e: _fused_prefill(e, 0), lambda e: _fused_prefill(e, MAX_FUSED_PREFILL)),
            "no-shared-inside": (lambda e: _shared_inside(e, False), lambda e: _shared_inside(e, True))}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=25, help="kernels listed per phase")
    p.add_argument("--decode-kernels", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS),
                   help="also time the same engine with these switched off (tok/s only, before the profile)")
    return p.parse_args(argv)


def kernels(prof) -> dict[str, tuple[int, float]]:
    """Kernel name -> (calls, total µs) over a profile."""
    out: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            out[e.name][0] += 1
            out[e.name][1] += e.device_time_total
    return {k: (v[0], v[1]) for k, v in out.items()}


def gaps(prof, min_us: float = 20.0) -> str:
    """The device's idle time between kernels of a profile: in all, and in gaps of at least ``min_us``."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == DeviceType.CUDA)
    if not spans:
        return "no device kernels"
    idle, big, worst, end, before = 0.0, [], [], spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        if start > end:
            idle += start - end
            if start - end >= min_us:
                big.append(start - end)
                worst.append((start - end, before[:40], name[:40]))
        if stop > end:
            end, before = stop, name
    worst.sort(reverse=True)
    return (f"device idle between kernels {idle / 1e3:.2f} ms over {(end - spans[0][0]) / 1e3:.2f} ms; "
            f"{len(big)} gaps >= {min_us:.0f} µs holding {sum(big) / 1e3:.2f} ms; largest: "
            + "; ".join(f"{g:.0f} µs after {a} before {b}" for g, a, b in worst[:4]))


def timed(engine, prompts, max_tokens, device, profiled: bool):
    sp = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=0)
    sync(device)
    if not profiled:
        t0 = time.perf_counter()
        engine.generate(prompts, sp, use_tqdm=False)
        sync(device)
        return time.perf_counter() - t0, {}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate(prompts, sp, use_tqdm=False)
        sync(device)
    return gaps(prof), kernels(prof)


def report(title: str, wall_s: float, steps: int, ks: dict[str, tuple[int, float]], top: int):
    busy = sum(t for _, t in ks.values())
    calls = sum(c for c, _ in ks.values())
    print(f"\n### {title}: wall {wall_s * 1e3:.2f} ms ({wall_s * 1e3 / steps:.3f} ms per step, {steps} steps); "
          f"GPU busy {busy / 1e3:.2f} ms ({busy / 1e3 / steps:.3f} per step); {calls} kernels "
          f"({calls / steps:.0f} per step)\n")
    print("| kernel | calls per step | µs per step | mean µs | share of busy |")
    print("|---|---|---|---|---|")
    for name, (c, t) in sorted(ks.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"| {name[:90]} | {c / steps:.1f} | {t / steps:.1f} | {t / c:.2f} | {t / busy:.1%} |")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    model = build_model(args, DTYPES[args.dtype], device)
    config = model.config
    engine = Engine.from_model(model, max_num_seqs=max(args.batches),
                               max_num_batched_tokens=max(args.batches) * args.prompt_len,
                               max_model_len=args.prompt_len + args.new_tokens + args.block_size,
                               block_size=args.block_size, use_tqdm=False, seed=args.seed,
                               decode_kernels=args.decode_kernels)
    del model
    torch.cuda.empty_cache()
    g = torch.Generator().manual_seed(args.seed)
    for batch in args.batches:
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len), generator=g).tolist()
        for name in args.variants:
            off, on = VARIANTS[name]
            off(engine)
            timed(engine, prompts, args.new_tokens, device, profiled=False)  # warm-up: graphs captured
            v_pre = min(timed(engine, prompts, 1, device, False)[0] for _ in range(3))
            v_all = min(timed(engine, prompts, args.new_tokens, device, False)[0] for _ in range(3))
            on(engine)
            step_ms = (v_all - v_pre) * 1e3 / (args.new_tokens - 1)
            print(f"batch {batch}, {name}: whole run {v_all * 1e3:.1f} ms = {batch * args.new_tokens / v_all:.1f} "
                  f"tok/s; prefill run {v_pre * 1e3:.1f} ms; decode {step_ms:.3f} ms per step (best of 3)")
        timed(engine, prompts, args.new_tokens, device, profiled=False)  # warm-up: graphs captured
        pre_s = min(timed(engine, prompts, 1, device, False)[0] for _ in range(3))
        all_s = min(timed(engine, prompts, args.new_tokens, device, False)[0] for _ in range(3))
        _, pre_k = timed(engine, prompts, 1, device, True)
        engine.reset_stats()
        all_gaps, all_k = timed(engine, prompts, args.new_tokens, device, True)
        st = engine.stats
        dec_k = {}
        for name, (c, t) in all_k.items():
            pc, pt = pre_k.get(name, (0, 0.0))
            if c - pc > 0:
                dec_k[name] = (c - pc, t - pt)
        steps = args.new_tokens - 1
        print(f"\n## batch {batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens: whole run "
              f"{all_s * 1e3:.1f} ms = {batch * args.new_tokens / all_s:.1f} tok/s (best of 3)")
        report(f"prefill, batch {batch}", pre_s, 1, pre_k, args.top)
        report(f"decode, batch {batch}", all_s - pre_s, steps, dec_k, args.top)
        print(f"\nwhole profiled run: {st.decode_steps} decode steps, {st.lookahead_steps} queued by look-ahead; "
              f"{all_gaps}")


if __name__ == "__main__":
    main()
