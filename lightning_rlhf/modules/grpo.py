"""GRPO: group-normalized advantages over the k samples of a prompt, a clipped token ratio, no critic.

Sources:
    * Shao et al. 2024, "DeepSeekMath", Sec. 4.1 (GRPO): advantages ``(r - mean_group) / std_group`` given to every
      token of a sample, the clipped ratio, the ``k3`` KL to the reference as a loss term, the per-response token mean.
    * Liu et al. 2025 (Dr. GRPO): ``scale_rewards=False`` and ``loss_aggregation="sequence_sum_constant"``;
      Yu et al. 2025 (DAPO): ``loss_aggregation="token_mean"``. The math: :mod:`lightning_rlhf.losses.grpo`.
    * TRL's ``GRPOTrainer`` (``trl/trainer/grpo_trainer.py``) for ``eps = 1e-4``, ``num_iterations`` (our
      ``num_epochs``, 1 by default) and the ratio to the logprobs at generation time.
    * The KL in the reward instead (``kl_in="reward"``): the sequence ``k1`` KL times ``kl_coef`` subtracted from
      the score before normalization, as our RLOO and the Asynchronous RLHF paper's RLOO do.
    * Off-policy: the ratio is taken to the trainer's weights when the batch arrives (``ratio_to="old"``, one extra
      forward) or to the generator's own logprobs (``"behaviour"``, no forward; the ratio then also corrects for
      staleness, as TRL's GRPO with vLLM does); ``importance_sampling_cap`` adds the truncated importance weights
      ``min(pi_old / pi_behaviour, C)`` per token to the ``"old"`` form (as our PPO).

Deviations:
    * Completions are dropped after the stop token instead of padded; the missing-EOS penalty replaces the score.
"""

from __future__ import annotations

from functools import partial
from typing import Literal, NamedTuple

import torch
from typing_extensions import override

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.losses import group_advantages, grpo_loss, kl_k1
from lightning_rlhf.losses.grpo import AGGREGATIONS, Aggregation
from lightning_rlhf.modules.accumulation import WeightedSum
from lightning_rlhf.modules.base import RLModuleBase, check_importance_sampling_cap, importance_weights
from lightning_rlhf.rollout_batch import RolloutBatch, micro_batches, minibatches


class GRPO(RLModuleBase):
    """Group Relative Policy Optimization; ``num_mini_batches`` splits a generated batch's completions.

    Args:
        k: Completions sampled per prompt, the group (at least 2).
        kl_coef: Weight of the KL to the reference (0 turns the reference off: no reference forward).
        kl_in: ``"loss"``: a per-token ``k3`` term in the loss (GRPO); ``"reward"``: the sequence ``k1`` KL
            subtracted from the score (as RLOO).
        clip_eps: Clipping range of the token ratio.
        scale_rewards: Divide by the group's standard deviation (``False``: Dr. GRPO).
        loss_aggregation: ``"sequence_mean"`` (GRPO), ``"token_mean"`` (DAPO), ``"sequence_sum_constant"``
            (Dr. GRPO, the constant being ``max_new_tokens``).
        ratio_to: ``"old"``: the trainer's weights when the batch arrived; ``"behaviour"``: the generator's.
        importance_sampling_cap: ``C`` of the truncated importance weights ``min(pi_old / pi_behaviour, C)``
            per token (with ``ratio_to="old"``); logged under ``offpolicy/``. ``None`` (default): off.
        **kwargs: The arguments every RL module takes (see :class:`RLModuleBase`).

    Raises:
        ConfigError: If ``k < 2``, an option is not one of its choices, ``importance_sampling_cap`` is not
            positive or comes with ``ratio_to="behaviour"``, and as :class:`RLModuleBase`.
    """

    def __init__(
        self,
        k: int = 4,
        kl_coef: float = 0.04,
        kl_in: Literal["loss", "reward"] = "loss",
        clip_eps: float = 0.2,
        scale_rewards: bool = True,
        loss_aggregation: Aggregation = "sequence_mean",
        ratio_to: Literal["old", "behaviour"] = "old",
        importance_sampling_cap: float | None = None,
        **kwargs,
    ) -> None:
        if k < 2:
            raise ConfigError(f"GRPO normalizes rewards over the k samples of a prompt, got k={k}; set k >= 2.")
        for name, value, choices in (
            ("kl_in", kl_in, ("loss", "reward")),
            ("loss_aggregation", loss_aggregation, AGGREGATIONS),
            ("ratio_to", ratio_to, ("old", "behaviour")),
        ):
            if value not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}.")
        check_importance_sampling_cap(importance_sampling_cap)
        if importance_sampling_cap is not None and ratio_to == "behaviour":
            raise ConfigError(
                "importance_sampling_cap re-weights a ratio taken to the old policy; with ratio_to: behaviour the "
                "ratio already corrects for the generator's weights: drop one of the two."
            )
        super().__init__(k=k, **kwargs)
        self.kl_coef, self.kl_in, self.clip_eps = kl_coef, kl_in, clip_eps
        self.scale_rewards, self.loss_aggregation, self.ratio_to = scale_rewards, loss_aggregation, ratio_to
        self.importance_sampling_cap = importance_sampling_cap

    @override
    def learn(self, rollouts: RolloutBatch, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        mask, size = rollouts.response_mask, self.micro_batch_size  # (b, t)
        with torch.no_grad():
            old = self.logprobs_without_grad(rollouts) if self.ratio_to == "old" else rollouts.behavior_logprobs
            ref = self.logprobs_without_grad(rollouts, self.ref_policy) if self.kl_coef else None  # (b, t)
            rewards, kl_metrics = scores, {}
            if ref is not None and self.kl_in == "reward":
                kl = kl_k1(old, ref).mul(mask).sum(-1)  # (b,) sequence KL
                rewards, kl_metrics = scores - self.kl_coef * kl, {"objective/kl": kl.mean()}
            advantages = group_advantages(rewards.view(-1, self.sampling.k), self.scale_rewards).flatten()  # (b,)
        weights, offpolicy = importance_weights(self.importance_sampling_cap, old, rollouts, "token")  # (b, t)
        loss_ref = ref if self.kl_in == "loss" else None

        for _ in range(self.num_epochs):
            for mb in minibatches(len(rollouts), self.num_mini_batches):
                mb = mb.to(self.device)
                sums = WeightedSum()
                batch = _Update(rollouts, old, loss_ref, advantages, weights, len(mb), mask[mb].sum(), sums)
                self.optimizer_step_over(micro_batches(mb, size), partial(self._loss, batch))

        return {
            **{f"train/{name}": value for name, value in sums.totals.items()},
            "objective/rlhf_reward": rewards.mean(),
            "objective/zero_advantage_groups": (advantages.view(-1, self.sampling.k) == 0).all(-1).float().mean(),
            **kl_metrics,
            **offpolicy,
        }

    def _loss(self, batch: _Update, chunk: torch.Tensor) -> torch.Tensor:
        """The loss of the rollouts ``chunk``, weighted by their share of the mini-batch: of its responses for
        the two per-response aggregations, of its real tokens for ``"token_mean"`` (and for the statistics)."""
        mask = batch.rollouts.response_mask[chunk]  # (c, t)
        logprobs = self.token_logprobs(batch.rollouts[chunk])  # (c, t)
        ref, weights = batch.ref_logprobs, batch.weights
        loss, stats = grpo_loss(
            logprobs,
            batch.old_logprobs[chunk],
            batch.advantages[chunk],
            mask,
            self.clip_eps,
            self.loss_aggregation,
            None if ref is None else ref[chunk],
            self.kl_coef,
            None if weights is None else weights[chunk],
            max_tokens=self.sampling.max_new_tokens,
        )
        token_share = mask.sum() / batch.tokens  # the statistics are token means
        share = token_share if self.loss_aggregation == "token_mean" else len(chunk) / batch.size
        batch.sums.add(share, loss=loss)
        batch.sums.add(token_share, clipfrac=stats.clipfrac, approx_kl=stats.approx_kl, ratio=stats.ratio)
        if ref is not None:
            batch.sums.add(token_share, kl=stats.kl)
        return loss * share


class _Update(NamedTuple):
    """What every micro-batch of one mini-batch's update reads (rollout-indexed)."""

    rollouts: RolloutBatch
    old_logprobs: torch.Tensor  # (b, t) the ratio's denominator
    ref_logprobs: torch.Tensor | None  # (b, t) for the k3 term, or None
    advantages: torch.Tensor  # (b,)
    weights: torch.Tensor | None  # (b, t) truncated importance weights, or None
    size: int  # rollouts in the mini-batch
    tokens: torch.Tensor  # real response tokens in the mini-batch, ()
    sums: WeightedSum  # the mini-batch's statistics
