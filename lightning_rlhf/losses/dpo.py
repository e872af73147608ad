"""Online DPO and IPO losses on sequence log-probabilities.

Notation:
    b: batch size (number of prompts, each with one chosen and one rejected
        completion sampled from the current or a recent policy).
    h: the log-ratio margin
        ``(chosen - rejected) - (ref_chosen - ref_rejected)``, shape (b,).

Source:
    - Rafailov et al. 2023, "Direct Preference Optimization", eq. 7:
      ``-log sigmoid(beta * h)``.
    - Azar et al. 2024, "A General Theoretical Paradigm to Understand Learning
      from Human Preferences" (IPO), eq. 17: ``(h - 1 / (2 * beta)) ** 2``.
    - Used online (completions sampled from the policy, labelled by a reward
      model) as in Noukhovitch et al. 2025, "Asynchronous RLHF" (ICLR 2025),
      reference code github.com/mnoukhov/async_rlhf (a fork of TRL 0.11,
      ``OnlineDPOTrainer``), where the log-probabilities are summed over
      response tokens.

Deviations:
    - TRL averages log-probabilities over response tokens for IPO; here both
      losses take whatever the caller passes (sums by default), so IPO with
      averaged log-probabilities means passing averages.
    - ``DPOStats.logits`` is ``h`` without ``beta``, as TRL logs it; the
      implicit rewards and their margin include ``beta``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class DPOStats(NamedTuple):
    """Detached diagnostics of a DPO/IPO step.

    Attributes:
        chosen_rewards: Implicit rewards ``beta * (chosen - ref_chosen)``, (b,).
        rejected_rewards: Implicit rewards ``beta * (rejected - ref_rejected)``, (b,).
        reward_margin: ``chosen_rewards - rejected_rewards``, (b,).
        accuracy: Scalar fraction of pairs with ``chosen_rewards > rejected_rewards``.
        logits: The log-ratio margin ``h`` (without ``beta``), (b,).
    """

    chosen_rewards: Tensor
    rejected_rewards: Tensor
    reward_margin: Tensor
    accuracy: Tensor
    logits: Tensor


def _margin_and_stats(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, DPOStats]:
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}; pass a positive beta.")
    shapes = {tuple(x.shape) for x in (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1 or chosen_logps.ndim != 1:
        raise ValueError(
            f"expected four log-probability tensors of the same shape (b,), got shapes {sorted(shapes)}; "
            "sum (or average) token log-probabilities per sequence before calling."
        )
    h = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # (b,)
    with torch.no_grad():
        chosen_rewards = beta * (chosen_logps - ref_chosen_logps)  # (b,)
        rejected_rewards = beta * (rejected_logps - ref_rejected_logps)  # (b,)
        stats = DPOStats(
            chosen_rewards=chosen_rewards,
            rejected_rewards=rejected_rewards,
            reward_margin=chosen_rewards - rejected_rewards,
            accuracy=(chosen_rewards > rejected_rewards).float().mean(),
            logits=h.detach(),
        )
    return h, stats


def online_dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, DPOStats]:
    """DPO loss ``mean(-log sigmoid(beta * h))`` (Rafailov et al. 2023, eq. 7).

    Args:
        chosen_logps: Policy log-probabilities of the chosen completions, (b,).
        rejected_logps: Policy log-probabilities of the rejected completions, (b,).
        ref_chosen_logps: Reference-model log-probabilities of the chosen
            completions, (b,).
        ref_rejected_logps: Reference-model log-probabilities of the rejected
            completions, (b,).
        beta: Strength of the implicit KL constraint; larger stays closer to
            the reference.

    Returns:
        ``(loss, stats)``: the scalar mean loss and detached ``DPOStats``.

    Raises:
        ValueError: If ``beta <= 0`` or the inputs are not all of shape (b,).
    """
    h, stats = _margin_and_stats(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    loss = -F.logsigmoid(beta * h).mean()
    return loss, stats


def online_ipo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, DPOStats]:
    """IPO loss ``mean((h - 1 / (2 * beta)) ** 2)`` (Azar et al. 2024, eq. 17).

    ``beta`` plays the role of the paper's regularisation ``tau``.

    Args:
        chosen_logps: Policy log-probabilities of the chosen completions, (b,).
        rejected_logps: Policy log-probabilities of the rejected completions, (b,).
        ref_chosen_logps: Reference-model log-probabilities of the chosen
            completions, (b,).
        ref_rejected_logps: Reference-model log-probabilities of the rejected
            completions, (b,).
        beta: Regularisation strength; the target margin is ``1 / (2 * beta)``.

    Returns:
        ``(loss, stats)``: the scalar mean loss and detached ``DPOStats``.

    Raises:
        ValueError: If ``beta <= 0`` or the inputs are not all of shape (b,).
    """
    h, stats = _margin_and_stats(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    loss = ((h - 1 / (2 * beta)) ** 2).mean()
    return loss, stats
