"""DeepSeek-V2's expert- and device-level balance terms: values, masking, gradient, and that they spread the load."""

import pytest
import torch

from align.expert_balance import MoESection, balance_loss, balance_terms


def test_uniform_load_scores_one_and_concentrated_load_more():
    n, experts = 16, 8
    uniform_ids = torch.arange(n * 2).view(n, 2) % experts               # every expert picked 4 times
    expert, device = balance_terms(torch.zeros(n, experts), uniform_ids, None, devices=2)
    assert expert.item() == pytest.approx(1.0) and device.item() == pytest.approx(1.0)
    skewed = torch.zeros(n, experts)
    skewed[:, :2] = 4.0                                                  # the router prefers experts 0 and 1 ...
    stuck_ids = torch.tensor([[0, 1]]).repeat(n, 1)                      # ... and every token goes there
    expert, device = balance_terms(skewed, stuck_ids, None, devices=2)
    probs = torch.softmax(skewed[0], -1)
    assert expert.item() == pytest.approx(4 * probs[:2].sum().item())    # f = 4 on two experts, 0 elsewhere
    assert device.item() == pytest.approx(2 * probs[:4].sum().item())    # all the load on device 0: f'_0 = 2


def test_mask_keeps_only_the_tokens_that_count():
    experts = 4
    ids = torch.tensor([[0, 1], [2, 3], [0, 1], [0, 1]])
    mask = torch.tensor([1, 1, 0, 0])                                    # the two skewed rows are padding
    expert, _ = balance_terms(torch.zeros(4, experts), ids, mask)
    assert expert.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mask covers 3 tokens, the router 4"):
        balance_terms(torch.zeros(4, experts), ids, mask[:3])
    with pytest.raises(ValueError, match="4 routed experts do not split into 3 device groups"):
        balance_terms(torch.zeros(4, experts), ids, None, devices=3)


def test_loss_weights_sum_over_layers_and_only_scores_carry_gradient():
    cfg = MoESection(expert_balance=0.01, device_balance=0.1, devices=2)
    torch.manual_seed(0)
    logits = [torch.randn(10, 8, requires_grad=True) for _ in range(3)]
    captured = [(lg, lg.topk(2, dim=-1).indices) for lg in logits]
    loss, stats = balance_loss(captured, None, cfg)
    terms = [balance_terms(lg, ids, None, 2) for lg, ids in captured]
    assert loss.item() == pytest.approx(sum(0.01 * e.item() + 0.1 * d.item() for e, d in terms), rel=1e-6)
    assert stats["moe/expert_balance"] == pytest.approx(sum(e.item() for e, _ in terms) / 3, rel=1e-6)
    assert "moe/device_balance" in stats
    loss.backward()
    assert all(lg.grad is not None and lg.grad.abs().sum() > 0 for lg in logits)
    with pytest.raises(RuntimeError, match="no router outputs were captured"):
        balance_loss([], None, cfg)
    with pytest.raises(RuntimeError, match="use_reentrant: false"):
        balance_loss([(lg.detach(), ids) for lg, ids in captured], None, cfg)


def test_minimising_the_term_spreads_a_collapsed_router():
    torch.manual_seed(0)
    tokens = torch.randn(256, 16)
    router = torch.nn.Linear(16, 8)
    with torch.no_grad():
        router.bias.zero_()
        router.bias[:2] = 3.0                                            # experts 0 and 1 win almost every token
    cfg = MoESection(expert_balance=1.0)
    opt = torch.optim.SGD(router.parameters(), lr=0.5)

    def load_entropy() -> float:
        ids = router(tokens).topk(2, dim=-1).indices
        share = torch.bincount(ids.reshape(-1), minlength=8).float() / ids.numel()
        return float(-(share[share > 0] * share[share > 0].log()).sum())

    before = load_entropy()
    assert before < 1.0
    for _ in range(60):
        logits = router(tokens)
        loss, _ = balance_loss([(logits, logits.topk(2, dim=-1).indices)], None, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert load_entropy() > 2.0                                          # ln 8 = 2.08: close to uniform


def test_section_rejects_bad_settings():
    assert not MoESection().balancing and MoESection(expert_balance=0.003).balancing
    with pytest.raises(ValueError, match=">= 0"):
        MoESection(expert_balance=-1.0)
    with pytest.raises(ValueError, match="devices >= 2"):
        MoESection(device_balance=0.05)
    with pytest.raises(ValueError, match="devices must be >= 1"):
        MoESection(devices=0)
