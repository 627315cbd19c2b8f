"""The engine: owns weights, latent cache and runner; turns prompts into sampled completions."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cache import FP8, BlockManager, LatentCache, kv_bytes_per_token
from .graphs import DecodeGraphs
from .params import CompletionOutput, RequestOutput, SamplingParams
from .runner import ModelRunner
from .readback import Readback
from .sampler import UniformStream, make_generator, sample_on_device
from .scheduler import Chunk, EngineStats, Request, Scheduler, Sequence
from .weights import ModelWeights

log = logging.getLogger(__name__)

_CPU_DEFAULT_CACHE_BYTES = 1 << 30


@dataclass
class _Pending:
    """A decode step queued on the device: its sequences, their sampled tokens (device), and the copy of
    tokens, log-probs and routing (if recorded) on its way to the host."""

    seqs: list[Sequence]
    tokens: torch.Tensor  # (B,) int64, on the device: the next step's input ids
    readback: Readback
    records_routing: bool


class Engine:
    """Paged-latent-cache MLA/MoE inference for transformers' DeepseekV2ForCausalLM weights.

    Options: ``max_num_seqs`` (sequences decoded together), ``max_num_batched_tokens`` (tokens per step; longer
    prompts are prefilled in chunks), ``block_size`` (tokens per cache block), cache size as ``num_blocks`` or
    ``kv_cache_bytes`` (default: room for ``max_num_seqs`` sequences of ``max_model_len`` tokens, capped at
    ``kv_cache_memory_fraction`` of free GPU memory; on CPU at 4096 tokens a sequence and 1 GiB), ``max_model_len``,
    ``eos_token_id`` (int or list), ``seed`` (draws seeds for requests that bring none), ``use_tqdm``,
    ``prefill_attention`` ('expanded' or 'absorbed'), ``moe_backend`` ('auto', 'grouped', 'loop'),
    ``decode_kernels`` ('auto': fused Triton kernels for decode steps on CUDA, see fused.py; 'triton'; 'torch'),
    ``cuda_graphs`` (replay decode steps from CUDA graphs; default on for CUDA with the fused decode kernels, or
    in bf16/fp16 with grouped experts; on CPU, True runs the same padded decode path without graphs),
    ``lookahead`` (with ``cuda_graphs``: queue each decode step before the host has read the one before, see
    ``_decode_ahead``; default on), ``cpu_threads`` (torch threads while decoding on CPU; default 1, None leaves
    torch's setting), ``kv_dtype`` ('auto': the engine's dtype; 'fp8': the latent cache in float8_e4m3 with a
    scale per token, about half the bytes of bf16, read and written by the fused kernels on GPUs with FP8
    conversions (compute capability 8.9+), by the torch path elsewhere; see cache.py). ``weight_dtype``
    (``from_model`` / ``from_pretrained`` / ``from_config`` only; 'auto' or 'fp8': the attention and MLP / expert
    projections in float8_e4m3 with 128 x 128 block scales, quantised on every load; read as bytes by the fused
    kernels on GPUs with FP8 conversions, dequantised where used by the torch path elsewhere; see fp8_weights.py).
    """

    def __init__(self, config, weights: ModelWeights, *, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 4096, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_bytes: int | None = None, kv_cache_memory_fraction: float = 0.4,
                 max_model_len: int | None = None, eos_token_id: int | list[int] | None = None, seed: int | None = 0,
                 use_tqdm: bool = True, prefill_attention: str = "expanded", moe_backend: str = "auto",
                 decode_kernels: str = "auto", cuda_graphs: bool | None = None, lookahead: bool = True,
                 cpu_threads: int | None = 1, kv_dtype: str = "auto"):
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or block_size < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and block_size must be positive")
        self.config = config
        self.weights = weights
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = int(max_model_len or config.max_position_embeddings)
        self.use_tqdm = use_tqdm
        self.cpu_threads = cpu_threads
        self.version: int | None = None
        self.stats = EngineStats()
        eos = config.eos_token_id if eos_token_id is None else eos_token_id
        self.eos_token_ids = set([eos] if isinstance(eos, int) else (eos or []))
        self._rng = torch.Generator()
        self._rng.manual_seed(int(torch.randint(2**62, ()).item()) if seed is None else seed)

        if kv_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_dtype must be 'auto' (the engine's dtype) or 'fp8', got {kv_dtype!r}")
        cache_dtype = FP8 if kv_dtype == "fp8" else self.dtype
        fp8_parts = [p for p, on in (("kv_dtype='fp8'", kv_dtype == "fp8"), ("FP8 weights", weights.fp8)) if on]
        if fp8_parts and self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 9):
            if decode_kernels == "triton":
                raise ValueError(f"{' and '.join(fp8_parts)} on the fused kernels need FP8 conversions (compute "
                                 "capability 8.9+); pass decode_kernels='torch' or 'auto'")
            decode_kernels = "torch"
        per_token = kv_bytes_per_token(config, cache_dtype)
        if num_blocks is None:
            if kv_cache_bytes is None:
                # Never more than every sequence at full length could use.
                want = max_num_seqs * (self.max_model_len + block_size) * per_token
                if self.device.type == "cuda":
                    free, _ = torch.cuda.mem_get_info(self.device)
                    kv_cache_bytes = min(want, int(free * kv_cache_memory_fraction))
                else:
                    want = max_num_seqs * (min(self.max_model_len, 4096) + block_size) * per_token
                    kv_cache_bytes = min(want, _CPU_DEFAULT_CACHE_BYTES)
            num_blocks = kv_cache_bytes // (per_token * block_size)
        if num_blocks < 1:
            raise ValueError(f"the KV cache budget holds no block of {block_size} tokens ({per_token} B/token)")
        # One block more than the manager hands out: padded decode rows write there (see graphs.py).
        self.cache = LatentCache(config.num_hidden_layers, num_blocks + 1, block_size, config.kv_lora_rank,
                                 config.qk_rope_head_dim, self.dtype, self.device, kv_dtype=cache_dtype)
        self.blocks = BlockManager(num_blocks, block_size)
        self.runner = ModelRunner(config, weights, self.cache, self.device, self.dtype, prefill_attention,
                                  moe_backend, decode_kernels)
        on_cuda = self.device.type == "cuda"
        # Decode steps are capturable on the fused kernels, or on torch's grouped GEMM except in fp32 (it copies
        # from the host inside, torch 2.11); the loop backend syncs with the host.
        fused_decode = self.runner.fused is not None
        if cuda_graphs is None:
            cuda_graphs = on_cuda and (fused_decode or (self.runner.moe_backend == "grouped"
                                                        and self.dtype != torch.float32))
        if cuda_graphs and not fused_decode and self.runner.moe_backend != "grouped":
            raise ValueError("cuda_graphs needs moe_backend='grouped' (the loop backend syncs with the host)")
        self.graphs = DecodeGraphs(self.runner, max_num_seqs, -(-self.max_model_len // block_size),
                                   scratch_block=num_blocks, capture=on_cuda) if cuda_graphs else None
        self.lookahead = lookahead and self.graphs is not None
        log.info("engine: %d cache blocks x %d tokens (%.1f MiB, %d B/token), weights %.1f MiB on %s",
                 num_blocks, block_size, self.cache.num_bytes() / 2**20, per_token, weights.num_bytes() / 2**20,
                 self.device)

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, hf_model, device=None, dtype: torch.dtype | None = None, weight_dtype: str = "auto",
                   **opts) -> Engine:
        """Copy the weights of a transformers ``DeepseekV2ForCausalLM`` (the model itself is left untouched)."""
        config = hf_model.config
        embed = hf_model.get_input_embeddings().weight
        device = torch.device(device) if device is not None else embed.device
        weights = ModelWeights.allocate(config, device, dtype or embed.dtype, weight_dtype)
        weights.load_(hf_model.state_dict())
        gen = getattr(hf_model, "generation_config", None)
        if "eos_token_id" not in opts and gen is not None and gen.eos_token_id is not None:
            opts["eos_token_id"] = gen.eos_token_id
        return cls(config, weights, **opts)

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, dtype: torch.dtype | None = None, **opts) -> Engine:
        """Load a saved checkpoint (local folder or hub id) with transformers, on CPU, then copy it to ``device``.

        transformers does the checkpoint-format work (original per-expert names are converted to the stacked
        layout on load), so anything ``AutoModelForCausalLM`` reads, the engine reads.
        """
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        engine = cls.from_model(model, device=device, dtype=dtype, **opts)
        del model
        return engine

    @classmethod
    def from_config(cls, config, device="meta", dtype: torch.dtype = torch.bfloat16, weight_dtype: str = "auto",
                    **opts) -> Engine:
        """An engine with uninitialised weights; on the meta device it sizes a model without allocating it."""
        return cls(config, ModelWeights.allocate(config, torch.device(device), dtype, weight_dtype), **opts)

    # -- weights ------------------------------------------------------------------------------------------------
    def load_weights(self, state_dict: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                     version: int | None = None, strict: bool = True) -> None:
        """Swap in new weights (transformers names) in place: no tensor, weight or cache, is re-allocated."""
        self.weights.load_(state_dict, strict=strict)
        self.version = version if version is not None else (self.version or 0) + 1

    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.config, self.cache.kv_dtype)

    def reset_stats(self) -> None:
        self.stats = EngineStats()

    # -- generation ---------------------------------------------------------------------------------------------
    def generate(self, prompt_token_ids: list[list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Complete every prompt; one ``RequestOutput`` per prompt, in order, each with ``params.n`` samples."""
        prompts = self._check_prompts(prompt_token_ids)
        params = self._per_prompt(sampling_params, len(prompts))
        self.blocks.reset()
        sched = Scheduler(self.blocks, self.max_num_seqs, self.max_num_batched_tokens, self.stats)
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            seed = p.seed if p.seed is not None else int(torch.randint(2**62, (), generator=self._rng).item())
            requests.append(Request(i, prompt, p, seed))
            sched.add(requests[-1])
        show = self.use_tqdm if use_tqdm is None else use_tqdm
        with tqdm(total=len(requests), desc="generate", unit="prompt", disable=not show) as bar, self._threads():
            pending = None  # a decode step on the device whose tokens the host has not read yet
            while pending is not None or sched.has_unfinished():
                if pending is None:
                    pending = self._step(sched)
                else:
                    ahead = self._decode_ahead(sched, pending)
                    self._read(sched, pending)
                    pending = ahead
                bar.update(sched.finished_requests - bar.n)
        return [self._output(r) for r in requests]

    @contextlib.contextmanager
    def _threads(self):
        """On CPU, decode with ``cpu_threads`` threads: its ops are tiny, and extra OpenMP threads only wait on
        each other (on a busy 2-core box, 2 threads decoded ~85x slower than 1)."""
        if self.device.type != "cpu" or not self.cpu_threads:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.cpu_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _step(self, sched: Scheduler) -> _Pending | None:
        """Plan and run one step; a lean decode step is returned unread (``generate`` reads it), else None."""
        plan = sched.schedule()
        if plan is None:
            raise RuntimeError(f"engine scheduler stalled: {len(sched.waiting)} waiting, {len(sched.running)} "
                               f"running, {self.blocks.num_free}/{self.blocks.num_blocks} blocks free")
        self.cache.copy_blocks(plan.copies)
        chunks = plan.chunks
        seqs = [c.seq for c in chunks]
        record = any(s.request.params.return_routing for s in seqs)
        if not plan.prefill and self.graphs is not None and self.graphs.fits(len(chunks),
                                                                              max(c.start for c in chunks) + 1):
            starts = [c.start for c in chunks]
            logits, routing = self.graphs.run([s.tokens[i] for s, i in zip(seqs, starts)], starts,
                                              [s.block_table for s in seqs])
        else:
            logits, routing = self._forward(chunks, record)
        if plan.prefill:
            self.stats.prefill_steps += 1
            self.stats.prefill_tokens += sum(c.length for c in chunks)
        else:
            self.stats.decode_steps += 1
            self.stats.decode_tokens += len(chunks)
            if all(s.index >= 0 for s in seqs):
                # A decode step of samples (no prompt prefix finishing its prefill here): each completes and
                # samples. The common case, kept lean because its Python runs between graph replays.
                for c in chunks:
                    sched.computed(c, None)
                return self._sample_later(seqs, logits, routing if record else None)

        routing = routing.cpu() if (routing is not None and record) else None
        to_sample: list[tuple[Sequence, int]] = []
        offset, row = 0, 0
        for c in plan.chunks:
            wants = routing is not None and c.seq.request.params.return_routing
            sched.computed(c, routing[offset:offset + c.length] if wants else None)
            offset += c.length
            if not c.completes:
                continue
            if c.seq.is_prefix:
                req = c.seq.request
                gens = [UniformStream(make_generator(req.seed, i)) for i in range(req.params.n)]
                to_sample += [(s, row) for s in sched.fork(c.seq, gens)]
            else:
                to_sample.append((c.seq, row))
            row += 1
        if not to_sample:
            return None
        picked = [r for _, r in to_sample]
        rows = logits if picked == list(range(logits.shape[0])) else logits[torch.tensor(picked, device=logits.device)]
        self._read(sched, self._sample_later([s for s, _ in to_sample], rows, None))  # routing went in above
        return None

    def _sample_later(self, seqs: list[Sequence], logits: torch.Tensor, routing: torch.Tensor | None) -> _Pending:
        """Queue the sampling of one token for each of ``seqs`` from its row of ``logits`` (M, V)."""
        tokens, logprobs = sample_on_device(logits, [s.request.params for s in seqs], [s.generator for s in seqs])
        return _Pending(seqs, tokens, Readback(tokens, logprobs, routing), routing is not None)

    def _read(self, sched: Scheduler, pending: _Pending) -> None:
        """Append a queued step's tokens (and routing); rows of sequences that finished meanwhile are dropped."""
        tokens, logprobs, routing = pending.readback.result()
        for i, (s, tok, lp) in enumerate(zip(pending.seqs, tokens, logprobs)):
            if s.status == "running":
                if routing is not None and s.request.params.return_routing:
                    s.routing.append(routing[i:i + 1])
                self._append(sched, s, tok, lp)

    def _decode_ahead(self, sched: Scheduler, pending: _Pending) -> _Pending | None:
        """Queue the next decode step of ``pending``'s sequences before reading ``pending``, or None.

        The next step's input tokens are ``pending``'s sampled tokens, still on the device, so the host's work
        (reading tokens, stop checks, scheduling, building inputs) overlaps the device's step instead of
        leaving it idle between steps. It runs only where the scheduler would plan exactly that step: nothing
        waiting or prefilling, and every sequence writing its next entry into a block it owns alone (already
        there, or a free one; no copy-on-write, no preemption). A sequence that stops on ``pending``'s token
        has computed one wasted row, dropped when read, whose cache entry lies past its end in a block it owned
        (and frees): no sequence's tokens change. (Log-probabilities can move in the last float bit or so: the
        extra rows can put a step in a larger padded batch, and matmuls are not bitwise batch-invariant.)
        """
        if not self.lookahead or self.graphs is None or sched.waiting:  # (graphs can be switched off later)
            return None
        live = [(i, s) for i, s in enumerate(pending.seqs) if s.status == "running"]  # others stopped a step ago
        if len(live) != len(sched.running) or any(s is not r for (_, s), r in zip(live, sched.running)):
            return None
        # Rows whose pending token is their last by length are left out: they stop whatever it is.
        keep = [i for i, s in live
                if s.num_generated + 1 < s.request.params.max_tokens and len(s.tokens) + 1 < self.max_model_len]
        if not keep:
            return None
        seqs = [pending.seqs[i] for i in keep]
        bs, ref = self.blocks.block_size, self.blocks.ref
        positions = [s.num_computed for s in seqs]  # the position of the token being sampled by ``pending``
        grow = []  # sequences whose next entry starts a new block
        for s, p in zip(seqs, positions):
            at = p // bs
            if at >= len(s.block_table):
                grow.append((s, p))
            elif ref[s.block_table[at]] != 1:
                return None
        if len(grow) > self.blocks.num_free or not self.graphs.fits(len(seqs), max(positions) + 1):
            return None
        copies: list[tuple[int, int]] = []  # stays empty: no block written here is shared
        for s, p in grow:
            self.blocks.reserve(s.block_table, p, 1, copies)
        ids = pending.tokens
        if len(keep) < len(pending.seqs):
            ids = ids[torch.tensor(keep).to(ids.device, non_blocking=True)]
        logits, routing = self.graphs.run(ids, positions, [s.block_table for s in seqs])
        for s in seqs:
            s.num_computed += 1
        self.stats.decode_steps += 1
        self.stats.lookahead_steps += 1
        self.stats.decode_tokens += len(seqs)
        self.stats.peak_blocks_in_use = max(self.stats.peak_blocks_in_use, self.blocks.peak_used)
        return self._sample_later(seqs, logits, routing if pending.records_routing else None)

    def _forward(self, chunks: list[Chunk], record_routing: bool):
        ids, rows, offset = [], [], 0
        for c in chunks:
            ids.extend(c.seq.tokens[c.start:c.start + c.length])
            offset += c.length
            if c.completes:
                rows.append(offset - 1)
        batch = self.runner.batch([c.start for c in chunks], [c.length for c in chunks],
                                  [c.seq.block_table for c in chunks])
        input_ids = torch.tensor(ids, device=self.device)
        rows_t = torch.tensor(rows, dtype=torch.long, device=self.device)
        return self.runner.forward(input_ids, batch, rows_t, record_routing)

    def _append(self, sched: Scheduler, s: Sequence, token: int, logprob: float) -> None:
        p = s.request.params
        s.tokens.append(token)
        s.logprobs.append(logprob)
        if (not p.ignore_eos and token in self.eos_token_ids) or (p.stop_token_ids and token in p.stop_token_ids):
            sched.finish(s, "stop")
        elif s.num_generated >= p.max_tokens or len(s.tokens) >= self.max_model_len:
            sched.finish(s, "length")

    def _output(self, req: Request) -> RequestOutput:
        p, n_prompt = req.params, len(req.prompt)
        outs = []
        for s in req.samples:
            routing = None
            if p.return_routing:
                k = self.config.num_experts_per_tok
                routing = (torch.cat(s.routing) if s.routing
                           else torch.zeros(0, self.runner.num_moe_layers, k, dtype=torch.int32))
            outs.append(CompletionOutput(index=s.index, token_ids=s.tokens[n_prompt:],
                                         logprobs=list(s.logprobs) if p.logprobs else None,
                                         finish_reason=s.finish_reason, routing=routing))
        return RequestOutput(request_id=req.request_id, prompt_token_ids=list(req.prompt), outputs=outs)

    # -- teacher forcing ----------------------------------------------------------------------------------------
    def score(self, prompt_token_ids: list[list[int]], completion_token_ids: list[list[int]]) -> list[list[float]]:
        """Log-probabilities of each completion token given its prompt and the completion tokens before it."""
        if len(prompt_token_ids) != len(completion_token_ids):
            raise ValueError("score: need one completion per prompt")
        seqs = [list(p) + list(c) for p, c in zip(self._check_prompts(prompt_token_ids), completion_token_ids)]
        if any(not 0 <= t < self.config.vocab_size for c in completion_token_ids for t in c):
            raise ValueError(f"score: completion token ids outside [0, {self.config.vocab_size})")
        for i, s in enumerate(seqs):
            if len(s) > self.max_model_len or self.blocks.blocks_for(len(s)) > self.blocks.num_blocks:
                raise ValueError(f"score: prompt+completion {i} ({len(s)} tokens) does not fit the engine")
        self.blocks.reset()
        results: list[list[float]] = [[] for _ in seqs]
        todo = list(range(len(seqs)))
        while todo:
            group, tokens = [], 0
            for i in todo:  # as many as fit the token budget and the cache (always at least one)
                need = self.blocks.blocks_for(len(seqs[i]))
                if group and (tokens + len(seqs[i]) > self.max_num_batched_tokens or need > self.blocks.num_free):
                    break
                table: list[int] = []
                self.blocks.reserve(table, 0, len(seqs[i]), [])
                group.append((i, table))
                tokens += len(seqs[i])
            todo = todo[len(group):]
            self._score_group(seqs, [len(prompt_token_ids[i]) for i, _ in group], group, results)
            for _, table in group:
                self.blocks.free(table)
        return results

    def _score_group(self, seqs, prompt_lens, group, results) -> None:
        ids, rows, targets, offset = [], [], [], 0
        for (i, _), n_prompt in zip(group, prompt_lens):
            s = seqs[i]
            ids.extend(s)
            rows.extend(range(offset + n_prompt - 1, offset + len(s) - 1))
            targets.extend(s[n_prompt:])
            offset += len(s)
        batch = self.runner.batch([0] * len(group), [len(seqs[i]) for i, _ in group], [t for _, t in group])
        logits, _ = self.runner.forward(torch.tensor(ids, device=self.device), batch,
                                        torch.tensor(rows, dtype=torch.long, device=self.device))
        lp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(targets, device=self.device)[:, None])
        lp = lp.squeeze(1).tolist()
        at = 0
        for (i, _), n_prompt in zip(group, prompt_lens):
            n = len(seqs[i]) - n_prompt
            results[i] = lp[at:at + n]
            at += n

    # -- input checks -------------------------------------------------------------------------------------------
    def _check_prompts(self, prompts) -> list[list[int]]:
        if not isinstance(prompts, (list, tuple)) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("prompt_token_ids must be a list of token-id lists, one per prompt")
        vocab = self.config.vocab_size
        out = []
        for i, p in enumerate(prompts):
            p = p.tolist() if isinstance(p, torch.Tensor) else list(p)
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if any(not 0 <= t < vocab for t in p):
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab})")
            if len(p) >= self.max_model_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens; max_model_len is {self.max_model_len}")
            if self.blocks.blocks_for(len(p)) > self.blocks.num_blocks:
                raise ValueError(f"prompt {i} ({len(p)} tokens) does not fit the whole KV cache "
                                 f"({self.blocks.num_blocks} blocks of {self.blocks.block_size})")
            out.append(p)
        return out

    @staticmethod
    def _per_prompt(params, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
        return params
