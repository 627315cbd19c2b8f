"""Tile sweeps for the engine's Triton decode kernels on DeepSeek-V2-Lite shapes (CUDA only).

Times each kernel (``triton.testing.do_bench``: L2 flushed between runs, median) over a grid of tile settings and
prints one markdown table per kernel and batch, fastest first, with the bytes it must read over its time. The
settings live in the modules' ``TILES`` dicts; this script only changes them for the duration of a timing.

    PYTHONPATH=. python bench/tune_kernels.py --batches 1 32 256

``--in-step`` instead times whole decode steps of the engine on random DeepSeek-V2-Lite weights (CUDA graphs
replayed, the way rollouts run) with each candidate of ``STEP_CANDIDATES`` in turn: kernels of a few µs are
timed where they run, between their neighbours, not as lone launches.

    PYTHONPATH=. python bench/tune_kernels.py --in-step --batches 1 32
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from align.engine import triton_mla, triton_moe, triton_sample
from align.engine.moe import Routing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--context", type=int, default=256, help="longest context; lengths drawn from [context/2, it]")
    p.add_argument("--kernels", nargs="+", default=["mla", "experts", "sample"])
    p.add_argument("--top", type=int, default=6)
    p.add_argument("--in-step", action="store_true", help="time whole decode steps per candidate (see above)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    return p.parse_args(argv)


def table(title: str, rows: list[tuple[str, float]], nbytes: float, top: int):
    rows = sorted(rows, key=lambda r: r[1])
    print(f"\n### {title} ({nbytes / 1e6:.1f} MB read)\n\n| setting | µs | TB/s |\n|---|---|---|")
    for name, ms in rows[:top]:
        print(f"| {name} | {ms * 1e3:.1f} | {nbytes / ms / 1e9:.2f} |")
    if len(rows) > top:
        name, ms = rows[-1]
        print(f"| (slowest of {len(rows)}) {name} | {ms * 1e3:.1f} | {nbytes / ms / 1e9:.2f} |")


def sweep(tiles: dict, grid: dict, fn) -> list[tuple[str, float]]:
    """Time ``fn`` under every combination of ``grid`` values written into ``tiles``; restore it after."""
    saved = dict(tiles)
    out = []
    try:
        for values in itertools.product(*grid.values()):
            tiles.update(dict(zip(grid, values)))
            try:
                ms = do_bench(fn, warmup=5, rep=40)
            except Exception as e:  # a tile that does not fit shared memory or registers
                print(f"skip {dict(zip(grid, values))}: {type(e).__name__}")
                continue
            out.append((", ".join(f"{k}={v}" for k, v in zip(grid, values)), ms))
    finally:
        tiles.clear()
        tiles.update(saved)
    return out


def mla(batch: int, context: int, top: int, dev):
    heads, rank, dn, dr, bs = 16, 512, 128, 64, 16
    lens = torch.randint(context // 2, context + 1, (batch,), device=dev)
    nb = context // bs
    blocks = batch * nb + 1
    cache = torch.randn(blocks * bs, rank + dr, device=dev, dtype=torch.bfloat16)
    tables = torch.randperm(blocks - 1, device=dev)[:batch * nb].view(batch, nb) + 1
    q_lat = torch.randn(heads, batch, rank, device=dev, dtype=torch.bfloat16)
    q = torch.randn(batch, heads, dn + dr, device=dev, dtype=torch.bfloat16)
    w_uv = torch.randn(heads, rank, 128, device=dev, dtype=torch.bfloat16)  # (Hn, R, Dv)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count

    def fn():
        triton_mla.mla_decode(q_lat, q, cache, tables, lens, bs, context, 0.1, dn, sms, w_uv)

    grid = dict(block_n=[16, 32, 64], num_warps=[4, 8], num_stages=[1, 2, 3], programs_per_sm=[1, 2, 4])
    nbytes = int(lens.sum()) * (rank + dr) * 2 + w_uv.numel() * 2
    table(f"MLA decode, batch {batch}, context {context // 2}-{context}", sweep(triton_mla.TILES, grid, fn),
          nbytes, top)


def experts(batch: int, top: int, dev):
    e, k, hidden, inter = 64, 6, 2048, 1408
    x = torch.randn(batch, hidden, device=dev, dtype=torch.bfloat16)
    router = torch.randn(e, hidden, device=dev)
    gu = torch.randn(e, 2 * inter, hidden, device=dev, dtype=torch.bfloat16) * 0.02
    dn = torch.randn(e, hidden, inter, device=dev, dtype=torch.bfloat16) * 0.02
    plan = triton_moe.route_and_plan(F.linear(x.float(), router), Routing(e, k, "greedy", None, None, 1.0))
    used = int(plan.n_active)
    for kernel in ("gate_up", "down"):
        grid = dict(block_n=[32, 64, 128], block_k=[64, 128, 256], num_warps=[4], num_stages=[3, 4])
        rows = sweep(triton_moe.TILES[kernel], grid, lambda: triton_moe.routed_experts(x, plan, gu, dn)[0])
        table(f"routed experts (both kernels), sweeping {kernel}, batch {batch}, {used} experts in use", rows,
              used * 3 * inter * hidden * 2, top)


def sample(batch: int, top: int, dev):
    vocab = 102400
    logits = torch.randn(batch, vocab, device=dev) * 3
    u = torch.rand(batch, dtype=torch.float64, device=dev)
    ms = do_bench(lambda: triton_sample.sample_rows(logits, u, 1.0), warmup=5, rep=40)
    table(f"sampling, batch {batch}, vocab {vocab}", [("default", ms)], logits.numel() * 4, top)


# Tile changes tried by --in-step, each {TILES key: overrides}; the first is the settings as they are.
_MOE, _MLA = triton_moe.TILES, triton_mla.TILES
STEP_CANDIDATES = [{}] + [{key: o} for key in ("gate_up", "down") for o in (
    dict(block_n=32, num_stages=4), dict(block_n=32, num_stages=5), dict(num_stages=4), dict(num_stages=5))]
STEP_CANDIDATES += [{"mla": dict(block_n=16)}, {"mla": dict(programs_per_sm=2)}]


def in_step(args, dev):
    from align.engine import Engine
    from bench.profile_step import timed
    from bench.rollout import build_model

    model = build_model(argparse.Namespace(preset="lite", vocab_size=None, seed=0), torch.bfloat16, dev)
    vocab = model.config.vocab_size
    engine = Engine.from_model(model, max_num_seqs=max(args.batches),
                               max_num_batched_tokens=max(args.batches) * args.prompt_len,
                               max_model_len=args.prompt_len + args.new_tokens + 16, use_tqdm=False, seed=0)
    del model
    for batch in args.batches:
        prompts = torch.randint(0, vocab, (batch, args.prompt_len)).tolist()
        timed(engine, prompts, args.new_tokens, dev, profiled=False)  # first run: compiles, allocates
        rows = []
        for cand in STEP_CANDIDATES + STEP_CANDIDATES[:1]:  # the baseline again last: drift shows
            dicts = {key: _MLA if key == "mla" else _MOE[key] for key in cand}
            saved = {key: dict(d) for key, d in dicts.items()}
            for key, over in cand.items():
                dicts[key].update(over)
            try:
                engine.graphs.reset()  # graphs replay the tiles they captured
                timed(engine, prompts, args.new_tokens, dev, profiled=False)  # warm-up: compile, capture
                # The prefill is host-bound and varies run to run: take the best of several of each.
                pre = min(timed(engine, prompts, 1, dev, False)[0] for _ in range(5))
                run = min(timed(engine, prompts, args.new_tokens, dev, False)[0] for _ in range(3))
                name = "; ".join(f"{k} " + ", ".join(f"{a}={v}" for a, v in o.items()) for k, o in cand.items())
                rows.append((name or "as is", (run - pre) / (args.new_tokens - 1)))
            except Exception as e:  # a tile too big for the SM's resources
                print(f"skip {cand}: {type(e).__name__}")
            finally:
                for key, d in dicts.items():
                    d.clear()
                    d.update(saved[key])
        engine.graphs.reset()
        print(f"\n### decode step, batch {batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens\n")
        print("| setting | ms per step |\n|---|---|")
        for name, sec in sorted(rows, key=lambda r: r[1]):
            print(f"| {name} | {sec * 1e3:.3f} |")


def main(argv=None):
    args = parse_args(argv)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    if args.in_step:
        return in_step(args, dev)
    for b in args.batches:
        if "sample" in args.kernels:
            sample(b, args.top, dev)
        if "mla" in args.kernels:
            mla(b, args.context, args.top, dev)
        if "experts" in args.kernels:
            experts(b, args.top, dev)


if __name__ == "__main__":
    main()
