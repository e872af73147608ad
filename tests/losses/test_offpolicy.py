"""Truncated importance weights: golden values by hand, the sequence form, no gradient, and the weighted PPO loss."""

import math

import pytest
import torch

from lightning_rlhf.losses import ISStats, ppo_policy_loss, truncated_importance_weights

F64 = torch.float64


def _case():
    # pi_old / pi_behaviour per token: 2.0, 0.5, 4.0 | 1.0, 3.0, (padding)
    ratios = torch.tensor([[2.0, 0.5, 4.0], [1.0, 3.0, 1.0]], dtype=F64)
    behavior = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -9.0]], dtype=F64)
    old = behavior + ratios.log()
    old[1, 2] = 30.0  # padding: a wild value that must not count
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return old, behavior, mask


def test_token_weights_golden():
    old, behavior, mask = _case()
    weights, stats = truncated_importance_weights(old, behavior, mask, cap=2.5, level="token")
    # min(ratio, 2.5): 2.0, 0.5, 2.5 | 1.0, 2.5, 0 (padding)
    expected = torch.tensor([[2.0, 0.5, 2.5], [1.0, 2.5, 0.0]], dtype=torch.float32)
    torch.testing.assert_close(weights, expected)
    assert isinstance(stats, ISStats)
    assert stats.ratio_mean.item() == pytest.approx((2.0 + 0.5 + 4.0 + 1.0 + 3.0) / 5)
    assert stats.clipfrac.item() == pytest.approx(2 / 5)  # 4.0 and 3.0
    assert stats.ratio_max.item() == pytest.approx(4.0)


def test_sequence_weights_are_the_truncated_product():
    old, behavior, mask = _case()
    weights, stats = truncated_importance_weights(old, behavior, mask, cap=2.5, level="sequence")
    # products: 2 * 0.5 * 4 = 4.0 -> 2.5 (truncated); 1 * 3 = 3.0 -> 2.5
    torch.testing.assert_close(weights, torch.tensor([[2.5], [2.5]]))
    assert stats.ratio_mean.item() == pytest.approx(3.5)
    assert stats.clipfrac.item() == pytest.approx(1.0)
    weights, stats = truncated_importance_weights(old, behavior, mask, cap=10.0, level="sequence")
    torch.testing.assert_close(weights, torch.tensor([[4.0], [3.0]]))
    assert stats.clipfrac.item() == 0.0


def test_on_policy_weights_are_one():
    behavior = torch.randn(4, 6)
    mask = torch.ones(4, 6)
    weights, stats = truncated_importance_weights(behavior.clone(), behavior, mask, cap=2.0)
    torch.testing.assert_close(weights, torch.ones(4, 6))
    assert stats.ratio_mean.item() == pytest.approx(1.0) and stats.clipfrac.item() == 0.0


def test_huge_sequence_ratio_does_not_overflow():
    old = torch.full((1, 200), 0.0)
    behavior = torch.full((1, 200), -5.0)  # log ratio 1000 in all
    weights, stats = truncated_importance_weights(old, behavior, torch.ones(1, 200), cap=2.0, level="sequence")
    assert weights.item() == pytest.approx(2.0)
    assert math.isfinite(stats.ratio_mean.item())


def test_weights_carry_no_gradient():
    old, behavior, mask = _case()
    old.requires_grad_()
    weights, _ = truncated_importance_weights(old, behavior, mask, cap=2.5)
    assert not weights.requires_grad


def test_bad_arguments_are_refused():
    old, behavior, mask = _case()
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_importance_weights(old, behavior, mask, cap=0.0)
    with pytest.raises(ValueError, match="level must be one of"):
        truncated_importance_weights(old, behavior, mask, cap=2.0, level="prompt")
    with pytest.raises(ValueError, match="same shape"):
        truncated_importance_weights(old, behavior[:, :2], mask, cap=2.0)


def test_ppo_loss_weighted_golden():
    # two tokens, eps 0.2: tok 0 ratio 1.5, A +1 -> clipped -1.2; tok 1 ratio 0.5, A +1 -> -0.5
    old = torch.tensor([[-1.0, -2.0]], dtype=F64)
    logprobs = old + torch.tensor([[1.5, 0.5]], dtype=F64).log()
    adv = torch.ones(1, 2, dtype=F64)
    mask = torch.ones(1, 2)
    unweighted, _ = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    assert unweighted.item() == pytest.approx((-1.2 - 0.5) / 2)
    weights = torch.tensor([[2.0, 0.5]], dtype=F64)
    loss, _ = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2, weights=weights)
    # after the clip: (2 * -1.2 + 0.5 * -0.5) / 2 real tokens
    assert loss.item() == pytest.approx((2 * -1.2 + 0.5 * -0.5) / 2)
    # a (b, 1) sequence weight scales every token of its row
    loss, _ = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2, weights=torch.tensor([[3.0]], dtype=F64))
    assert loss.item() == pytest.approx(3 * unweighted.item())


def test_ppo_loss_weighted_gradient():
    # unclipped token 1 (ratio 0.5, A +1): d loss / d logp = -w * ratio / n = -0.5 * 0.5 / 2
    old = torch.tensor([[-1.0, -2.0]], dtype=F64)
    logprobs = (old + torch.tensor([[1.5, 0.5]], dtype=F64).log()).requires_grad_()
    weights = torch.tensor([[2.0, 0.5]], dtype=F64, requires_grad=True)
    loss, _ = ppo_policy_loss(logprobs, old, torch.ones(1, 2, dtype=F64), torch.ones(1, 2), 0.2, weights=weights)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.125]], dtype=F64))
    assert weights.grad is None  # the weights are constants
