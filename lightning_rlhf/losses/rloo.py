"""REINFORCE Leave-One-Out (RLOO) advantages.

Notation:
    b: number of prompts.
    k: completions sampled per prompt (``k >= 2``).

Source:
    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
    Optimization for Learning from Human Feedback in LLMs", section 3: each
    sample's baseline is the mean reward of the other ``k - 1`` samples of the
    same prompt. Used as in Noukhovitch et al. 2025, "Asynchronous RLHF"
    (ICLR 2025), reference code github.com/mnoukhov/async_rlhf (a fork of
    TRL 0.11, ``RLOOTrainer``).

Deviations:
    - Rewards are laid out as (b, k) with the samples of a prompt in one row.
      TRL 0.11 stores them flat as (k * b,) with sample index outermost and
      reshapes to (k, b); transpose accordingly when porting.
"""

from __future__ import annotations

from torch import Tensor


def rloo_advantages(rewards: Tensor) -> Tensor:
    """Subtracts from each reward the mean reward of the other samples of its prompt.

    ``A[i, j] = r[i, j] - (sum_l r[i, l] - r[i, j]) / (k - 1)``. The
    advantages of a row sum to zero.

    Args:
        rewards: Sequence-level rewards of shape (b, k), row ``i`` holding the
            ``k`` completions of prompt ``i``.

    Returns:
        Advantages of shape (b, k).

    Raises:
        ValueError: If ``rewards`` is not 2-D or ``k < 2``.
    """
    if rewards.ndim != 2:
        raise ValueError(
            f"rewards must have shape (b, k), got {tuple(rewards.shape)}; "
            "reshape so that each row holds the samples of one prompt."
        )
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt; set k >= 2 (got k={k}).")
    baseline = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)  # (b, k)
    return rewards - baseline  # (b, k)
