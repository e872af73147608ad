import math

import pytest
import torch

from lightning_rlhf.losses import kl_k1, kl_k3, kl_penalized_rewards

F64 = torch.float64


def test_kl_estimators_golden():
    # pi(x) = 0.5, pi_ref(x) = 0.25: k1 = log 0.5 - log 0.25 = log 2
    # log r = log 0.25 - log 0.5 = -log 2, k3 = r - log r - 1 = 0.5 + log 2 - 1 = 0.19314...
    logprobs = torch.tensor([math.log(0.5)], dtype=F64)
    ref = torch.tensor([math.log(0.25)], dtype=F64)
    assert kl_k1(logprobs, ref).item() == pytest.approx(math.log(2))
    assert kl_k3(logprobs, ref).item() == pytest.approx(math.log(2) - 0.5)


def test_kl_k3_matches_formula_and_is_nonnegative():
    gen = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(100, generator=gen, dtype=F64) * 5
    ref = -torch.rand(100, generator=gen, dtype=F64) * 5
    k3 = kl_k3(logprobs, ref)
    expected = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logprobs.tolist(), ref.tolist())]
    torch.testing.assert_close(k3, torch.tensor(expected, dtype=F64))
    assert (k3 >= 0).all()
    assert (kl_k1(logprobs, ref) < 0).any()  # k1 can be negative per token; k3 cannot
    assert kl_k3(logprobs, logprobs).abs().max() == 0


def _shaping_case():
    # k1 per token: [[0.1, 0.2, 0.3], [0.4, 0.5, pad]]
    ref = torch.tensor([[-1.0, -2.0, -3.0], [-1.5, -0.5, 0.0]], dtype=F64)
    logprobs = ref + torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([1.0, 2.0], dtype=F64)
    return scores, logprobs, ref, mask


def test_kl_penalized_rewards_golden():
    scores, logprobs, ref, mask = _shaping_case()
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.5)
    # rewards = -0.5 * kl, plus score at the last real token (index 2 in row 0, index 1 in row 1)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.2, -0.25 + 2.0, 0.0]], dtype=F64)
    torch.testing.assert_close(rewards, expected)
    torch.testing.assert_close(kl, torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.0]], dtype=F64))


def test_kl_penalized_rewards_ignores_padding_and_all_padded_row():
    scores, logprobs, ref, mask = _shaping_case()
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.5)
    logprobs[1, 2], ref[1, 2] = 1e30, -float("inf")
    rewards2, kl2 = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards2, rewards)
    torch.testing.assert_close(kl2, kl)
    # a row with no real token gets neither KL nor score
    mask[1] = 0
    rewards3, kl3 = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards3[0], rewards[0])
    assert rewards3[1].abs().sum() == 0 and kl3[1].abs().sum() == 0


def test_kl_penalized_rewards_k3():
    scores, logprobs, ref, mask = _shaping_case()
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.1, estimator="k3")
    expected_kl = kl_k3(logprobs, ref) * mask
    torch.testing.assert_close(kl, expected_kl)
    expected = -0.1 * expected_kl
    expected[0, 2] += 1.0
    expected[1, 1] += 2.0
    torch.testing.assert_close(rewards, expected)


def test_kl_penalized_rewards_matches_loop():
    gen = torch.Generator().manual_seed(1)
    b, t = 4, 6
    lengths = [6, 4, 1, 2]
    mask = torch.tensor([[1] * n + [0] * (t - n) for n in lengths])
    logprobs = -torch.rand(b, t, generator=gen, dtype=F64) * 3
    ref = -torch.rand(b, t, generator=gen, dtype=F64) * 3
    scores = torch.randn(b, generator=gen, dtype=F64)
    coef = 0.2
    rewards, _ = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=coef)
    for i, n in enumerate(lengths):
        for j in range(t):
            expected = 0.0
            if j < n:
                expected = -coef * (logprobs[i, j].item() - ref[i, j].item())
                if j == n - 1:
                    expected += scores[i].item()
            assert rewards[i, j].item() == pytest.approx(expected)


def test_kl_penalized_rewards_bad_inputs_raise():
    scores, logprobs, ref, mask = _shaping_case()
    with pytest.raises(ValueError, match="'k1', 'k3'"):
        kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.1, estimator="k2")
    with pytest.raises(ValueError, match="same shape"):
        kl_penalized_rewards(scores, logprobs, ref[:, :2], mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="one score per response"):
        kl_penalized_rewards(scores[:1], logprobs, ref, mask, kl_coef=0.1)
