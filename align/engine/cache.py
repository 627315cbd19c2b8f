"""Paged latent KV cache and the block manager that hands out its blocks.

Per token and layer MLA only needs the normalised latent c_kv (kv_lora_rank values) and the rotated shared rope
key (qk_rope_head_dim values): keys and values of every head are recomputed from c_kv by the absorbed weights.
So one cache entry is ``kv_lora_rank + qk_rope_head_dim`` wide, stored contiguously ([c_kv | k_pe]) so a
single matmul scores a query against both parts.

With ``kv_dtype=torch.float8_e4m3fn`` each entry is stored as FP8 with one float32 scale per token and layer
(amax / 448, the largest e4m3 value): 1 byte a value instead of 2 in bf16, plus 4 bytes a token.  e4m3 keeps about
two significant digits whatever the magnitude, so one scale serves both the normalised c_kv and the rope key.

Tokens live in fixed-size blocks; each sequence owns a block table (list of block ids). Blocks are reference
counted so the n samples of one prompt point at the prompt's blocks; a sample that writes into a block someone
else still reads (the prompt's last, partial block) first gets a private copy (copy-on-write).
"""

from __future__ import annotations

import torch


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Cache bytes one token costs across all layers: layers x (kv_lora_rank + qk_rope_head_dim) x dtype size
    (plus a 4-byte scale per layer in FP8)."""
    width = (config.kv_lora_rank + config.qk_rope_head_dim) * dtype.itemsize + (4 if dtype == FP8 else 0)
    return config.num_hidden_layers * width


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) -> (N, D) float8_e4m3fn values and (N,) float32 scales, x ~= values * scale."""
    scale = x.float().abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX       # (N,)
    return (x.float() / scale[:, None]).to(FP8), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., D) FP8 values and (...) scales -> (..., D) in ``dtype``."""
    return (q.float() * scale[..., None]).to(dtype)


class LatentCache:
    """All layers' latent entries: ``kv`` is (layers, num_blocks, block_size, kv_lora_rank + qk_rope_head_dim)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype, device, kv_dtype: torch.dtype | None = None):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_lora_rank = kv_lora_rank
        self.dtype = dtype                       # what gather returns: the engine's compute dtype
        self.kv_dtype = kv_dtype or dtype
        # Zeroed, not empty: padded attention reads unused slots and multiplies them by 0; garbage NaNs would leak.
        # FP8 entries are held as their bytes (uint8): copies and gathers need no FP8 kernels (CPU has few).
        self.kv = torch.zeros(num_layers, num_blocks, block_size, kv_lora_rank + rope_dim,
                              dtype=torch.uint8 if self.kv_dtype == FP8 else self.kv_dtype, device=device)
        self.scale = torch.zeros(num_layers, num_blocks, block_size, device=device) if self.kv_dtype == FP8 else None

    @property
    def fp8(self) -> bool:
        return self.scale is not None

    def write(self, layer: int, slots: torch.Tensor, entries: torch.Tensor) -> None:
        """Store ``entries`` (N, R+Dr) at flat slot ids ``slots`` (N,) = block * block_size + offset."""
        if self.fp8:
            values, scale = quantize_fp8(entries)
            self.scale[layer].view(-1).index_copy_(0, slots, scale)
            entries = values.view(torch.uint8)
        self.kv[layer].view(-1, self.kv.shape[-1]).index_copy_(0, slots, entries.to(self.kv.dtype))

    def gather(self, layer: int, block_tables: torch.Tensor, length: int) -> torch.Tensor:
        """(B, max_blocks) block ids -> (B, length, R+Dr) entries in token order (pad slots hold stale values)."""
        b, nb = block_tables.shape
        ctx = self.kv[layer][block_tables].view(b, nb * self.block_size, -1)[:, :length]  # (B, length, R+Dr)
        if self.fp8:
            scale = self.scale[layer][block_tables].view(b, nb * self.block_size)[:, :length]   # (B, length)
            return dequantize_fp8(ctx.view(FP8), scale, self.dtype)
        return ctx

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (all layers) src -> dst."""
        if not pairs:
            return
        # A block freed and handed out again within one step can be a destination twice: the later copy wins,
        # as it would copying one pair at a time.
        last = {d: s for s, d in pairs}
        src = torch.tensor(list(last.values()), device=self.kv.device)
        dst = torch.tensor(list(last.keys()), device=self.kv.device)
        self.kv[:, dst] = self.kv[:, src]
        if self.fp8:
            self.scale[:, dst] = self.scale[:, src]

    def num_bytes(self) -> int:
        extra = self.scale.numel() * self.scale.element_size() if self.fp8 else 0
        return self.kv.numel() * self.kv.element_size() + extra


class BlockManager:
    """Free list plus reference counts; never touches cache contents (the engine performs the copies)."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref = [0] * num_blocks
        # Low ids first: a stack popped from the end hands out 0, 1, 2, ... which keeps test traces readable.
        self._free = list(range(num_blocks - 1, -1, -1))
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _alloc(self) -> int:
        block = self._free.pop()
        self.ref[block] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return block

    def _decref(self, block: int) -> None:
        self.ref[block] -= 1
        if self.ref[block] == 0:
            self._free.append(block)

    def blocks_needed(self, table: list[int], start: int, count: int) -> int:
        """New blocks writing tokens [start, start+count) into ``table`` takes, copy-on-write included."""
        new = max(0, self.blocks_for(start + count) - len(table))
        idx = start // self.block_size
        cow = idx < len(table) and self.ref[table[idx]] > 1
        return new + int(cow)

    def reserve(self, table: list[int], start: int, count: int, copies: list[tuple[int, int]]) -> bool:
        """Make ``table`` writable for tokens [start, start+count); append block copies to ``copies``.

        Returns False (and changes nothing) when there are not enough free blocks.
        """
        if self.blocks_needed(table, start, count) > self.num_free:
            return False
        idx = start // self.block_size
        if idx < len(table) and self.ref[table[idx]] > 1:
            shared = table[idx]
            table[idx] = self._alloc()
            copies.append((shared, table[idx]))
            self._decref(shared)
        while len(table) < self.blocks_for(start + count):
            table.append(self._alloc())
        return True

    def fork(self, table: list[int]) -> list[int]:
        """A new table reading the same blocks (the caller decides when it writes)."""
        for block in table:
            self.ref[block] += 1
        return list(table)

    def free(self, table: list[int]) -> None:
        for block in table:
            self._decref(block)
        table.clear()

    def reset(self) -> None:
        self.ref = [0] * self.num_blocks
        self._free = list(range(self.num_blocks - 1, -1, -1))
