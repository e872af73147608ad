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

Deviations:
    * Completions are dropped after the stop token instead of padded.
    * ``normalize_advantages`` whitens over the whole generated batch (TRL 0.11 option, off by default).
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_rlhf.generation import SamplingConfig, TransformersBackend
from lightning_rlhf.generation.rollouts import LocalRollouts
from lightning_rlhf.losses import kl_k1, ppo_policy_loss, rloo_advantages
from lightning_rlhf.models import ConfigError, freeze, load_policy, load_tokenizer, prompt_token_ids, resolve_source
from lightning_rlhf.modules.checkpointing import RolloutCheckpointing
from lightning_rlhf.rewards import RewardFunction, RewardModelScore
from lightning_rlhf.rollout import build_rollout_batch, check_num_mini_batches, minibatches, response_logprobs, score_rollouts


class RLOO(RolloutCheckpointing, L.LightningModule):
    """REINFORCE Leave-One-Out with a KL-shaped reward and PPO-style clipping.

    Args:
        policy: Hub id, local directory or ``"builtin:sft"`` of the SFT policy to train.
        reward: What scores completions (a reward model or a rule); default: the built-in proxy reward model.
        optimizer: Optimizer factory (``class_path``/``init_args`` in YAML).
        ref_policy: Reference policy for the KL; default: a frozen copy of ``policy``.
        kl_coef: Weight of the sequence KL to the reference, subtracted from the score.
        k: Completions sampled per prompt (at least 2).
        temperature: Sampling temperature, also applied to the training logits.
        max_new_tokens: Longest completion.
        missing_eos_penalty: Score that replaces the reward of a completion without the stop
            token; ``None`` keeps the reward.
        clip_eps: PPO clipping range of the sequence ratio.
        normalize_advantages: Whiten the advantages over the generated batch.
        num_mini_batches: Optimizer steps per epoch over each generated batch.
        num_epochs: Passes over each generated batch.
        gradient_clip_val: Max gradient norm; ``None`` disables clipping.

    Raises:
        ConfigError: If ``k < 2``, ``temperature <= 0``, or a model path does not exist.
    """

    def __init__(
        self,
        policy: str = "builtin:sft",
        reward: RewardFunction | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        ref_policy: str | None = None,
        kl_coef: float = 0.05,
        k: int = 4,
        temperature: float = 0.7,
        max_new_tokens: int = 53,
        missing_eos_penalty: float | None = -1.0,
        clip_eps: float = 0.2,
        normalize_advantages: bool = False,
        num_mini_batches: int = 1,
        num_epochs: int = 1,
        gradient_clip_val: float | None = 1.0,
    ) -> None:
        super().__init__()
        if k < 2:
            raise ConfigError(f"RLOO needs at least two completions per prompt for the leave-one-out baseline, got k={k}; set k >= 2.")
        if temperature <= 0:
            raise ConfigError(f"temperature must be positive (sampling is stochastic), got {temperature}.")
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
        self.kl_coef, self.clip_eps, self.normalize_advantages = kl_coef, clip_eps, normalize_advantages
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
        check_num_mini_batches(self._trainer, self.num_mini_batches, per_prompt=self.sampling.k)
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
        scores = scores.to(self.device)  # (b,)
        with torch.no_grad():
            old_logps = response_logprobs(self.policy, rollouts, self.sampling.temperature).sum(-1)  # (b,)
            ref_logps = response_logprobs(self.ref_policy, rollouts, self.sampling.temperature).sum(-1)  # (b,)
            kl = kl_k1(old_logps, ref_logps)  # (b,) sequence KL, k1 summed over tokens
            rewards = scores - self.kl_coef * kl  # (b,)
            advantages = rloo_advantages(rewards.view(n, k)).flatten()  # (b,)
            if self.normalize_advantages:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

        for _ in range(self.num_epochs):
            for mb in minibatches(n * k, self.num_mini_batches):
                mb = mb.to(self.device)
                logps = response_logprobs(self.policy, rollouts[mb], self.sampling.temperature).sum(-1)  # (m,)
                ones = torch.ones_like(logps)[:, None]  # (m, 1): one "token" per sequence
                loss, stats = ppo_policy_loss(logps[:, None], old_logps[mb, None], advantages[mb, None], ones, self.clip_eps)
                optimizer.zero_grad()
                self.manual_backward(loss)
                if self.gradient_clip_val is not None:
                    self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
                optimizer.step()

        self.policy_version += 1
        self.mean_score(scores.mean())
        self.log_dict(
            {
                "train/loss": loss.detach(),
                "train/clipfrac": stats.clipfrac,
                "train/approx_kl": stats.approx_kl,
                "train/ratio": stats.ratio,
                "objective/scores": scores.mean(),
                "objective/rlhf_reward": rewards.mean(),
                "objective/kl": kl.mean(),
                "objective/advantage_std": advantages.std(),
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
