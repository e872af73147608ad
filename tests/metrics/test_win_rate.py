"""GoldWinRate: wins, ties as halves, accumulated over updates and summed over ranks."""

import pytest
import torch

from lightning_rlhf.metrics import GoldWinRate


def test_a_tie_counts_half_a_win():
    metric = GoldWinRate()
    metric.update(torch.tensor([2.0, 1.0, 0.5, 3.0]), torch.tensor([1.0, 1.0, 0.7, 3.0]))  # win, tie, loss, tie
    assert metric.compute().item() == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)


def test_updates_accumulate_prompt_by_prompt_not_batch_by_batch():
    metric = GoldWinRate()
    metric.update(torch.tensor([1.0]), torch.tensor([0.0]))  # 1 win of 1
    metric.update(torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 2.0]))  # a tie of 3: 0.5
    # (1 + 0.5) / 4 prompts = 0.375; the mean of the batches' rates would be (1 + 1/6) / 2 = 0.583
    assert metric.compute().item() == pytest.approx(0.375)
    metric.reset()
    with pytest.warns(UserWarning, match="called before the ``update``"):
        assert metric.compute().item() == 0.0  # nothing judged yet: no division by zero


def test_the_win_rate_matches_a_plain_count_and_sums_across_ranks():
    generator = torch.Generator().manual_seed(0)
    policy = torch.randint(0, 4, (50,), generator=generator).float()  # small integers: many ties
    reference = torch.randint(0, 4, (50,), generator=generator).float()
    wins = sum(1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy.tolist(), reference.tolist()))
    whole = GoldWinRate()
    whole.update(policy, reference)
    assert whole.compute().item() == pytest.approx(wins / 50)
    # two ranks with 20 and 30 prompts: their states are sums, so adding them (dist_reduce_fx) gives the whole's
    ranks = [GoldWinRate(), GoldWinRate()]
    ranks[0].update(policy[:20], reference[:20])
    ranks[1].update(policy[20:], reference[20:])
    assert (ranks[0].wins + ranks[1].wins) / (ranks[0].total + ranks[1].total) == pytest.approx(wins / 50)


def test_scores_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match=r"policy_scores \(3,\) and reference_scores \(2,\) must have the same shape"):
        GoldWinRate().update(torch.zeros(3), torch.zeros(2))
