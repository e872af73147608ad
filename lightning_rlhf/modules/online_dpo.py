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

from functools import partial
from typing import Literal

import torch
from typing_extensions import override

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.losses import online_dpo_loss, online_ipo_loss
from lightning_rlhf.modules.accumulation import WeightedSum
from lightning_rlhf.modules.base import RLModuleBase
from lightning_rlhf.rollout_batch import RolloutBatch, in_micro_batches, micro_batches, minibatches
from lightning_rlhf.rollout_forwards import response_logprobs

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
    sequences_per_unit = 2  # a pair runs in one forward: micro_batch_size counts its two sequences

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
        k = self.sampling.k
        n = len(rollouts) // k
        scores = scores.view(n, k)  # (n, k)
        offsets = torch.arange(n, device=self.device) * k
        best, worst = offsets + scores.argmax(dim=1), offsets + scores.argmin(dim=1)  # (n,) rollout indices
        pairs = rollouts[torch.stack([best, worst], dim=1).flatten()]  # (2n,) the only rollouts trained on, paired
        with torch.no_grad():
            ref_logps = in_micro_batches(
                partial(self.sequence_logprobs, self.ref_policy), pairs, self.micro_batch_size
            ).view(n, 2)  # (n, 2): chosen, rejected

        pairs_per_pass = None if self.micro_batch_size is None else self.micro_batch_size // 2
        for epoch in range(self.num_epochs):
            for mb in minibatches(n, self.num_mini_batches):
                sums = WeightedSum()
                chunks = micro_batches(mb.to(self.device), pairs_per_pass)
                self.optimizer_step_over(chunks, partial(self._pair_loss, pairs, ref_logps, len(mb), sums))
                if epoch == 0:  # on-policy estimate of KL(pi || ref) from the pairs, before this step's update
                    kl = sums.totals["kl"]

        return {
            "train/loss": sums.totals["loss"],
            "train/accuracy": sums.totals["accuracy"],
            "train/chosen_rewards": sums.totals["chosen_rewards"],
            "train/rejected_rewards": sums.totals["rejected_rewards"],
            "objective/scores_margin": (scores.max(1).values - scores.min(1).values).mean(),
            "objective/kl": kl,
        }

    def sequence_logprobs(self, model: torch.nn.Module, rollouts: RolloutBatch) -> torch.Tensor:
        """Each rollout's summed response logprob under ``model`` at the sampling temperature, (b,)."""
        return response_logprobs(model, rollouts, self.sampling.temperature).sum(-1)

    def _pair_loss(
        self, pairs: RolloutBatch, ref_logps: torch.Tensor, mini_batch: int, sums: WeightedSum, chunk: torch.Tensor
    ) -> torch.Tensor:
        """The DPO loss of the pairs ``chunk`` (c,), weighted by their share of the ``mini_batch`` pairs."""
        rows = torch.stack([2 * chunk, 2 * chunk + 1], dim=1).flatten()  # (2c,) each pair's chosen, rejected
        logps = self.sequence_logprobs(self.policy, pairs[rows]).view(-1, 2)  # (c, 2)
        ref = ref_logps[chunk]  # (c, 2)
        loss, stats = self.loss_fn(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], self.beta)
        share = len(chunk) / mini_batch
        sums.add(
            share,
            loss=loss,
            accuracy=stats.accuracy,
            chosen_rewards=stats.chosen_rewards.mean(),
            rejected_rewards=stats.rejected_rewards.mean(),
            kl=(logps.detach() - ref).mean(),
        )
        return loss * share
