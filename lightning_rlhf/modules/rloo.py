"""RLOO: REINFORCE with a leave-one-out baseline over k samples per prompt.

Sources:
    * Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
      Learning from Human Feedback in LLMs", eq. 8 (the leave-one-out baseline).
    * Noukhovitch et al. 2025, "Asynchronous RLHF" (ICLR 2025), Sec. 3, and their code
      (github.com/mnoukhov/async_rlhf, a fork of TRL 0.11's ``RLOOTrainer``): the reward is
      the score minus ``kl_coef`` times the sequence-summed KL to the reference (k1); the
      update is PPO-clipped on the *sequence* logprob ratio; sampling temperature applied to
      the training logits; truncation after the stop token; the missing-EOS penalty that
      *replaces* the score; ``num_mini_batches`` x ``num_epochs`` updates per generated batch.
    * Advantages: :func:`lightning_rlhf.losses.rloo_advantages`; loss:
      :func:`lightning_rlhf.losses.ppo_policy_loss` on (b, 1) sequence-level tensors.
    * Off-policy correction (opt-in, ``importance_sampling_cap``): each sequence's loss weighted by
      the truncated product of its token ratios ``min(pi_old / pi_behaviour, C)``
      (:func:`lightning_rlhf.losses.truncated_importance_weights`, TRL's sequence-level mode);
      the paper's code has none.

Deviations:
    * Completions are dropped after the stop token instead of padded.
    * ``normalize_advantages`` whitens over the whole generated batch (TRL 0.11 option, off by default).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from typing_extensions import override

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.losses import kl_k1, ppo_policy_loss, rloo_advantages
from lightning_rlhf.modules.accumulation import WeightedSum
from lightning_rlhf.modules.base import RLModuleBase, check_importance_sampling_cap, importance_weights
from lightning_rlhf.rollout_batch import RolloutBatch, micro_batches, minibatches


class RLOO(RLModuleBase):
    """REINFORCE Leave-One-Out with a KL-shaped reward and PPO-style clipping.

    ``num_mini_batches`` splits a generated batch's completions.

    Args:
        kl_coef: Weight of the sequence KL to the reference, subtracted from the score.
        k: Completions sampled per prompt (at least 2).
        clip_eps: PPO clipping range of the sequence ratio.
        normalize_advantages: Whiten the advantages over the generated batch.
        importance_sampling_cap: ``C`` of the truncated importance-sampling correction for rollouts
            sampled by older weights: each sequence's loss is weighted by
            ``min(pi_old / pi_behaviour, C)``, the product of its token ratios (logged as
            ``offpolicy/is_ratio_mean`` and ``offpolicy/is_clipfrac``). ``None`` (default): off.
        **kwargs: The arguments every RL module takes (policy, reward, optimizer, ...; see :class:`RLModuleBase`).

    Raises:
        ConfigError: If ``k < 2``, ``importance_sampling_cap <= 0``, and as :class:`RLModuleBase`.
    """

    def __init__(
        self,
        kl_coef: float = 0.05,
        k: int = 4,
        clip_eps: float = 0.2,
        normalize_advantages: bool = False,
        importance_sampling_cap: float | None = None,
        **kwargs,
    ) -> None:
        if k < 2:
            raise ConfigError(
                f"RLOO needs at least two completions per prompt for the leave-one-out baseline, got k={k}; set k >= 2."
            )
        check_importance_sampling_cap(importance_sampling_cap)
        super().__init__(k=k, **kwargs)
        self.kl_coef, self.clip_eps, self.normalize_advantages = kl_coef, clip_eps, normalize_advantages
        self.importance_sampling_cap = importance_sampling_cap

    @override
    def learn(self, rollouts: RolloutBatch, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        k, size = self.sampling.k, self.micro_batch_size
        with torch.no_grad():
            old_token_logps = self.logprobs_without_grad(rollouts)  # (b, t)
            old_logps = old_token_logps.sum(-1)  # (b,)
            ref_logps = self.logprobs_without_grad(rollouts, self.ref_policy).sum(-1)  # (b,)
            kl = kl_k1(old_logps, ref_logps)  # (b,) sequence KL, k1 summed over tokens
            rewards = scores - self.kl_coef * kl  # (b,)
            advantages = rloo_advantages(rewards.view(-1, k)).flatten()  # (b,)
            if self.normalize_advantages:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        weights, offpolicy = importance_weights(self.importance_sampling_cap, old_token_logps, rollouts, "sequence")

        for _ in range(self.num_epochs):
            for mb in minibatches(len(rollouts), self.num_mini_batches):
                sums = WeightedSum()
                batch = _Update(rollouts, old_logps, advantages, weights, len(mb), sums)
                self.optimizer_step_over(micro_batches(mb.to(self.device), size), partial(self._loss, batch))

        return {
            "train/loss": sums.totals["loss"],
            "train/clipfrac": sums.totals["clipfrac"],
            "train/approx_kl": sums.totals["approx_kl"],
            "train/ratio": sums.totals["ratio"],
            "objective/rlhf_reward": rewards.mean(),
            "objective/kl": kl.mean(),
            "objective/advantage_std": advantages.std(),
            **offpolicy,
        }

    def _loss(self, batch: _Update, chunk: torch.Tensor) -> torch.Tensor:
        """The clipped sequence-level loss of the rollouts ``chunk``, weighted by their share of the mini-batch."""
        logps = self.token_logprobs(batch.rollouts[chunk]).sum(-1)[:, None]  # (c, 1): one "token" per sequence
        loss, stats = ppo_policy_loss(
            logps,
            batch.old_logps[chunk, None],
            batch.advantages[chunk, None],
            torch.ones_like(logps),
            self.clip_eps,
            weights=None if batch.weights is None else batch.weights[chunk],
        )
        share = len(chunk) / batch.size
        batch.sums.add(share, loss=loss, clipfrac=stats.clipfrac, approx_kl=stats.approx_kl, ratio=stats.ratio)
        return loss * share


class _Update(NamedTuple):
    """What every micro-batch of one mini-batch's update reads."""

    rollouts: RolloutBatch
    old_logps: torch.Tensor  # (b,)
    advantages: torch.Tensor  # (b,)
    weights: torch.Tensor | None  # (b, 1) truncated importance weights, or None
    size: int  # rollouts in the mini-batch
    sums: WeightedSum  # the mini-batch's statistics
