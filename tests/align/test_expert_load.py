"""Expert-load health from rollout routing: counts, per-layer entropy and shares, the low-entropy warning."""

import logging
from types import SimpleNamespace

import pytest
import torch

from align.expert_load import add_loads, expert_load, health_metrics, load_health


def _records(*routings):
    return [SimpleNamespace(completions=[SimpleNamespace(routing=r) for r in routings])]


def test_counts_per_layer_cover_every_expert():
    # Two MoE layers, top-2 of 4 experts; expert 3 is never chosen but still has a column.
    a = torch.tensor([[[0, 1], [0, 2]], [[0, 1], [1, 2]]], dtype=torch.int16)     # (T=2, L=2, k=2)
    b = torch.tensor([[[0, 2], [2, 1]]], dtype=torch.int16)
    assert expert_load(_records(a, b, None), n_experts=4) == [[3, 2, 1, 0], [1, 2, 3, 0]]
    assert expert_load(_records(None)) is None
    assert add_loads([[1, 2]], [[1, 0, 5]]) == [[2, 2, 5]] and add_loads(None, [[1]]) == [[1]]


def test_health_numbers_and_warning(caplog):
    skewed = load_health([97, 1, 1, 1])
    assert skewed["max_share"] == pytest.approx(0.97) and skewed["min_share"] == pytest.approx(0.01)
    assert skewed["imbalance"] == pytest.approx(3.88) and 0 < skewed["load_entropy"] < 0.2
    assert load_health([1, 1, 1, 1])["load_entropy"] == pytest.approx(1.0)
    with caplog.at_level(logging.WARNING):
        out = health_metrics([[25, 25, 25, 25], [97, 1, 1, 1]], min_entropy=0.5, step=7)
    assert out["experts/layer0_load_entropy"] == pytest.approx(1.0)
    assert set(out) == {f"experts/layer{i}_{k}" for i in (0, 1)
                        for k in ("load_entropy", "max_share", "min_share", "imbalance")}
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "layer 1" in warned[0] and "step 7" in warned[0]
    caplog.clear()
    health_metrics([[97, 1, 1, 1]], min_entropy=0.0)
    assert not caplog.records
