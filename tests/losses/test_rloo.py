import pytest
import torch

from lightning_rlhf.losses import rloo_advantages


def test_rloo_golden():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    # row 0: 1 - (2+3)/2 = -1.5, 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5
    # row 1: 0 - (0+6)/2 = -3, 0 - 3 = -3, 6 - 0 = 6
    expected = torch.tensor([[-1.5, 0.0, 1.5], [-3.0, -3.0, 6.0]])
    torch.testing.assert_close(rloo_advantages(rewards), expected)


def test_rloo_k2_is_pairwise_difference():
    rewards = torch.tensor([[0.3, -1.2], [5.0, 2.0]])
    expected = torch.tensor([[1.5, -1.5], [3.0, -3.0]])
    torch.testing.assert_close(rloo_advantages(rewards), expected)


def test_rloo_matches_loop():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    expected = []
    for row in rewards.tolist():
        out = []
        for j, r in enumerate(row):
            others = [x for i, x in enumerate(row) if i != j]
            out.append(r - sum(others) / len(others))
        expected.append(out)
    adv = rloo_advantages(rewards)
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))
    # each row sums to zero
    torch.testing.assert_close(adv.sum(1), torch.zeros(5, dtype=torch.float64))


def test_rloo_constant_row_gives_zero():
    torch.testing.assert_close(rloo_advantages(torch.full((2, 3), 7.0)), torch.zeros(2, 3))


def test_rloo_k1_raises():
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.ones(4, 1))


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4)])
def test_rloo_bad_ndim_raises(shape):
    with pytest.raises(ValueError, match=r"\(b, k\)"):
        rloo_advantages(torch.ones(shape))
