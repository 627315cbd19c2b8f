"""FP8 projection weights: float8_e4m3 values with one float32 scale per 128 x 128 block.

DeepSeek-V3's inference layout: a weight matrix W (rows, cols) is cut into 128 x 128 blocks, each held as e4m3
values q and one scale s = amax(|block|) / 448 (448 is e4m3's largest value), so W ~= q * s. The engine
quantises the policy's bf16/fp32 weights as they are loaded, in ``load_weights`` during RL too, so weight sync
still hands over an ordinary state dict.

The engine stacks some transformers parameters into one matrix (q | kv_a, gate | up). Each part is quantised
on its own block grid, exactly as if it were quantised alone, and the scales are therefore held per row:
``scale[..., r, j]`` is the scale of the block that holds row r and columns 128 j .. 128 j + 127. Row slices of
a stack are then plain slices of both tensors. The copies cost 4 bytes per 128 weights, 3% of the FP8 bytes.

Compute (the torch path): a matrix is dequantised where it is used (``dequant``, ``ops.linear``). Resident
weights take about half the memory of bf16 ones; a step moves no fewer bytes, since the dequantised copy is
written and read again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import FP8, FP8_MAX

BLOCK = 128
# Experts dequantised (or quantised) at a time: bounds the fp32 temporaries of an (E, rows, cols) stack.
_CHUNK = 8


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., R, C) -> (..., R, C) float8_e4m3fn values and (..., ceil(R/128), ceil(C/128)) float32 block scales."""
    *lead, rows, cols = w.shape
    rb, cb = -(-rows // BLOCK), -(-cols // BLOCK)
    padded = F.pad(w.float(), (0, cb * BLOCK - cols, 0, rb * BLOCK - rows))
    blocks = padded.view(*lead, rb, BLOCK, cb, BLOCK)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / FP8_MAX  # (..., rb, cb)
    q = (blocks / scale[..., :, None, :, None]).view(*lead, rb * BLOCK, cb * BLOCK)[..., :rows, :cols]
    return q.to(FP8), scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize_blocks``: (..., R, C) values and block scales -> (..., R, C) in ``dtype``."""
    return _dequant_rows(q, _block_rows(scale, q.shape[-2]), dtype)


class Fp8Weight:
    """A weight matrix, or a stack of them (experts), in FP8 with per-row copies of its 128 x 128 block scales.

    ``data`` (..., R, C) float8_e4m3fn; ``scale`` (..., R, ceil(C/128)) float32. Filled in place by ``copy_``
    (which quantises), so views of it, and CUDA graphs that read it, stay valid across weight swaps.
    """

    __slots__ = ("data", "scale")

    def __init__(self, data: torch.Tensor, scale: torch.Tensor):
        self.data = data
        self.scale = scale

    @classmethod
    def empty(cls, *shape: int, device) -> Fp8Weight:
        return cls(torch.empty(*shape, dtype=FP8, device=device),
                   torch.empty(*shape[:-1], -(-shape[-1] // BLOCK), dtype=torch.float32, device=device))

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __getitem__(self, rows: slice) -> Fp8Weight:
        """Rows of a 2-D matrix (a part of a stacked matrix) as a view."""
        if self.data.dim() != 2 or not isinstance(rows, slice):
            raise TypeError("Fp8Weight supports row slices of a 2-D matrix only")
        return Fp8Weight(self.data[rows], self.scale[rows])

    @torch.no_grad()
    def copy_(self, value: torch.Tensor) -> Fp8Weight:
        """Quantise ``value`` (the same shape) on its own 128 x 128 block grid into this weight, in place."""
        if tuple(value.shape) != tuple(self.shape):
            raise ValueError(f"Fp8Weight.copy_: shape {tuple(value.shape)}, expected {tuple(self.shape)}")
        # A 2-D matrix is a stack of one; a stack is quantised a few experts at a time.
        value, data, scale = (t if t.dim() == 3 else t[None] for t in (value.to(self.device), self.data, self.scale))
        for i in range(0, value.shape[0], _CHUNK):
            q, blocks = quantize_blocks(value[i:i + _CHUNK])
            data[i:i + _CHUNK].copy_(q)
            scale[i:i + _CHUNK].copy_(_block_rows(blocks, value.shape[-2]))
        return self

    def dequant(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype``, (..., R, C); a stack is done a few experts at a time."""
        if self.data.dim() == 3:
            out = torch.empty(self.shape, dtype=dtype, device=self.device)
            for i in range(0, self.shape[0], _CHUNK):
                out[i:i + _CHUNK] = _dequant_rows(self.data[i:i + _CHUNK], self.scale[i:i + _CHUNK], dtype)
            return out
        return _dequant_rows(self.data, self.scale, dtype)

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The storage this weight views (for counting bytes once across stacked parts)."""
        return tuple(t._base if t._base is not None else t for t in (self.data, self.scale))


def plain(w: torch.Tensor | Fp8Weight, dtype: torch.dtype) -> torch.Tensor:
    """A weight as a plain tensor: an ``Fp8Weight`` dequantised to ``dtype``, any other tensor as it is."""
    return w.dequant(dtype) if isinstance(w, Fp8Weight) else w


def _block_rows(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """(..., ceil(R/128), ceil(C/128)) block scales -> (..., R, ceil(C/128)): each row's copy of its blocks' scales."""
    return scale.repeat_interleave(BLOCK, dim=-2)[..., :rows, :]


def _dequant_rows(q: torch.Tensor, row_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., R, C) FP8 values and (..., R, ceil(C/128)) per-row block scales -> (..., R, C) in ``dtype``."""
    s = row_scale.repeat_interleave(BLOCK, dim=-1)[..., :q.shape[-1]]
    return (q.float() * s).to(dtype)
