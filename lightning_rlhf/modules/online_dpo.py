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
from lightning.pytorch.cli import OptimizerCallable
from typing_extensions import override

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.losses import online_dpo_loss, online_ipo_loss
from lightning_rlhf.modules.base import RLModuleBase
from lightning_rlhf.rewards import RewardFunction
from lightning_rlhf.rollout_batch import RolloutBatch, minibatches, response_logprobs

_LOSSES = {"sigmoid": online_dpo_loss, "ipo": online_ipo_loss}


class OnlineDPO(RLModuleBase):
    """Online DPO with ``k`` samples per prompt, best against worst by reward.

    Args:
        policy: Hub id, local directory or ``"builtin:sft"`` of the SFT policy to train.
        reward: What scores completions (a reward model or a rule); default: the built-in proxy reward model.
        optimizer: Optimizer factory (``class_path``/``init_args`` in YAML).
        ref_policy: Reference policy for the KL; default: a frozen copy of ``policy``.
        beta: DPO's inverse temperature; larger keeps the policy closer to the reference.
        loss_type: ``"sigmoid"`` (DPO) or ``"ipo"``.
        k: Completions sampled per prompt (at least 2).
        temperature: Sampling temperature, also applied to the training logits.
        max_new_tokens: Longest completion.
        missing_eos_penalty: Score that replaces the reward of a completion without the stop
            token; ``None`` keeps the reward.
        num_mini_batches: Optimizer steps per epoch over each generated batch (splitting its prompts).
        num_epochs: Passes over each generated batch.
        gradient_clip_val: Max gradient norm; ``None`` disables clipping.

    Raises:
        ConfigError: If ``k < 2``, ``beta <= 0``, ``temperature <= 0``, or a model path does not exist.
    """

    mini_batch_unit = "prompt"

    def __init__(
        self,
        policy: str = "builtin:sft",
        reward: RewardFunction | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        ref_policy: str | None = None,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
        k: int = 2,
        temperature: float = 0.7,
        max_new_tokens: int = 53,
        missing_eos_penalty: float | None = -1.0,
        num_mini_batches: int = 1,
        num_epochs: int = 1,
        gradient_clip_val: float | None = 1.0,
    ) -> None:
        if k < 2:
            raise ConfigError(f"Online DPO needs at least two completions per prompt to form a pair, got k={k}; set k >= 2.")
        if beta <= 0:
            raise ConfigError(f"beta must be positive, got {beta}.")
        if loss_type not in _LOSSES:
            raise ConfigError(f"Unknown loss_type {loss_type!r}; choose one of {', '.join(_LOSSES)}.")
        super().__init__(
            policy=policy, reward=reward, optimizer=optimizer, ref_policy=ref_policy, k=k, temperature=temperature, max_new_tokens=max_new_tokens,
            missing_eos_penalty=missing_eos_penalty, num_mini_batches=num_mini_batches, num_epochs=num_epochs, gradient_clip_val=gradient_clip_val,
        )
        self.save_hyperparameters(ignore=["reward", "optimizer"])
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
