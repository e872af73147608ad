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

import time
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_rlhf.generation import SamplingConfig, TransformersBackend
from lightning_rlhf.generation.rollouts import LocalRollouts
from lightning_rlhf.losses import online_dpo_loss, online_ipo_loss
from lightning_rlhf.models import ConfigError, freeze, load_policy, load_tokenizer, prompt_token_ids, resolve_source
from lightning_rlhf.modules.checkpointing import RolloutCheckpointing
from lightning_rlhf.rewards import RewardFunction, RewardModelScore
from lightning_rlhf.rollout import build_rollout_batch, check_num_mini_batches, minibatches, response_logprobs, score_rollouts

_LOSSES = {"sigmoid": online_dpo_loss, "ipo": online_ipo_loss}


class OnlineDPO(RolloutCheckpointing, L.LightningModule):
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
        num_mini_batches: Optimizer steps per epoch over each generated batch.
        num_epochs: Passes over each generated batch.
        gradient_clip_val: Max gradient norm; ``None`` disables clipping.

    Raises:
        ConfigError: If ``k < 2``, ``beta <= 0``, ``temperature <= 0``, or a model path does not exist.
    """

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
        super().__init__()
        if k < 2:
            raise ConfigError(f"Online DPO needs at least two completions per prompt to form a pair, got k={k}; set k >= 2.")
        if beta <= 0:
            raise ConfigError(f"beta must be positive, got {beta}.")
        if temperature <= 0:
            raise ConfigError(f"temperature must be positive (sampling is stochastic), got {temperature}.")
        if loss_type not in _LOSSES:
            raise ConfigError(f"Unknown loss_type {loss_type!r}; choose one of {', '.join(_LOSSES)}.")
        if num_mini_batches < 1 or num_epochs < 1:
            raise ConfigError(f"num_mini_batches and num_epochs must be at least 1, got {num_mini_batches} and {num_epochs}.")
        for source in (policy, ref_policy):
            if source is not None and not source.startswith("builtin:"):
                resolve_source(source, "policy model")
        self.save_hyperparameters(ignore=["reward", "optimizer"])
        self.automatic_optimization = False
        self.policy_source, self.ref_source = policy, ref_policy or policy
        self.reward = reward if reward is not None else RewardModelScore()
        self.optimizer_factory = optimizer
        self.beta, self.loss_fn = beta, _LOSSES[loss_type]
        self.sampling = SamplingConfig(k=k, temperature=temperature, max_new_tokens=max_new_tokens)
        self.missing_eos_penalty = missing_eos_penalty
        self.num_mini_batches, self.num_epochs = num_mini_batches, num_epochs
        self.gradient_clip_val = gradient_clip_val
        self.policy: torch.nn.Module | None = None
        self.policy_version = 0  # generated batches trained on; what rollout staleness is counted in
        self.batches_drawn = 0  # prompt batches taken from the data loader (some may still be in flight)
        self.last_generations, self.last_rows = None, None
        self._resubmit: list[list[dict]] = []
        self.mean_score = MeanMetric()

    @override
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self.tokenizer = load_tokenizer(self.policy_source)
        self.policy = load_policy(self.policy_source).train()
        self.ref_policy = freeze(load_policy(self.ref_source))
        self.generation_seed = torch.initial_seed()
        backend = TransformersBackend(self.policy, [self.tokenizer.eos_token_id], self.tokenizer.pad_token_id, seed=self.generation_seed)
        self.local_rollouts = LocalRollouts(backend)

    @property
    def rollouts(self):
        """The asynchronous strategy's rollout source when there is one, else in-process generation."""
        strategy_rollouts = getattr(self._trainer.strategy, "rollouts", None) if self._trainer is not None else None
        return strategy_rollouts if strategy_rollouts is not None else self.local_rollouts

    @override
    def setup(self, stage: str) -> None:
        self.configure_model()
        check_num_mini_batches(self._trainer, self.num_mini_batches, per_prompt=1)
        self.reward.setup(self.device)

    @override
    def configure_optimizers(self):
        return self.optimizer_factory(self.policy.parameters())

    @override
    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        optimizer = self.optimizers()
        self.draw_batch()
        start = time.perf_counter()
        ready = self.rollouts.step(batch, self.prompt_ids(batch), self.sampling, self.policy_version)
        if ready is None:
            return  # asynchronous: the pipeline is still filling up
        batch, generations = ready
        train_start = time.perf_counter()
        rollout_seconds = train_start - start
        staleness = self.policy_version - generations.policy_version  # versions between sampler and learner
        self.last_generations, self.last_rows = generations, batch
        n, k = len(batch), self.sampling.k
        rollouts = build_rollout_batch(generations, self.tokenizer.pad_token_id).to(self.device)
        scores, _, _ = score_rollouts(self.reward, self.tokenizer, generations, batch, self.missing_eos_penalty)
        scores = scores.to(self.device).view(n, k)  # (n, k)
        offsets = torch.arange(n, device=self.device) * k
        chosen = offsets + scores.argmax(dim=1)  # (n,) rollout index of the best completion
        rejected = offsets + scores.argmin(dim=1)  # (n,) and of the worst
        pairs = torch.cat([chosen, rejected])  # (2n,) the only rollouts trained on
        with torch.no_grad():
            ref_logps = response_logprobs(self.ref_policy, rollouts[pairs], self.sampling.temperature).sum(-1)  # (2n,)

        for epoch in range(self.num_epochs):
            for mb in minibatches(n, self.num_mini_batches):
                mb = mb.to(self.device)
                idx = torch.cat([mb, mb + n])  # (2m,) positions in `pairs`: chosen, then rejected
                logps = response_logprobs(self.policy, rollouts[pairs[idx]], self.sampling.temperature).sum(-1)  # (2m,)
                m = len(mb)
                loss, stats = self.loss_fn(logps[:m], logps[m:], ref_logps[mb], ref_logps[mb + n], self.beta)
                optimizer.zero_grad()
                self.manual_backward(loss)
                if self.gradient_clip_val is not None:
                    self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
                optimizer.step()
                if epoch == 0:  # on-policy estimate of KL(pi || ref) from the pairs, before this step's update
                    kl = (logps.detach() - ref_logps[idx]).mean()

        self.policy_version += 1
        self.mean_score(scores.mean())
        self.log_dict(
            {
                "train/loss": loss.detach(),
                "train/accuracy": stats.accuracy,
                "train/chosen_rewards": stats.chosen_rewards.mean(),
                "train/rejected_rewards": stats.rejected_rewards.mean(),
                "objective/scores": scores.mean(),
                "objective/scores_margin": (scores.max(1).values - scores.min(1).values).mean(),
                "objective/kl": kl,
                "rollout/eos_rate": rollouts.finished.float().mean(),
                "rollout/response_length": rollouts.response_mask.sum(-1).float().mean(),
                "rollout/staleness": float(staleness),
                "timing/rollout_seconds": rollout_seconds,
                "timing/train_seconds": time.perf_counter() - train_start,
            },
            batch_size=n,
        )
        self.log("objective/scores_running", self.mean_score, prog_bar=True, batch_size=n)

    def prompt_ids(self, rows: list[dict]) -> list[list[int]]:
        return prompt_token_ids(self.tokenizer, [r["prompt"] for r in rows])
