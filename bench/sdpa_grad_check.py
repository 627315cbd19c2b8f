"""Does this GPU's SDPA backward return non-finite gradients on GRPO-shaped padded batches? One row per backend.

GRPO batches are left-padded prompts plus right-padded completions, passed to attention with a mask. On H100/H200
with torch 2.11-2.13, cuDNN's SDPA backward has been reported to return NaN in grad_q (grad_k, grad_v finite) when
a mask is passed, the padded length is 64 mod 128 and a query row's logsumexp is below ln(FLT_MAX) ~ -88.7
(pytorch#196678), the signature of the `small` preset's skipped GRPO steps. This script builds such batches at the
`small` preset's attention shapes (8 heads, q/k 96, v 64) with rows whose logits are all strongly negative, runs
forward and backward under each backend and counts non-finite entries of each gradient:

    python bench/sdpa_grad_check.py [--lengths 64 128 192] [--dtype bfloat16]

`model.cudnn_attention: false` (the default) keeps training off the cuDNN backend.
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def batch(length: int, dtype, device, heads=8, qk_dim=96, v_dim=64, size=4, shift=-120.0):
    g = torch.Generator(device="cpu").manual_seed(length)
    q = torch.randn(size, heads, length, qk_dim, generator=g) * 0.1
    k = torch.randn(size, heads, length, qk_dim, generator=g) * 0.1
    v = torch.randn(size, heads, length, v_dim, generator=g)
    q[..., 0], k[..., 0] = 1.0, shift * math.sqrt(qk_dim)   # every logit ~ shift: each row's logsumexp far below -88.7
    pad = torch.arange(size) * (length // (2 * size))        # left padding of each sequence
    pos = torch.arange(length)
    keep = (pos[None, :] >= pad[:, None])[:, None, None, :] & (pos[:, None] >= pos[None, :])  # (B, 1, L, L)
    keep |= torch.eye(length, dtype=torch.bool)               # padded rows see themselves, as transformers' masks do
    return [t.to(device, dtype).requires_grad_() for t in (q, k, v)] + [keep.to(device)]


def check(backend, length: int, dtype, device) -> str:
    q, k, v, mask = batch(length, dtype, device)
    try:
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out.backward(torch.randn_like(out))
    except RuntimeError as e:
        return f"not run ({str(e).splitlines()[0][:60]})"
    return " / ".join(str(int((~torch.isfinite(t.grad)).sum())) for t in (q, k, v))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 192])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)   # each refused backend says why; the table does too
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {args.dtype}; non-finite grad_q / grad_k / grad_v")
    print("| backend | " + " | ".join(f"length {n}" for n in args.lengths) + " |")
    print("|---" * (len(args.lengths) + 1) + "|")
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION,
                    SDPBackend.MATH):
        cells = [check(backend, n, dtype, device) for n in args.lengths]
        print(f"| {backend.name.lower()} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
