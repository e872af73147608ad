"""Win rate of policy completions against reference completions, judged by a gold reward."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class GoldWinRate(Metric):
    """Fraction of prompts where the policy's completion beats the reference's; a tie counts one half.

    This is the paper's headline metric (Noukhovitch et al. 2025, Sec. 3:
    "win-rate ... against the human-written reference summaries", judged by
    the gold reward model).
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("wins", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, policy_scores: torch.Tensor, reference_scores: torch.Tensor) -> None:
        if policy_scores.shape != reference_scores.shape:
            raise ValueError(
                f"policy_scores {tuple(policy_scores.shape)} and reference_scores {tuple(reference_scores.shape)} "
                "must have the same shape."
            )
        self.wins += (policy_scores > reference_scores).sum() + 0.5 * (policy_scores == reference_scores).sum()
        self.total += policy_scores.numel()

    def compute(self) -> torch.Tensor:
        return self.wins / self.total.clamp(min=1)
