"""Continuous batching over the paged cache.

A request with ``n`` samples starts as one *prefix* sequence holding the prompt. Once the prefix is computed its
blocks are forked to ``n`` sample sequences, which each draw their first token from the prefix's last logits:
the prompt is prefilled once whatever ``n`` is.

Each step is either a prefill step (continue chunked prefills, admit waiting sequences while the token budget,
``max_num_seqs`` and free blocks allow) or, when there is nothing to prefill, a decode step over every running
sequence. Running sequences are kept in admission order, which is also their priority: when a decode needs a
block and none is free, the most recently admitted sequence is preempted, its blocks freed, and it goes back
to the front of the queue keeping every token it generated; when readmitted it recomputes prompt + generated
tokens in one prefill and carries on with its own generator, so its output is what it would have been.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from .cache import BlockManager
from .params import SamplingParams


@dataclass
class EngineStats:
    prefill_tokens: int = 0  # tokens computed in prefill steps (prompts, and recomputation after preemption)
    prefill_steps: int = 0
    decode_tokens: int = 0
    decode_steps: int = 0
    lookahead_steps: int = 0  # decode steps queued before the host had read the step before (engine look-ahead)
    preemptions: int = 0
    cow_copies: int = 0  # blocks copied because a sample wrote into a block it shared
    peak_blocks_in_use: int = 0
    peak_running: int = 0


class Request:
    def __init__(self, request_id: int, prompt: list[int], params: SamplingParams, seed: int):
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.seed = seed
        self.prefix = Sequence(self, index=-1, tokens=prompt, generator=None)
        self.samples: list[Sequence] = []
        self.num_finished = 0

    @property
    def finished(self) -> bool:
        return self.num_finished == self.params.n


class Sequence:
    def __init__(self, request: Request, index: int, tokens: list[int], generator):
        self.request = request
        self.index = index  # sample index; -1 for the prompt prefix
        self.tokens = list(tokens)  # prompt + generated
        self.num_computed = 0  # tokens whose latent entries are in the cache
        self.block_table: list[int] = []
        self.generator = generator  # sampler.UniformStream (or torch.Generator); None for a prompt prefix
        self.logprobs: list[float] = []
        self.routing: list[torch.Tensor] = []  # (tokens, n_moe, k) chunks covering [0, num_computed)
        self.finish_reason: str | None = None
        self.status = "waiting"  # waiting | running | finished

    @property
    def is_prefix(self) -> bool:
        return self.index < 0

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.request.prompt)

    @property
    def slots(self) -> int:
        """Sequence slots this occupies; a prefix reserves room for all the samples it will fork into."""
        return self.request.params.n if self.is_prefix else 1


@dataclass
class Chunk:
    seq: Sequence
    start: int  # first position computed this step
    length: int

    @property
    def completes(self) -> bool:
        """This chunk reaches the sequence's last token, so its logits are wanted."""
        return self.start + self.length == len(self.seq.tokens)


@dataclass
class StepPlan:
    chunks: list[Chunk]
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src block, dst block)
    prefill: bool = True


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, stats: EngineStats):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.stats = stats
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.finished_requests = 0
        # Blocks kept free when admitting work next to running sequences, so admission does not immediately
        # force the running ones into preemption.
        self.watermark = max(1, blocks.num_blocks // 100)

    def add(self, request: Request) -> None:
        self.waiting.append(request.prefix)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- planning -----------------------------------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        plan = self._schedule_prefill()
        if plan is None:
            plan = self._schedule_decode()
        if plan is not None:
            self.stats.cow_copies += len(plan.copies)
            self.stats.peak_blocks_in_use = max(self.stats.peak_blocks_in_use, self.blocks.peak_used)
            self.stats.peak_running = max(self.stats.peak_running, len(self.running))
        return plan

    def _schedule_prefill(self) -> StepPlan | None:
        prefilling = [s for s in self.running if s.remaining > 1]
        if not prefilling and not self.waiting:
            return None
        chunks, copies, scheduled, budget = [], [], set(), self.max_tokens
        for s in prefilling:
            if budget == 0:
                break
            n = min(s.remaining, budget)
            if self._reserve(s, n, copies, scheduled):
                chunks.append(Chunk(s, s.num_computed, n))
                scheduled.add(id(s))
                budget -= n
        while self.waiting and budget > 0:
            s = self.waiting[0]
            if self.blocks.blocks_for(len(s.tokens)) > self.blocks.num_blocks:
                # A preempted sample whose last token just filled the cache: it cannot continue anywhere.
                self.waiting.popleft()
                self.finish(s, "length")
                continue
            if self.running and sum(r.slots for r in self.running) + s.slots > self.max_num_seqs:
                break
            n = min(s.remaining, budget)
            need = self.blocks.blocks_needed(s.block_table, 0, n)
            if need > self.blocks.num_free - (self.watermark if self.running else 0):
                break
            self.waiting.popleft()
            self.blocks.reserve(s.block_table, 0, n, copies)
            self.running.append(s)
            s.status = "running"
            chunks.append(Chunk(s, 0, n))
            scheduled.add(id(s))
            budget -= n
        return StepPlan(chunks, copies, prefill=True) if chunks else None

    def _schedule_decode(self) -> StepPlan | None:
        chunks, copies, scheduled, budget = [], [], set(), self.max_tokens
        for s in list(self.running):
            if budget == 0:
                break
            if s.status != "running" or s.remaining != 1:
                continue  # preempted earlier in this loop, or a prefill that is waiting for blocks
            table, at = s.block_table, s.num_computed // self.blocks.block_size
            has_room = at < len(table) and self.blocks.ref[table[at]] == 1  # its own block: nothing to reserve
            if has_room or self._reserve(s, 1, copies, scheduled):
                chunks.append(Chunk(s, s.num_computed, 1))
                scheduled.add(id(s))
                budget -= 1
            elif self.blocks.blocks_for(len(s.tokens)) > self.blocks.num_blocks:
                self.finish(s, "length")  # longer than the whole cache: it cannot grow, whatever else happens
            else:
                self._preempt(s)
        return StepPlan(chunks, copies, prefill=False) if chunks else None

    def _reserve(self, s: Sequence, n: int, copies: list, scheduled: set) -> bool:
        """Blocks for ``n`` more tokens of ``s``, preempting lower-priority (later) unscheduled sequences."""
        while not self.blocks.reserve(s.block_table, s.num_computed, n, copies):
            victim = None
            for v in reversed(self.running):
                if v is s:
                    break
                if id(v) not in scheduled:
                    victim = v
                    break
            if victim is None:
                return False
            self._preempt(victim)
        return True

    def _preempt(self, s: Sequence) -> None:
        self.running.remove(s)
        self.blocks.free(s.block_table)
        s.num_computed = 0
        s.routing = []
        s.status = "waiting"
        self.waiting.appendleft(s)
        self.stats.preemptions += 1

    # -- bookkeeping after a step -------------------------------------------------------------------------------
    def computed(self, chunk: Chunk, routing: torch.Tensor | None) -> None:
        chunk.seq.num_computed += chunk.length
        if routing is not None:
            chunk.seq.routing.append(routing)

    def fork(self, prefix: Sequence, generators: list) -> list[Sequence]:
        """Replace a computed prompt prefix by its n samples, all reading the prefix's blocks."""
        req = prefix.request
        samples = []
        for i, g in enumerate(generators):
            s = Sequence(req, index=i, tokens=prefix.tokens, generator=g)
            s.block_table = self.blocks.fork(prefix.block_table)
            s.num_computed = prefix.num_computed
            s.routing = list(prefix.routing)
            s.status = "running"
            samples.append(s)
        self.blocks.free(prefix.block_table)
        prefix.status = "finished"
        at = self.running.index(prefix)
        self.running[at:at + 1] = samples
        req.samples = samples
        return samples

    def finish(self, s: Sequence, reason: str) -> None:
        if s.status == "running":
            self.running.remove(s)
        self.blocks.free(s.block_table)
        s.status = "finished"
        s.finish_reason = reason
        s.request.num_finished += 1
        self.finished_requests += s.request.finished
