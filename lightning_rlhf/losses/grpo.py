"""GRPO: group-normalized advantages and the clipped token loss with its three aggregations.

Notation:
    b: number of responses (``n`` prompts times ``k`` samples, prompt-major).
    k: samples per prompt (the group).
    t: response length in tokens, right-padded; ``mask`` is 1 on real tokens.

Sources:
    - Shao et al. 2024, "DeepSeekMath" (GRPO), eq. 3 and Sec. 4.1.2: the advantage of every token of
      sample ``i`` is ``(r_i - mean(r)) / std(r)`` over the group; the clipped ratio of PPO; the KL to
      the reference as a loss term with the ``k3`` estimator ``pi_ref/pi - log(pi_ref/pi) - 1``; the
      loss averaged over the tokens of each response, then over responses (``"sequence_mean"``).
    - Yu et al. 2025, "DAPO", eq. 8: one mean over all tokens of the batch (``"token_mean"``).
    - Liu et al. 2025, "Understanding R1-Zero-Like Training" (Dr. GRPO), Sec. 3.1: no division by the
      group's std (``scale_rewards=False``) and no division by each response's length; the token sum
      divided by a constant, the batch size times the largest response length (``"sequence_sum_constant"``).
    - TRL's ``GRPOTrainer`` (``trl/trainer/grpo_trainer.py``: ``_compute_advantages``, ``_compute_loss``):
      the unbiased std of the group (``Tensor.std``) plus ``eps = 1e-4``, and the three reductions
      (``loss_type`` ``"grpo"``, ``"dapo"``/``"bnpo"``, ``"dr_grpo"``), which the tests check against.

Deviations:
    - ``"token_mean"`` divides by the real tokens of the batch given (TRL's ``"bnpo"``); TRL's ``"dapo"``
      divides by the tokens of the whole gradient-accumulated batch. The module weights its micro-batches
      so that a mini-batch's step is the single pass's, which is the same thing.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .kl import kl_k3

AGGREGATIONS = ("sequence_mean", "token_mean", "sequence_sum_constant")
Aggregation = Literal["sequence_mean", "token_mean", "sequence_sum_constant"]


class GRPOStats(NamedTuple):
    """Detached diagnostics of a GRPO step (scalars, masked means over real tokens).

    Attributes:
        clipfrac: Fraction of tokens where the clipped term was selected.
        approx_kl: Mean of ``0.5 * (logprobs - old_logprobs) ** 2``.
        ratio: Mean probability ratio to the old policy.
        kl: Mean ``k3`` KL to the reference (0 without a reference).
    """

    clipfrac: Tensor
    approx_kl: Tensor
    ratio: Tensor
    kl: Tensor


def group_advantages(rewards: Tensor, scale_rewards: bool = True, eps: float = 1e-4) -> Tensor:
    """``(r - mean_group) / (std_group + eps)`` per prompt; ``scale_rewards=False``: ``r - mean_group`` (Dr. GRPO).

    Args:
        rewards: Sequence rewards (b / k, k), row ``i`` holding the ``k`` samples of prompt ``i``.
        scale_rewards: Divide by the group's (unbiased) standard deviation.
        eps: Added to the standard deviation, so a group of equal rewards gets advantages 0.

    Returns:
        Advantages shaped like ``rewards``.

    Raises:
        ValueError: If ``rewards`` is not 2-D or ``k < 2``.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(
            f"rewards must have shape (b, k) with k >= 2 samples of one prompt per row, got {tuple(rewards.shape)}."
        )
    centred = rewards - rewards.mean(1, keepdim=True)  # (b, k)
    return centred / (rewards.std(1, keepdim=True) + eps) if scale_rewards else centred


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    aggregation: Aggregation = "sequence_mean",
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    weights: Tensor | None = None,
    max_tokens: int | None = None,
) -> tuple[Tensor, GRPOStats]:
    """The clipped GRPO loss of a batch of responses, aggregated as ``aggregation`` says.

    Per token: ``w * max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) + kl_coef * k3(pi, pi_ref)``, with
    ``ratio = exp(logprobs - old_logprobs)`` and ``w`` the (constant) truncated importance weight, 1 without.

    Args:
        logprobs: Policy log-probabilities of the response tokens, with gradient, (b, t).
        old_logprobs: The same under the weights the ratio is taken to (old or behaviour policy), (b, t).
        advantages: One advantage per response, (b,), given to each of its tokens.
        mask: 1 on real tokens, (b, t).
        clip_eps: Clipping range of the ratio.
        aggregation: ``"sequence_mean"`` (GRPO), ``"token_mean"`` (DAPO) or ``"sequence_sum_constant"`` (Dr. GRPO).
        ref_logprobs: Reference log-probabilities, (b, t), for the KL term; ``None``: no KL term.
        kl_coef: Weight of the KL term.
        weights: Truncated importance weights, (b, t) or (b, 1); not applied to the KL term (as TRL).
        max_tokens: The constant of ``"sequence_sum_constant"``: the largest response length (default ``t``).

    Returns:
        ``(loss, stats)``.

    Raises:
        ValueError: On an unknown ``aggregation`` or shapes that do not match.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}.")
    if not (logprobs.shape == old_logprobs.shape == mask.shape) or advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"expected logprobs, old_logprobs and mask of one shape (b, t) and advantages (b,), got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(mask.shape)}, {tuple(advantages.shape)}."
        )
    mask = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs  # (b, t)
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]  # (b, 1): every token of a response shares its advantage
    unclipped, clipped = -adv * ratio, -adv * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)  # (b, t)
    if weights is not None:
        per_token = per_token * weights
    kl = torch.zeros_like(per_token) if ref_logprobs is None else kl_k3(logprobs, ref_logprobs)  # (b, t)
    per_token = per_token + kl_coef * kl
    if aggregation == "sequence_mean":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif aggregation == "token_mean":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    else:
        loss = (per_token * mask).sum() / (len(mask) * (mask.shape[1] if max_tokens is None else max_tokens))
    with torch.no_grad():
        tokens = mask.sum().clamp(min=1.0)
        stats = GRPOStats(
            clipfrac=((clipped > unclipped).to(mask.dtype) * mask).sum() / tokens,
            approx_kl=(0.5 * log_ratio**2 * mask).sum() / tokens,
            ratio=(ratio * mask).sum() / tokens,
            kl=(kl * mask).sum() / tokens,
        )
    return loss, stats
