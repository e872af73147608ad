"""Online DPO: sample k completions per prompt, score them, train DPO on the best against the worst.

Sources:
    * Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback" (online DPO).
    * Noukhovitch et al. 2025, "Asynchronous RLHF" (ICLR 2025), Sec. 3-4 and their code
      (github.com/mnoukhov/async_rlhf, a fork of TRL 0.11's ``OnlineDPOTrainer``): sampling
      temperature applied to the training logits, truncation after the stop token, the
      missing-EOS penalty that *replaces* the score, several updates per generated batch
      (``num_mini_batches`` x ``num_epochs``), reference KL through ``beta``.
    * Loss: :func:`lightning_rlhf.losses.online_dpo_loss` (Rafailov et al. 2023, eq. 7) or
      :func:`lightning_rlhf.losses.online_ipo_loss` (Azar et al. 2024).

Deviations:
    * With ``k > 2`` the pair is the highest- against the lowest-scored completion (the paper
      uses k = 2, where this is the same pair). Prompts whose k scores all tie give a zero
      gradient, as in the reference code.
    * Completions are dropped after the stop token instead of padded.
"""

from __future__ import annotations

from typing import Literal

import torch
from typing_extensions import override

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.losses import online_dpo_loss, online_ipo_loss
from lightning_rlhf.modules.base import RLModuleBase
from lightning_rlhf.rollout_batch import RolloutBatch, minibatches, response_logprobs

_LOSSES = {"sigmoid": online_dpo_loss, "ipo": online_ipo_loss}


class OnlineDPO(RLModuleBase):
    """Online DPO with ``k`` samples per prompt, best against worst by reward.

    ``num_mini_batches`` splits a generated batch's prompts (one pair each).

    Args:
        beta: DPO's inverse temperature; larger keeps the policy closer to the reference.
        loss_type: ``"sigmoid"`` (DPO) or ``"ipo"``.
        k: Completions sampled per prompt (at least 2).
        **kwargs: The arguments every RL module takes (policy, reward, optimizer, ...; see :class:`RLModuleBase`).

    Raises:
        ConfigError: If ``k < 2`` or ``beta <= 0``, and as :class:`RLModuleBase`.
    """

    mini_batch_unit = "prompt"

    def __init__(
        self, beta: float = 0.1, loss_type: Literal["sigmoid", "ipo"] = "sigmoid", k: int = 2, **kwargs
    ) -> None:
        if k < 2:
            raise ConfigError(
                f"Online DPO needs at least two completions per prompt to form a pair, got k={k}; set k >= 2."
            )
        if beta <= 0:
            raise ConfigError(f"beta must be positive, got {beta}.")
        if loss_type not in _LOSSES:
            raise ConfigError(f"Unknown loss_type {loss_type!r}; choose one of {', '.join(_LOSSES)}.")
        super().__init__(k=k, **kwargs)
        self.beta, self.loss_fn = beta, _LOSSES[loss_type]

    @override
    def learn(self, rollouts: RolloutBatch, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        k, temperature = self.sampling.k, self.sampling.temperature
        n = len(rollouts) // k
        scores = scores.view(n, k)  # (n, k)
        offsets = torch.arange(n, device=self.device) * k
        chosen = offsets + scores.argmax(dim=1)  # (n,) rollout index of the best completion
        rejected = offsets + scores.argmin(dim=1)  # (n,) and of the worst
        pairs = torch.cat([chosen, rejected])  # (2n,) the only rollouts trained on
        with torch.no_grad():
            ref_logps = response_logprobs(self.ref_policy, rollouts[pairs], temperature).sum(-1)  # (2n,)

        for epoch in range(self.num_epochs):
            for mb in minibatches(n, self.num_mini_batches):
                mb = mb.to(self.device)
                idx = torch.cat([mb, mb + n])  # (2m,) positions in `pairs`: chosen, then rejected
                logps = response_logprobs(self.policy, rollouts[pairs[idx]], temperature).sum(-1)  # (2m,)
                m = len(mb)
                loss, stats = self.loss_fn(logps[:m], logps[m:], ref_logps[mb], ref_logps[mb + n], self.beta)
                self.optimizer_step_on(loss)
                if epoch == 0:  # on-policy estimate of KL(pi || ref) from the pairs, before this step's update
                    kl = (logps.detach() - ref_logps[idx]).mean()

        return {
            "train/loss": loss.detach(),
            "train/accuracy": stats.accuracy,
            "train/chosen_rewards": stats.chosen_rewards.mean(),
            "train/rejected_rewards": stats.rejected_rewards.mean(),
            "objective/scores_margin": (scores.max(1).values - scores.min(1).values).mean(),
            "objective/kl": kl,
        }
