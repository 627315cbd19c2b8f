"""Set before anything imports Triton (transformers does): without a GPU, Triton kernels run on its CPU
interpreter, which reads TRITON_INTERPRET when triton.language is first imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
