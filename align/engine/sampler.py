"""Token sampling: temperature, top-k, top-p, per-sequence seeds, raw log-probabilities.

Each sequence owns a CPU ``torch.Generator`` and draws exactly one uniform number per sampled token; the token
is found by inverting the row's CDF. Everything else is row-wise, so a sequence's tokens depend only on its
own logits and seed, never on which other sequences share the batch (or on the device's RNG). The engine wraps
each generator in a ``UniformStream``, which draws its numbers 64 at a time (the same numbers, in the same
order, as one draw per token) so a step of many sequences makes one tensor of draws, not one torch call each.
"""

from __future__ import annotations

import torch

from .params import SamplingParams
from .readback import Readback

_MASK64 = (1 << 64) - 1


def derive_seed(seed: int, index: int) -> int:
    """Well-mixed 63-bit seed for sample ``index`` of a request seeded with ``seed`` (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def make_generator(seed: int, index: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, index))
    return g


class UniformStream:
    """A generator's fp64 uniforms in [0, 1), drawn ``chunk`` at a time and handed out one by one."""

    def __init__(self, generator: torch.Generator, chunk: int = 64):
        self.generator = generator
        self.chunk = chunk
        self._buf: list[float] = []
        self._at = 0

    def next(self) -> float:
        if self._at == len(self._buf):
            self._buf = torch.rand(self.chunk, generator=self.generator, dtype=torch.float64).tolist()
            self._at = 0
        self._at += 1
        return self._buf[self._at - 1]


_FAST = []


def _fast_rows():
    """triton_sample.sample_rows where Triton is importable (else None); looked up once."""
    if not _FAST:
        try:
            from .triton_sample import sample_rows
        except ImportError:
            sample_rows = None
        _FAST.append(sample_rows)
    return _FAST[0]


def _uniform(g: torch.Generator | UniformStream) -> float:
    if isinstance(g, UniformStream):
        return g.next()
    return torch.rand((), generator=g, dtype=torch.float64).item()


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | UniformStream]) -> tuple[list[int], list[float]]:
    """(M, V) fp32 logits, one row per sequence -> sampled token ids and their raw log-probabilities."""
    tokens, logprobs, _ = Readback(*sample_on_device(logits, params, generators)).result()
    return tokens, logprobs


def sample_on_device(logits: torch.Tensor, params: list[SamplingParams],
                     generators: list[torch.Generator | UniformStream]) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``sample``, but the (M,) int64 tokens and (M,) fp32 log-probabilities stay on the logits' device:
    each generator's draw is taken now, and nothing waits for the device (plain temperature or greedy
    sampling; top-k / top-p copy their settings over with a wait)."""
    m, vocab = logits.shape
    device = logits.device
    tokens = torch.empty(m, dtype=torch.long, device=device)
    first = params[0]
    if all(p is first or _same_rule(p, first) for p in params):  # one sampling rule (the usual case)
        greedy, rand = ([], None) if not first.greedy else (None, [])
    else:
        greedy = [i for i, p in enumerate(params) if p.greedy]
        rand = [i for i, p in enumerate(params) if not p.greedy]
    if (rand is None and logits.is_cuda and first.top_p >= 1.0 and not 0 < first.top_k < vocab
            and _fast_rows() is not None):
        # Plain temperature sampling on CUDA: one fused kernel (triton_sample), same rule as below.
        u = torch.tensor([_uniform(g) for g in generators], dtype=torch.float64).to(device, non_blocking=True)
        return _fast_rows()(logits, u, first.temperature)
    if greedy is None:
        tokens = logits.argmax(dim=-1)
    elif greedy:
        g_idx = torch.tensor(greedy, device=device)
        tokens[g_idx] = logits[g_idx].argmax(dim=-1)
    if rand is None or rand:
        everyone = rand is None
        if everyone:
            rand = list(range(m))
        r_idx = None if everyone else torch.tensor(rand, device=device)
        ps = [params[i] for i in rand]
        rows = logits if everyone else logits[r_idx]
        if everyone:
            probs = (rows / first.temperature if first.temperature != 1.0 else rows).softmax(dim=-1)  # (M, V)
        else:
            temps = torch.tensor([p.temperature for p in ps], device=device, dtype=torch.float32)
            probs = (rows / temps[:, None]).softmax(dim=-1)  # (M', V)
        order = None
        top_k = [p.top_k if p.top_k > 0 else vocab for p in ps]
        top_p = [p.top_p for p in ps]
        if min(top_k) < vocab or min(top_p) < 1.0:
            probs, order = probs.sort(dim=-1, descending=True)
            rank = torch.arange(vocab, device=device)
            probs = probs.masked_fill(rank[None] >= torch.tensor(top_k, device=device)[:, None], 0.0)
            # Nucleus over what top-k kept (renormalised), keeping the smallest prefix reaching top_p.
            before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
            total = probs.sum(dim=-1, keepdim=True)
            cut = torch.tensor([p if p < 1.0 else float("inf") for p in top_p], device=device)[:, None] * total
            probs = probs.masked_fill(before >= cut, 0.0)
        cdf = probs.double().cumsum(dim=-1)  # fp64: u * total stays strictly below the last step
        u = torch.tensor([_uniform(generators[i]) for i in rand], dtype=torch.float64)
        target = u.to(device, non_blocking=True) * cdf[:, -1]
        pick = torch.searchsorted(cdf, target[:, None], right=True).clamp_(max=vocab - 1)  # (M', 1)
        picked = (pick if order is None else order.gather(1, pick)).squeeze(1)
        if everyone:
            tokens = picked
        else:
            tokens[r_idx] = picked
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs


def _same_rule(a: SamplingParams, b: SamplingParams) -> bool:
    return a.temperature == b.temperature and a.top_k == b.top_k and a.top_p == b.top_p
