import math

import pytest
import torch

from lightning_rlhf.losses import PPOStats, ValueStats, clipped_value_loss, gae, ppo_policy_loss

F64 = torch.float64


def _policy_case():
    # four real tokens and one padding token, eps = 0.2
    # tok 0: ratio 1.5, A = +1: -1.5 vs clipped -1.2 -> -1.2 (clipped)
    # tok 1: ratio 0.5, A = +1: -0.5 vs clipped -0.8 -> -0.5
    # tok 2: ratio 0.5, A = -1:  0.5 vs clipped  0.8 ->  0.8 (clipped)
    # tok 3: ratio 1.5, A = -1:  1.5 vs clipped  1.2 ->  1.5
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.0]], dtype=F64)
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]], dtype=F64)
    logprobs = old + ratios.log()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    return logprobs, old, adv, mask


def test_ppo_policy_loss_golden():
    logprobs, old, adv, mask = _policy_case()
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    # (-1.2 - 0.5 + 0.8 + 1.5) / 4 = 0.15
    assert loss.item() == pytest.approx(0.15)
    assert isinstance(stats, PPOStats)
    assert stats.policy_loss.item() == pytest.approx(0.15)
    assert stats.clipfrac.item() == pytest.approx(0.5)  # tokens 0 and 2
    assert stats.ratio.item() == pytest.approx(1.0)  # (1.5 + 0.5 + 0.5 + 1.5) / 4
    # 0.5 * mean(log(1.5)^2, log(0.5)^2, log(0.5)^2, log(1.5)^2)
    expected_kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2
    assert stats.approx_kl.item() == pytest.approx(expected_kl)


def test_ppo_policy_loss_ignores_padding():
    logprobs, old, adv, mask = _policy_case()
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    logprobs[0, 4], old[0, 4], adv[0, 4] = 50.0, -50.0, 1e6
    loss2, stats2 = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    assert loss2.item() == pytest.approx(loss.item())
    for a, b in zip(stats, stats2):
        assert a.item() == pytest.approx(b.item())


def test_ppo_gradient_zero_on_clipped_tokens():
    logprobs, old, adv, mask = _policy_case()
    logprobs.requires_grad_()
    old.requires_grad_()
    adv.requires_grad_()
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    loss.backward()
    # old log-probabilities and advantages are constants
    assert old.grad is None and adv.grad is None
    # unclipped tokens: d/dlogp (-A * ratio) / 4 = -A * ratio / 4
    # tok 1: -1 * 0.5 / 4 = -0.125; tok 3: 1 * 1.5 / 4 = 0.375; clipped tokens and padding: 0
    expected = torch.tensor([[0.0, -0.125, 0.0, 0.375, 0.0]], dtype=F64)
    torch.testing.assert_close(logprobs.grad, expected)
    assert all(not s.requires_grad for s in stats)


def test_ppo_all_padded_row_is_ignored():
    logprobs, old, adv, mask = _policy_case()
    big = lambda x, fill: torch.cat([x, torch.full_like(x, fill)])  # noqa: E731
    loss, _ = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    loss2, stats2 = ppo_policy_loss(big(logprobs, 3.0), big(old, -3.0), big(adv, 100.0), big(mask, 0), clip_eps=0.2)
    assert loss2.item() == pytest.approx(loss.item())
    assert stats2.clipfrac.item() == pytest.approx(0.5)


def test_ppo_policy_loss_matches_loop():
    gen = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(3, 6, generator=gen, dtype=F64) * 2
    old = logprobs + torch.randn(3, 6, generator=gen, dtype=F64) * 0.3
    adv = torch.randn(3, 6, generator=gen, dtype=F64)
    mask = torch.rand(3, 6, generator=gen) > 0.3
    eps = 0.2
    total, clipped, n = 0.0, 0, 0
    for lp, o, a, m in zip(*(x.tolist() for x in (logprobs, old, adv, mask))):
        for lpi, oi, ai, mi in zip(lp, o, a, m):
            if not mi:
                continue
            r = math.exp(lpi - oi)
            u, c = -ai * r, -ai * min(max(r, 1 - eps), 1 + eps)
            total += max(u, c)
            clipped += c > u
            n += 1
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=eps)
    assert loss.item() == pytest.approx(total / n)
    assert stats.clipfrac.item() == pytest.approx(clipped / n)
    assert 0 < clipped < n  # the random case exercises both branches


def test_ppo_bad_inputs_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="same shape"):
        ppo_policy_loss(x, x, torch.zeros(2, 4), x, clip_eps=0.2)
    with pytest.raises(ValueError, match="same shape"):
        ppo_policy_loss(x[0], x[0], x[0], x[0], clip_eps=0.2)
    with pytest.raises(ValueError, match="clip_eps"):
        ppo_policy_loss(x, x, x, x, clip_eps=-0.1)


def _value_case():
    # eps = 0.5
    # tok 0: v=1, old=0, R=2: v_clip = 0.5, err = 1, err_clip = 2.25 -> 2.25 (clipped)
    # tok 1: v=3, old=0, R=0: v_clip = 0.5, err = 9, err_clip = 0.25 -> 9
    # tok 2: v=2, old=2, R=4: inside the range, err = err_clip = 4 -> 4
    # tok 3: padding
    values = torch.tensor([[1.0, 3.0, 2.0, 1e6]], dtype=F64)
    old = torch.tensor([[0.0, 0.0, 2.0, -1e6]], dtype=F64)
    returns = torch.tensor([[2.0, 0.0, 4.0, 1e6]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    return values, old, returns, mask


def test_clipped_value_loss_golden_and_gradient():
    values, old, returns, mask = _value_case()
    values.requires_grad_()
    old.requires_grad_()
    returns.requires_grad_()
    loss, stats = clipped_value_loss(values, old, returns, mask, clip_eps=0.5)
    # 0.5 * (2.25 + 9 + 4) / 3 = 2.541666...
    assert loss.item() == pytest.approx(0.5 * 15.25 / 3)
    assert isinstance(stats, ValueStats)
    assert stats.value_loss.item() == pytest.approx(0.5 * 15.25 / 3)
    assert stats.value_clipfrac.item() == pytest.approx(1 / 3)
    assert stats.values_mean.item() == pytest.approx(2.0)  # (1 + 3 + 2) / 3
    loss.backward()
    # tok 0 clipped -> 0; tok 1: 0.5 * 2 * (3 - 0) / 3 = 1; tok 2: 0.5 * 2 * (2 - 4) / 3 = -2/3
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 1.0, -2 / 3, 0.0]], dtype=F64))
    assert old.grad is None and returns.grad is None  # targets are constants
    assert all(not s.requires_grad for s in stats)


def test_clipped_value_loss_matches_loop():
    gen = torch.Generator().manual_seed(1)
    values, old, returns = (torch.randn(3, 5, generator=gen, dtype=F64) for _ in range(3))
    mask = torch.rand(3, 5, generator=gen) > 0.3
    eps = 0.3
    total, clipped, n = 0.0, 0, 0
    for v, o, r, m in zip(*(x.tolist() for x in (values, old, returns, mask))):
        for vi, oi, ri, mi in zip(v, o, r, m):
            if mi:
                vc = oi + min(max(vi - oi, -eps), eps)
                total += max((vi - ri) ** 2, (vc - ri) ** 2)
                clipped += (vc - ri) ** 2 > (vi - ri) ** 2
                n += 1
    loss, stats = clipped_value_loss(values, old, returns, mask, clip_eps=eps)
    assert loss.item() == pytest.approx(0.5 * total / n)
    assert stats.value_clipfrac.item() == pytest.approx(clipped / n)


def test_clipped_value_loss_bad_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        clipped_value_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 2), torch.ones(2, 3), 0.2)


def test_gae_hand_example():
    # gamma = 0.9, lam = 0.95, r = [1, 2], V = [0.5, 1.0], value after the end = 0
    # delta_1 = 2 + 0.9 * 0 - 1.0 = 1.0            -> A_1 = 1.0
    # delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4          -> A_0 = 1.4 + 0.9 * 0.95 * 1.0 = 2.255
    # returns = A + V = [2.755, 2.0]
    rewards = torch.tensor([[1.0, 2.0]], dtype=F64)
    values = torch.tensor([[0.5, 1.0]], dtype=F64)
    adv, ret = gae(rewards, values, torch.ones(1, 2), gamma=0.9, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[2.255, 1.0]], dtype=F64))
    torch.testing.assert_close(ret, torch.tensor([[2.755, 2.0]], dtype=F64))


def test_gae_lam0_is_td_error():
    # lam = 0: A_t = delta_t; r = [1, 2], V = [0.5, 1.0], gamma = 0.9 -> [1.4, 1.0]
    rewards = torch.tensor([[1.0, 2.0]], dtype=F64)
    values = torch.tensor([[0.5, 1.0]], dtype=F64)
    adv, _ = gae(rewards, values, torch.ones(1, 2), gamma=0.9, lam=0.0)
    torch.testing.assert_close(adv, torch.tensor([[1.4, 1.0]], dtype=F64))


def _padded_case(seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 3, 1, 0]
    t = 5
    mask = torch.tensor([[1] * n + [0] * (t - n) for n in lengths])
    rewards = torch.randn(4, t, generator=gen, dtype=F64)
    values = torch.randn(4, t, generator=gen, dtype=F64)
    return rewards, values, mask, lengths


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    rewards, values, mask, lengths = _padded_case(0)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    for i, n in enumerate(lengths):
        for j in range(rewards.shape[1]):
            to_go = sum(rewards[i, j:n].tolist()) if j < n else 0.0
            assert ret[i, j].item() == pytest.approx(to_go)
            assert adv[i, j].item() == pytest.approx(to_go - values[i, j].item() if j < n else 0.0)


def test_gae_matches_loop_and_padding_does_not_leak():
    rewards, values, mask, lengths = _padded_case(1)
    gamma, lam = 0.95, 0.9
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    for i, n in enumerate(lengths):
        r, v = rewards[i, :n].tolist(), values[i, :n].tolist()
        expected, running = [0.0] * rewards.shape[1], 0.0
        for j in reversed(range(n)):
            nxt = v[j + 1] if j + 1 < n else 0.0
            running = r[j] + gamma * nxt - v[j] + gamma * lam * running
            expected[j] = running
        torch.testing.assert_close(adv[i], torch.tensor(expected, dtype=F64))
        torch.testing.assert_close(ret[i, :n], adv[i, :n] + values[i, :n])
    # all-padded row is all zeros
    assert adv[3].abs().sum() == 0 and ret[3].abs().sum() == 0
    # poisoning padding changes nothing
    pad = ~mask.bool()
    adv2, ret2 = gae(rewards.masked_fill(pad, 1e30), values.masked_fill(pad, float("inf")), mask, gamma, lam)
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(ret2, ret)


def test_gae_outputs_do_not_require_grad():
    rewards, values, mask, _ = _padded_case(2)
    rewards.requires_grad_()
    values.requires_grad_()
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_bad_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 1.0, 0.95)
