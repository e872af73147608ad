"""Bradley-Terry loss for reward models trained on preference pairs.

Notation: ``b`` preference pairs.

Source: Ouyang et al. 2022 ("Training language models to follow instructions
with human feedback"), eq. 1, as used by Stiennon et al. 2020 for TL;DR and by
the Asynchronous RLHF paper's reward models: ``loss = -log sigmoid(r_c - r_r)``.
Deviations: none; pairs are averaged, not grouped per prompt.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class RewardStats(NamedTuple):
    accuracy: torch.Tensor  # fraction of pairs with r_c > r_r
    margin: torch.Tensor  # mean r_c - r_r


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> tuple[torch.Tensor, RewardStats]:
    """Mean of ``-logsigmoid(chosen - rejected)``.

    Args:
        chosen_scores: (b,) scores of the preferred completions.
        rejected_scores: (b,) scores of the other completions.

    Raises:
        ValueError: If the shapes differ.
    """
    if chosen_scores.shape != rejected_scores.shape:
        raise ValueError(
            f"chosen_scores {tuple(chosen_scores.shape)} and rejected_scores {tuple(rejected_scores.shape)} "
            "must have the same shape."
        )
    margin = chosen_scores - rejected_scores  # (b,)
    loss = -F.logsigmoid(margin).mean()
    return loss, RewardStats(accuracy=(margin > 0).float().mean().detach(), margin=margin.mean().detach())
