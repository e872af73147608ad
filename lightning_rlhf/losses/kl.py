"""Per-token KL estimators and KL-penalised token rewards for PPO.

Notation:
    b: batch size (number of responses).
    t: response length in tokens, right-padded; ``mask`` is 1 on real tokens.
    r: the ratio ``pi_ref(x) / pi(x)`` for a token ``x`` sampled from ``pi``;
        ``log r = ref_logprobs - logprobs``.

Source:
    - John Schulman, "Approximating KL Divergence" (blog, 2020,
      joschu.net/blog/kl-approx.html): ``k1 = -log r`` (unbiased, can be
      negative) and ``k3 = (r - 1) - log r`` (unbiased, always >= 0) estimate
      ``KL(pi || pi_ref)`` from samples of ``pi``.
    - Token-level reward shaping ``r_i = -kl_coef * kl_i`` plus the
      sequence score on the final token follows Noukhovitch et al. 2025,
      "Asynchronous RLHF" (ICLR 2025), reference code
      github.com/mnoukhov/async_rlhf (a fork of TRL 0.11, ``PPOv2Trainer``).

Deviations:
    - The score is added at the last real token. TRL 0.11 adds it one position
      past the last real token (``sequence_lengths_p1``) when that position
      exists, i.e. on the first padding token.
    - Padding is handled with ``mask`` (KL is 0 there) rather than TRL's
      ``INVALID_LOGPROB`` fill value.
    - The ``k3`` option comes from later TRL versions (``kl_estimator``);
      TRL 0.11's PPO uses ``k1`` only.
"""

from __future__ import annotations

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k3")


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """The ``k1`` estimator ``logprobs - ref_logprobs`` (elementwise).

    Args:
        logprobs: Log-probabilities of sampled tokens under the policy.
        ref_logprobs: Log-probabilities of the same tokens under the reference.

    Returns:
        Tensor shaped like the inputs; unbiased for ``KL(pi || pi_ref)`` but
        can be negative per token.
    """
    return logprobs - ref_logprobs


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """The ``k3`` estimator ``exp(log r) - log r - 1`` with ``log r = ref - logprobs``.

    Args:
        logprobs: Log-probabilities of sampled tokens under the policy.
        ref_logprobs: Log-probabilities of the same tokens under the reference.

    Returns:
        Tensor shaped like the inputs; unbiased for ``KL(pi || pi_ref)`` and
        non-negative per token.
    """
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def kl_penalized_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token PPO rewards: ``-kl_coef * kl`` with the score on the last real token.

    Meant for rollout time (call under ``torch.no_grad``); gradients are not
    cut here so the KL can also be reused in a loss.

    Args:
        scores: Sequence-level reward-model scores, (b,).
        logprobs: Policy log-probabilities of the response tokens, (b, t).
        ref_logprobs: Reference log-probabilities of the response tokens, (b, t).
        mask: 1 on real tokens, 0 on right padding, (b, t). The last real token
            of row ``i`` is at ``mask[i].sum() - 1``; a row with no real token
            gets no score.
        kl_coef: Weight of the KL penalty.
        estimator: ``"k1"`` or ``"k3"`` (see ``kl_k1`` / ``kl_k3``).

    Returns:
        ``(rewards, kl)``, both (b, t) and 0 on padding.

    Raises:
        ValueError: If ``estimator`` is unknown or the shapes do not line up.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}.")
    if not (logprobs.shape == ref_logprobs.shape == mask.shape) or logprobs.ndim != 2:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, ref_logprobs {tuple(ref_logprobs.shape)} and "
            f"mask {tuple(mask.shape)} must all have the same shape (b, t); "
            "align them to the response tokens."
        )
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(
            f"scores has shape {tuple(scores.shape)} but expected ({logprobs.shape[0]},); pass one score per response."
        )
    keep = mask.bool()  # (b, t)
    kl_fn = kl_k1 if estimator == "k1" else kl_k3
    kl = torch.where(keep, kl_fn(logprobs, ref_logprobs), torch.zeros_like(logprobs))  # (b, t)
    rewards = -kl_coef * kl  # (b, t)
    last = keep.long().sum(1) - 1  # (b,) index of the last real token, -1 if none
    rows = torch.nonzero(last >= 0).squeeze(1)  # (b',)
    rewards = rewards.index_put((rows, last[rows]), scores[rows].to(rewards.dtype), accumulate=True)  # (b, t)
    return rewards, kl
