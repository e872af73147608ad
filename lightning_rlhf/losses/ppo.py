"""PPO clipped policy loss, clipped value loss and GAE on token sequences.

Notation:
    b: batch size (number of responses).
    t: response length in tokens, right-padded; ``mask`` is 1 on real tokens
        and 0 on the padding after the end of each response.

Source:
    - Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7
      (clipped surrogate objective ``L^CLIP``), written as a loss to minimise:
      ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))``.
    - Schulman et al. 2016, "High-Dimensional Continuous Control Using
      Generalized Advantage Estimation", eq. 16:
      ``A_t = sum_l (gamma * lam) ** l * delta_{t+l}`` with
      ``delta_t = r_t + gamma * V_{t+1} - V_t``.
    - Token-level masking, the clipped value loss, ``clipfrac`` and the
      ``approx_kl = 0.5 * mean((logprobs - old_logprobs) ** 2)`` diagnostic
      follow Noukhovitch et al. 2025, "Asynchronous RLHF" (ICLR 2025),
      reference code github.com/mnoukhov/async_rlhf (a fork of TRL 0.11,
      ``PPOv2Trainer``).

Deviations:
    - ``gae`` treats the step after the last real token as terminal (value 0).
      TRL 0.11 keeps the value one position past the end
      (``padding_mask_p1``) and bootstraps from it.
    - ``gae`` zeroes advantages and returns on padding instead of relying on
      the caller to mask them later.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .common import masked_mean


class PPOStats(NamedTuple):
    """Detached diagnostics of a PPO policy step (all scalars).

    Attributes:
        policy_loss: The loss value.
        clipfrac: Fraction of real tokens where the clipped term was selected.
        approx_kl: Masked mean of ``0.5 * (logprobs - old_logprobs) ** 2``.
        ratio: Masked mean of the probability ratio.
    """

    policy_loss: Tensor
    clipfrac: Tensor
    approx_kl: Tensor
    ratio: Tensor


class ValueStats(NamedTuple):
    """Detached diagnostics of a value step (all scalars).

    Attributes:
        value_loss: The loss value.
        value_clipfrac: Fraction of real tokens where the clipped error was larger.
        values_mean: Masked mean of the predicted values.
    """

    value_loss: Tensor
    value_clipfrac: Tensor
    values_mean: Tensor


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(x.shape) for name, x in tensors.items()}
    if len(set(shapes.values())) != 1 or next(iter(tensors.values())).ndim != 2:
        raise ValueError(
            f"expected tensors of the same shape (b, t), got {shapes}; pass token-level tensors aligned with the mask."
        )


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    weights: Tensor | None = None,
) -> tuple[Tensor, PPOStats]:
    """Token-level PPO clipped surrogate loss (Schulman et al. 2017, eq. 7).

    The loss is averaged over all real tokens of the batch, so longer
    responses carry proportionally more weight.

    Args:
        logprobs: Current-policy log-probabilities of the sampled tokens, (b, t).
        old_logprobs: Log-probabilities under the policy that generated the
            tokens (or the policy at the start of this PPO epoch), (b, t).
        advantages: Per-token advantages, (b, t); treated as constants.
        mask: 1 on real tokens, 0 on padding, (b, t).
        clip_eps: Clip range ``eps`` for the ratio ``[1 - eps, 1 + eps]``.
        weights: Constant per-token (b, t) or per-sequence (b, 1) factors applied to each
            token's clipped loss before the average, e.g. the truncated importance weights of
            :func:`~lightning_rlhf.losses.truncated_importance_weights`; the average still
            divides by the number of real tokens. ``None``: all 1.

    Returns:
        ``(loss, stats)``: the scalar loss and detached ``PPOStats``.

    Raises:
        ValueError: If the inputs are not all of the same shape (b, t) or
            ``clip_eps < 0``.
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if clip_eps < 0:
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps}; pass a non-negative clip range.")
    advantages = advantages.detach()
    log_ratio = logprobs - old_logprobs.detach()  # (b, t)
    ratio = torch.exp(log_ratio)  # (b, t)
    unclipped = -advantages * ratio  # (b, t)
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)  # (b, t)
    per_token = torch.maximum(unclipped, clipped)  # (b, t)
    if weights is not None:
        per_token = per_token * weights.detach()  # after the clip, as TIS (verl) and TRL apply it
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        stats = PPOStats(
            policy_loss=loss.detach(),
            clipfrac=masked_mean((clipped > unclipped).float(), mask),
            approx_kl=masked_mean(0.5 * log_ratio**2, mask),
            ratio=masked_mean(ratio, mask),
        )
    return loss, stats


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float,
) -> tuple[Tensor, ValueStats]:
    """Clipped value-function loss as in TRL 0.11 / async_rlhf.

    ``0.5 * mean(max((V - R) ** 2, (V_clip - R) ** 2))`` with
    ``V_clip = V_old + clip(V - V_old, -eps, eps)``.

    Args:
        values: Current value predictions, (b, t).
        old_values: Value predictions at rollout time, (b, t).
        returns: Regression targets, e.g. from ``gae``, (b, t).
        mask: 1 on real tokens, 0 on padding, (b, t).
        clip_eps: How far ``values`` may move from ``old_values`` before the
            clipped error takes over.

    Returns:
        ``(loss, stats)``: the scalar loss and detached ``ValueStats``.

    Raises:
        ValueError: If the inputs are not all of the same shape (b, t) or
            ``clip_eps < 0``.
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    if clip_eps < 0:
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps}; pass a non-negative clip range.")
    old_values, returns = old_values.detach(), returns.detach()
    values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)  # (b, t)
    err = (values - returns) ** 2  # (b, t)
    err_clipped = (values_clipped - returns) ** 2  # (b, t)
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = ValueStats(
            value_loss=loss.detach(),
            value_clipfrac=masked_mean((err_clipped > err).float(), mask),
            values_mean=masked_mean(values, mask),
        )
    return loss, stats


@torch.no_grad()
def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 16).

    Runs under ``torch.no_grad``: inputs are treated as constants and the
    outputs never require grad. The value after the last real token is 0, so
    at the last real token ``delta = r - V``. Padding never leaks: rewards and
    values on padding are ignored even if they are ``inf``. No whitening is
    applied.

    Args:
        rewards: Per-token rewards, (b, t), e.g. from ``kl_penalized_rewards``.
        values: Value predictions at rollout time, (b, t).
        mask: 1 on real tokens, 0 on the right padding, (b, t).
        gamma: Discount factor.
        lam: GAE ``lambda``; 1 gives Monte-Carlo returns, 0 gives TD(0).

    Returns:
        ``(advantages, returns)``, both (b, t), with ``returns = advantages +
        values`` on real tokens and both 0 on padding.

    Raises:
        ValueError: If the inputs are not all of the same shape (b, t).
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    keep = mask.bool()  # (b, t)
    values = torch.where(keep, values, torch.zeros_like(values))  # (b, t)
    advantages = torch.zeros_like(rewards)  # (b, t)
    last = torch.zeros_like(rewards[:, 0])  # (b,) running advantage A_{i+1}
    length = rewards.shape[1]
    for i in reversed(range(length)):
        # Values are zeroed on padding, so past the end this is V = 0; padded
        # rewards are dropped by resetting the running advantage there.
        next_values = values[:, i + 1] if i + 1 < length else torch.zeros_like(last)  # (b,)
        delta = rewards[:, i] + gamma * next_values - values[:, i]  # (b,)
        last = torch.where(keep[:, i], delta + gamma * lam * last, torch.zeros_like(last))  # (b,)
        advantages[:, i] = last
    returns = advantages + values  # (b, t); both terms are 0 on padding
    return advantages, returns
