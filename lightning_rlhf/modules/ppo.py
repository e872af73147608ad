"""PPO for language models: token-level KL-shaped rewards, a learned critic, GAE, clipped losses.

Sources:
    * Schulman et al. 2017 (PPO, eq. 7); Schulman et al. 2016 (GAE, eq. 16); Ziegler et al. 2019 and Stiennon
      et al. 2020 (per-token KL penalty to the reference, score at the last token).
    * Noukhovitch et al. 2025, "Asynchronous RLHF" (ICLR 2025), Sec. 3, and their code (github.com/mnoukhov/async_rlhf,
      a fork of TRL 0.11's ``PPOv2Trainer``): a critic initialised from the reward model, one optimizer over policy
      and critic, whitened advantages, the clipped value loss, the sampling temperature on the training logits,
      truncation after the stop token, the missing-EOS penalty that *replaces* the score, and ``num_mini_batches`` x
      ``num_epochs`` updates per generated batch. The losses are in :mod:`lightning_rlhf.losses.ppo`.
    * Off-policy correction (opt-in, ``importance_sampling_cap``): each token's clipped loss weighted by
      ``min(pi_old / pi_behaviour, C)`` (token level, as verl's TIS); the paper's code has none.

Deviations:
    * ``critic=None`` puts a linear value head on the policy's last hidden state (TRL 0.11 always uses a critic).
    * The score and the terminal value sit at the last real token (see ``losses/ppo.py``).
    * Completions are dropped after the stop token instead of padded.
"""

from __future__ import annotations

from functools import partial
from typing import Literal, NamedTuple

import torch
from typing_extensions import override

from lightning_rlhf.losses import (
    clipped_value_loss,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
)
from lightning_rlhf.models import loaded
from lightning_rlhf.modules.accumulation import WeightedSum
from lightning_rlhf.modules.base import RLModuleBase, check_importance_sampling_cap, check_source, importance_weights
from lightning_rlhf.rollout_batch import RolloutBatch, in_micro_batches, micro_batches, minibatches
from lightning_rlhf.rollout_forwards import logprobs_and_values, value_model


class PPO(RLModuleBase):
    """PPO with a separate critic (or a value head) and GAE; ``num_mini_batches`` splits a batch's completions.

    Args:
        critic: Sequence-classification model that becomes the critic (the paper starts it from the
            reward model); ``None`` for a linear value head on the policy.
        kl_coef: Weight of the per-token KL penalty.
        kl_estimator: ``"k1"`` (the paper's) or ``"k3"``.
        k: Completions sampled per prompt.
        clip_eps: Policy ratio clipping range.
        value_clip_eps: Value clipping range.
        vf_coef: Weight of the value loss.
        gamma: Discount.
        lam: GAE lambda.
        whiten_advantages: Whiten advantages over the generated batch.
        num_epochs: Passes over each generated batch (PPO epochs).
        importance_sampling_cap: ``C`` of the truncated importance-sampling correction: each token's loss weighted
            by ``min(pi_old / pi_behaviour, C)`` (logged under ``offpolicy/``). ``None`` (default): off.
        **kwargs: The arguments every RL module takes (policy, reward, optimizer over policy and critic, ...; see
            :class:`RLModuleBase`).

    Raises:
        ConfigError: If a critic path does not exist, ``importance_sampling_cap <= 0``, and as :class:`RLModuleBase`.
    """

    def __init__(
        self,
        critic: str | None = "builtin:reward_model",
        kl_coef: float = 0.05,
        kl_estimator: Literal["k1", "k3"] = "k1",
        k: int = 1,
        clip_eps: float = 0.2,
        value_clip_eps: float = 0.2,
        vf_coef: float = 0.1,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        num_epochs: int = 4,
        importance_sampling_cap: float | None = None,
        **kwargs,
    ) -> None:
        check_source(critic, "critic model")
        check_importance_sampling_cap(importance_sampling_cap)
        super().__init__(k=k, num_epochs=num_epochs, **kwargs)
        self.critic_source = critic
        self.kl_coef, self.kl_estimator = kl_coef, kl_estimator
        self.clip_eps, self.value_clip_eps, self.vf_coef = clip_eps, value_clip_eps, vf_coef
        self.gamma, self.lam, self.whiten_advantages = gamma, lam, whiten_advantages
        self.importance_sampling_cap = importance_sampling_cap

    @override
    def load_trained_beside(self, policy: torch.nn.Module) -> list[torch.nn.Module]:
        self.critic, self.value_head = value_model(self.critic_source, policy)
        return [self.critic if self.critic is not None else self.value_head]

    def logprobs_and_values(self, rollouts: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy logprobs and values of the response tokens, both (b, t), 0 on padding."""
        policy, k = loaded(self.policy, self), self.sampling.k
        return logprobs_and_values(policy, self.critic, self.value_head, rollouts, self.sampling.temperature, k > 1)

    @override
    def learn(self, rollouts: RolloutBatch, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        mask, size = rollouts.response_mask, self.micro_batch_size  # (b, t)
        with torch.no_grad():
            stacked = lambda chunk: torch.stack(self.logprobs_and_values(chunk), dim=1)  # noqa: E731
            old = in_micro_batches(stacked, rollouts, size)  # (b, 2, t)
            old_logprobs, old_values = old[:, 0], old[:, 1]  # (b, t), (b, t)
            ref_logprobs = self.logprobs_without_grad(rollouts, self.ref_policy)  # (b, t)
            kl_coef, estimator = self.kl_coef, self.kl_estimator
            rewards, kl = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef, estimator)  # (b, t)
            advantages, returns = gae(rewards, old_values, mask, self.gamma, self.lam)  # (b, t)
            if self.whiten_advantages:
                advantages = masked_whiten(advantages, mask)
        weights, offpolicy = importance_weights(self.importance_sampling_cap, old_logprobs, rollouts, "token")

        for _ in range(self.num_epochs):
            for mb in minibatches(len(rollouts), self.num_mini_batches):
                mb = mb.to(self.device)
                sums = WeightedSum()
                batch = _Update(rollouts, old_logprobs, old_values, advantages, returns, weights, mask[mb].sum(), sums)
                self.optimizer_step_over(micro_batches(mb, size), partial(self._loss, batch))

        return {
            **{f"train/{name}": value for name, value in sums.totals.items()},
            "objective/kl": (kl * mask).sum(-1).mean(),
            "objective/entropy": -masked_mean(old_logprobs, mask),
            **offpolicy,
        }

    def _loss(self, batch: _Update, chunk: torch.Tensor) -> torch.Tensor:
        """Policy plus weighted value loss of the rollouts ``chunk``, weighted by their share of the mini-batch's
        tokens (the losses are masked means)."""
        mask, weights = batch.rollouts.response_mask[chunk], batch.weights  # (c, t)
        logprobs, values = self.logprobs_and_values(batch.rollouts[chunk])  # (c, t)
        old_logprobs, advantages = batch.old_logprobs[chunk], batch.advantages[chunk]
        weights = None if weights is None else weights[chunk]
        policy_loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, self.clip_eps, weights)
        old_values, returns = batch.old_values[chunk], batch.returns[chunk]
        value_loss, value_stats = clipped_value_loss(values, old_values, returns, mask, self.value_clip_eps)
        loss = policy_loss + self.vf_coef * value_loss
        share = mask.sum() / batch.tokens
        batch.sums.add(share, loss=loss, policy_loss=policy_loss, value_loss=value_loss, clipfrac=stats.clipfrac)
        batch.sums.add(share, value_clipfrac=value_stats.value_clipfrac, approx_kl=stats.approx_kl)
        return loss * share


class _Update(NamedTuple):
    """What every micro-batch of one mini-batch's update reads (all rollout-indexed, (b, t))."""

    rollouts: RolloutBatch
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    weights: torch.Tensor | None  # truncated importance weights, or None
    tokens: torch.Tensor  # real response tokens in the mini-batch, ()
    sums: WeightedSum  # the mini-batch's statistics
