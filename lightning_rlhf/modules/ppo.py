"""PPO for language models: token-level KL-shaped rewards, a learned critic, GAE, clipped losses.

Sources:
    * Schulman et al. 2017 (PPO, eq. 7); Schulman et al. 2016 (GAE, eq. 16); Ziegler et al. 2019
      and Stiennon et al. 2020 (per-token KL penalty to the reference, score at the last token).
    * Noukhovitch et al. 2025, "Asynchronous RLHF" (ICLR 2025), Sec. 3, and their code
      (github.com/mnoukhov/async_rlhf, a fork of TRL 0.11's ``PPOv2Trainer``): a separate critic
      initialised from the reward model, one optimizer over policy and critic, whitened
      advantages, the clipped value loss, sampling temperature applied to the training logits,
      truncation after the stop token, the missing-EOS penalty that *replaces* the score, and
      ``num_mini_batches`` x ``num_epochs`` updates per generated batch.
    * Losses: :func:`lightning_rlhf.losses.kl_penalized_rewards`, :func:`~lightning_rlhf.losses.gae`,
      :func:`~lightning_rlhf.losses.ppo_policy_loss`, :func:`~lightning_rlhf.losses.clipped_value_loss`.
    * Off-policy correction (opt-in, ``importance_sampling_cap``): each token's clipped loss weighted
      by ``min(pi_old / pi_behaviour, C)`` (:func:`~lightning_rlhf.losses.truncated_importance_weights`,
      token level as verl's TIS); the paper's code has none.

Deviations:
    * ``critic=None`` puts a linear value head on the policy's last hidden state instead of a
      separate critic (cheaper; TRL 0.11 always uses a separate model).
    * The score and the terminal value sit at the last real token (see ``losses/ppo.py``).
    * Completions are dropped after the stop token instead of padded.
"""

from __future__ import annotations

from functools import partial
from typing import Literal, NamedTuple

import torch
from typing_extensions import override

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.losses import (
    clipped_value_loss,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    truncated_importance_weights,
)
from lightning_rlhf.models import load_reward_model, loaded
from lightning_rlhf.modules.accumulation import WeightedSum
from lightning_rlhf.modules.base import (
    RLModuleBase,
    check_importance_sampling_cap,
    check_source,
    importance_sampling_metrics,
)
from lightning_rlhf.rollout_batch import RolloutBatch, in_micro_batches, micro_batches, minibatches
from lightning_rlhf.rollout_forwards import critic_values, response_logprobs, response_logprobs_and_hidden


class PPO(RLModuleBase):
    """PPO with a separate critic (or a value head) and GAE.

    ``num_mini_batches`` splits a generated batch's completions.

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
        importance_sampling_cap: ``C`` of the truncated importance-sampling correction for rollouts
            sampled by older weights: each token's clipped loss is weighted by
            ``min(pi_old / pi_behaviour, C)`` (logged as ``offpolicy/is_ratio_mean`` and
            ``offpolicy/is_clipfrac``). ``None`` (default): off.
        **kwargs: The arguments every RL module takes (policy, reward, optimizer over policy and critic,
            ...; see :class:`RLModuleBase`).

    Raises:
        ConfigError: If ``k < 1``, a critic path does not exist, ``importance_sampling_cap <= 0``,
            and as :class:`RLModuleBase`.
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
        if k < 1:
            raise ConfigError(f"k is the number of completions per prompt and must be at least 1, got {k}.")
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
        """The critic (from ``critic``), or a value head on the policy, starting at 0: no value before it learns one."""
        self.critic = load_reward_model(self.critic_source).train() if self.critic_source is not None else None
        self.value_head = None if self.critic is not None else torch.nn.Linear(policy.config.hidden_size, 1)
        if self.value_head is not None:
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
        return [self.critic if self.critic is not None else self.value_head]

    def logprobs_and_values(self, rollouts: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy logprobs and values of the response tokens, both (b, t), 0 on padding."""
        temperature = self.sampling.temperature
        if self.critic is not None:
            return response_logprobs(self.policy, rollouts, temperature, self.sampling.k > 1), critic_values(
                self.critic, rollouts
            )
        logprobs, hidden = response_logprobs_and_hidden(self.policy, rollouts, temperature)
        head = loaded(self.value_head, self, "value head")
        return logprobs, head(hidden).squeeze(-1).float() * rollouts.response_mask

    @override
    def learn(self, rollouts: RolloutBatch, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        mask, size = rollouts.response_mask, self.micro_batch_size  # (b, t)
        with torch.no_grad():
            old = in_micro_batches(self._stacked_logprobs_and_values, rollouts, size)  # (b, 2, t)
            old_logprobs, old_values = old[:, 0], old[:, 1]  # (b, t), (b, t)
            ref_logprobs = in_micro_batches(
                partial(
                    response_logprobs,
                    self.ref_policy,
                    temperature=self.sampling.temperature,
                    share_prompts=self.sampling.k > 1,
                ),
                rollouts,
                size,
            )  # (b, t)
            rewards, kl = kl_penalized_rewards(
                scores, old_logprobs, ref_logprobs, mask, self.kl_coef, self.kl_estimator
            )  # (b, t)
            advantages, returns = gae(rewards, old_values, mask, self.gamma, self.lam)  # (b, t)
            if self.whiten_advantages:
                advantages = masked_whiten(advantages, mask)
        weights, offpolicy = None, {}
        if self.importance_sampling_cap is not None:
            weights, is_stats = truncated_importance_weights(
                old_logprobs, rollouts.behavior_logprobs, mask, self.importance_sampling_cap, "token"
            )  # (b, t)
            offpolicy = importance_sampling_metrics(is_stats)

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

    def _stacked_logprobs_and_values(self, rollouts: RolloutBatch) -> torch.Tensor:
        return torch.stack(self.logprobs_and_values(rollouts), dim=1)  # (b, 2, t)

    def _loss(self, batch: _Update, chunk: torch.Tensor) -> torch.Tensor:
        """Policy plus weighted value loss of the rollouts ``chunk``, weighted by their share
        of the mini-batch's tokens."""
        mask = batch.rollouts.response_mask[chunk]  # (c, t)
        logprobs, values = self.logprobs_and_values(batch.rollouts[chunk])  # (c, t)
        policy_loss, stats = ppo_policy_loss(
            logprobs,
            batch.old_logprobs[chunk],
            batch.advantages[chunk],
            mask,
            self.clip_eps,
            weights=None if batch.weights is None else batch.weights[chunk],
        )
        value_loss, value_stats = clipped_value_loss(
            values, batch.old_values[chunk], batch.returns[chunk], mask, self.value_clip_eps
        )
        loss = policy_loss + self.vf_coef * value_loss
        share = mask.sum() / batch.tokens  # masked means: the chunk's share of the mini-batch's tokens
        batch.sums.add(
            share,
            loss=loss,
            policy_loss=policy_loss,
            value_loss=value_loss,
            clipfrac=stats.clipfrac,
            value_clipfrac=value_stats.value_clipfrac,
            approx_kl=stats.approx_kl,
        )
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
