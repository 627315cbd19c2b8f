"""SFT + GRPO alignment pipeline for DeepSeek-V2-style (MLA + MoE) models."""

import os

# OpenMP threads that spin while waiting slow a busy CPU box down by orders of magnitude (trainer, rollout
# workers and reward sandboxes share the cores); sleeping waiters cost little when the box is idle. Must be set
# before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
