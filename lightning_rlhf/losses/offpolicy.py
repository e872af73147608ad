"""Truncated importance sampling (TIS): re-weighting a loss for rollouts sampled by a stale generator.

Notation:
    b: batch size (number of responses).
    t: response length in tokens, right-padded; ``mask`` is 1 on real tokens.
    pi_old: the trainer's policy when the batch arrives (``old_logprobs``, no gradient).
    pi_behaviour: the weights that sampled the batch, as the generator reported them
        (``behavior_logprobs``: the same temperature-scaled logprobs, from a policy
        ``N`` updates older in an asynchronous run, or from another engine's kernels).

Each term of the policy-gradient loss is multiplied by the constant weight
``w = min(pi_old / pi_behaviour, cap)``: the importance ratio that turns an
expectation under the behaviour policy into one under ``pi_old``, truncated
above so that a few tokens the generator found unlikely cannot dominate the
gradient. The clipped PPO surrogate itself keeps its ratio to ``pi_old``
(a decoupled objective: ``pi_old`` is the proximal policy, ``pi_behaviour``
only re-weights).

Sources:
    - Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
      Training" (TIS): ``min(pi_learner / pi_sampler, C)`` times the surrogate's gradient,
      upper bound only, weight treated as a constant. verl's first implementation
      (``verl/trainer/ppo/core_algos.py``, ``compute_policy_loss_vanilla``, ``tis_imp_ratio_cap``)
      multiplies the per-token loss after the PPO clip.
    - TRL's ``GRPOTrainer`` (``trl/trainer/grpo_trainer.py``, ``vllm_importance_sampling_*``):
      ratio ``exp(old - sampling)`` computed without gradient, per token or per sequence (the
      sequence ratio is the *product* of the token ratios, ``exp`` of the summed difference),
      multiplied into the per-token loss after the clip; the KL term is not weighted.
    - Hilton et al. 2022, "Batch size-invariance for policy optimization" and AReaL's decoupled
      PPO objective (``areal/utils/functional``, ``ppo_actor_loss_fn``): the clip is taken
      against the proximal policy (here ``pi_old``), the behaviour ratio only re-weights.

Deviations:
    - The truncation is computed as ``exp(min(log_ratio, log(cap)))`` (equal to
      ``min(exp(log_ratio), cap)``, without overflow for a sequence-level ratio);
      the reported mean ratio clamps ``log_ratio`` to ``[-20, 20]`` first, as verl does.
    - No lower bound (none of the three sets one by default).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .common import masked_mean

IS_LEVELS = ("token", "sequence")


class ISStats(NamedTuple):
    """Detached diagnostics of the importance weights (scalars).

    Attributes:
        ratio_mean: Mean of the untruncated ratio ``pi_old / pi_behaviour`` (over real
            tokens, or over sequences).
        clipfrac: Fraction of ratios above ``cap`` (truncated).
        ratio_max: Largest untruncated ratio.
    """

    ratio_mean: Tensor
    clipfrac: Tensor
    ratio_max: Tensor


def truncated_importance_weights(
    old_logprobs: Tensor,
    behavior_logprobs: Tensor,
    mask: Tensor,
    cap: float,
    level: Literal["token", "sequence"] = "token",
) -> tuple[Tensor, ISStats]:
    """The weights ``min(pi_old / pi_behaviour, cap)`` and their statistics, without gradient.

    Args:
        old_logprobs: Trainer's log-probabilities of the sampled tokens before this batch's
            updates, (b, t).
        behavior_logprobs: The generator's log-probabilities of the same tokens, (b, t).
        mask: 1 on real tokens, 0 on padding, (b, t).
        cap: Upper bound ``C`` of the weight (``> 0``).
        level: ``"token"``: one weight per token, (b, t), 0 on padding. ``"sequence"``: one
            weight per response from the product of its token ratios, (b, 1).

    Returns:
        ``(weights, stats)``: detached weights and :class:`ISStats`.

    Raises:
        ValueError: If ``cap <= 0``, ``level`` is unknown, or the shapes differ.
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}; pass the largest weight a token or sequence may get.")
    if level not in IS_LEVELS:
        raise ValueError(f"level must be one of {IS_LEVELS}, got {level!r}.")
    if not (old_logprobs.shape == behavior_logprobs.shape == mask.shape) or mask.ndim != 2:
        raise ValueError(
            f"expected old_logprobs, behavior_logprobs and mask of the same shape (b, t), got "
            f"{tuple(old_logprobs.shape)}, {tuple(behavior_logprobs.shape)}, {tuple(mask.shape)}."
        )
    with torch.no_grad():
        log_ratio = torch.where(mask.bool(), old_logprobs.float() - behavior_logprobs.float(), 0.0)  # (b, t)
        if level == "sequence":
            log_ratio = log_ratio.sum(-1, keepdim=True)  # (b, 1): log of the product of token ratios
            real = torch.ones_like(log_ratio)
        else:
            real = mask.to(log_ratio.dtype)
        weights = torch.exp(log_ratio.clamp(max=math.log(cap))) * real  # min(ratio, cap); 0 on padding
        ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
        stats = ISStats(
            ratio_mean=masked_mean(ratio, real),
            clipfrac=masked_mean((log_ratio > math.log(cap)).float(), real),
            ratio_max=torch.where(real.bool(), ratio, 0.0).max(),
        )
    return weights, stats
