import math

import pytest
import torch

from lightning_rlhf.losses import DPOStats, online_dpo_loss, online_ipo_loss


def _t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_dpo_golden():
    # beta = 0.5, chosen = -1, rejected = -3, refs = -2, -2
    # h = (-1 - -3) - (-2 - -2) = 2, beta * h = 1, loss = -logsigmoid(1) = log(1 + e^-1)
    loss, stats = online_dpo_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))  # 0.31326...
    assert isinstance(stats, DPOStats)
    # implicit rewards: 0.5 * (-1 + 2) = 0.5 and 0.5 * (-3 + 2) = -0.5, margin 1
    torch.testing.assert_close(stats.chosen_rewards, _t(0.5))
    torch.testing.assert_close(stats.rejected_rewards, _t(-0.5))
    torch.testing.assert_close(stats.reward_margin, _t(1.0))
    torch.testing.assert_close(stats.logits, _t(2.0))
    assert stats.accuracy.item() == 1.0


def test_ipo_golden():
    # same inputs: h = 2, target 1 / (2 * 0.5) = 1, loss = (2 - 1)^2 = 1
    loss, stats = online_ipo_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), beta=0.5)
    assert loss.item() == pytest.approx(1.0)
    torch.testing.assert_close(stats.reward_margin, _t(1.0))
    # beta = 0.25: target 1 / 0.5 = 2 = h, loss 0
    loss, _ = online_ipo_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), beta=0.25)
    assert loss.item() == pytest.approx(0.0)
    # beta = 1: target 0.5, loss (2 - 0.5)^2 = 2.25
    loss, _ = online_ipo_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), beta=1.0)
    assert loss.item() == pytest.approx(2.25)


def _random_inputs(seed, b=6):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, generator=gen, dtype=torch.float64) * 3 - 10 for _ in range(4)]


def test_dpo_and_ipo_match_loops():
    inputs = _random_inputs(0)
    beta = 0.3
    rows = list(zip(*(x.tolist() for x in inputs)))
    dpo, ipo, acc = 0.0, 0.0, 0
    for c, r, rc, rr in rows:
        h = (c - r) - (rc - rr)
        dpo += math.log(1 + math.exp(-beta * h))
        ipo += (h - 1 / (2 * beta)) ** 2
        acc += beta * (c - rc) > beta * (r - rr)
    loss, stats = online_dpo_loss(*inputs, beta=beta)
    assert loss.item() == pytest.approx(dpo / len(rows))
    assert stats.accuracy.item() == pytest.approx(acc / len(rows))
    loss, stats = online_ipo_loss(*inputs, beta=beta)
    assert loss.item() == pytest.approx(ipo / len(rows))


def test_accuracy_is_fraction_of_correct_pairs():
    # margins h: +1, -1, +2, 0 -> chosen reward > rejected reward for 2 of 4 (0 is not >)
    chosen = _t(1.0, -1.0, 2.0, 0.0)
    zeros = torch.zeros(4, dtype=torch.float64)
    _, stats = online_dpo_loss(chosen, zeros, zeros, zeros, beta=0.1)
    assert stats.accuracy.item() == pytest.approx(0.5)
    assert stats.accuracy.ndim == 0


def test_dpo_gradient_and_detached_stats():
    chosen = _t(-1.0).requires_grad_()
    rejected = _t(-3.0).requires_grad_()
    loss, stats = online_dpo_loss(chosen, rejected, _t(-2.0), _t(-2.0), beta=0.5)
    loss.backward()
    # d/dchosen -logsigmoid(beta h) = -beta * sigmoid(-beta h) = -0.5 * sigmoid(-1)
    expected = -0.5 / (1 + math.e)
    assert chosen.grad.item() == pytest.approx(expected)
    assert rejected.grad.item() == pytest.approx(-expected)
    assert all(not s.requires_grad for s in stats)


def test_ipo_gradient_and_detached_stats():
    chosen = _t(-1.0).requires_grad_()
    loss, stats = online_ipo_loss(chosen, _t(-3.0), _t(-2.0), _t(-2.0), beta=1.0)
    loss.backward()
    # d/dchosen (h - 0.5)^2 = 2 * (2 - 0.5) = 3
    assert chosen.grad.item() == pytest.approx(3.0)
    assert all(not s.requires_grad for s in stats)


@pytest.mark.parametrize("loss_fn", [online_dpo_loss, online_ipo_loss])
@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_nonpositive_beta_raises(loss_fn, beta):
    with pytest.raises(ValueError, match="beta"):
        loss_fn(*_random_inputs(1), beta=beta)


@pytest.mark.parametrize("loss_fn", [online_dpo_loss, online_ipo_loss])
def test_bad_shapes_raise(loss_fn):
    c, r, rc, rr = _random_inputs(2)
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(c, r[:-1], rc, rr, beta=0.1)
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(c[:, None], r[:, None], rc[:, None], rr[:, None], beta=0.1)
