"""PPO as a standalone Lightning Fabric script.

    python recipes/ppo.py --steps 80
    python recipes/ppo.py --max_staleness 1     # asynchronous: a generator process one version behind
    python recipes/ppo.py --help

The same library pieces as the ``PPO`` LightningModule -- the generation backend,
rewards, rollout tensors, a critic started from the reward model, and the losses
:func:`~lightning_rlhf.losses.kl_penalized_rewards`, :func:`~lightning_rlhf.losses.gae`,
:func:`~lightning_rlhf.losses.ppo_policy_loss` and :func:`~lightning_rlhf.losses.clipped_value_loss`
-- in a plain loop with ``num_epochs`` clipped updates per generated batch. Gold win rate
and KL to the SFT policy are measured before and after when the built-in task is used.

Differs from the ``PPO`` LightningModule:
    * ``num_epochs`` updates per generated batch, each on all of it (the module splits it into ``num_mini_batches``).
    * ``clip_eps`` also clips the values (the module has a separate ``value_clip_eps``, 0.2 by default).
    * Fixed where the module has options: ``gamma`` = 1, the k1 KL estimator, whitened advantages, AdamW,
      gradients clipped to norm 1.0, a separate critic loaded from ``--reward_model`` (no ``critic=None`` value head).
    * The reference is a frozen copy of ``--policy`` and the reward a reward model (the module also takes
      another ``ref_policy`` and any ``RewardFunction``, e.g. a rule).
    * ``max_new_tokens`` defaults to 10, sized for the built-in task (the module's: 53).
    * Logs only the loss, clip fraction, score, KL and staleness; keeps no checkpoint, so it cannot resume.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from jsonargparse import CLI
from lightning.fabric.loggers import CSVLogger
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lightning_rlhf.callbacks.evaluation import evaluate_policy
from lightning_rlhf.data import PromptDataModule, load_rows
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.generation import RolloutSource, SamplingConfig
from lightning_rlhf.generation.pipeline import start_source
from lightning_rlhf.losses import clipped_value_loss, gae, kl_penalized_rewards, masked_whiten, ppo_policy_loss
from lightning_rlhf.models import freeze, load_policy, load_reward_model, load_tokenizer
from lightning_rlhf.rewards import RewardModelScore
from lightning_rlhf.rollout_batch import build_rollout_batch, critic_values, response_logprobs, score_rollouts
from lightning_rlhf.tasks.copy import CopyGoldReward, prepare
from lightning_rlhf.tokens import prompt_token_ids


@dataclass(frozen=True)
class TrainArgs:
    """PPO's training hyper-parameters (documented in :func:`setup`)."""

    steps: int
    num_epochs: int
    batch_size: int
    kl_coef: float
    clip_eps: float
    vf_coef: float
    lam: float
    lr: float
    sampling: SamplingConfig
    missing_eos_penalty: float | None

    def __post_init__(self) -> None:
        if self.sampling.k < 1:
            raise ConfigError(
                f"k is the number of completions per prompt and must be at least 1, got {self.sampling.k}."
            )


def setup(
    policy: str = "builtin:sft",
    reward_model: str = "builtin:reward_model",
    dataset: str = "builtin:prompts",
    prompt_column: str = "prompt",
    steps: int = 80,
    num_epochs: int = 4,
    batch_size: int = 32,
    k: int = 1,
    kl_coef: float = 0.05,
    clip_eps: float = 0.2,
    vf_coef: float = 0.1,
    lam: float = 0.95,
    lr: float = 1e-4,
    temperature: float = 0.7,
    max_new_tokens: int = 10,
    missing_eos_penalty: float | None = -1.0,
    max_staleness: int | None = None,
    backend: str = "transformers",
    generator_device: str | None = None,
    evaluate: bool = True,
    out_dir: str = "runs/fabric/ppo",
    log_prompts: bool = False,
    accelerator: str = "cpu",
    devices: int = 1,
    seed: int = 0,
) -> None:
    """Train a policy with PPO.

    Args:
        policy: Hub id, local directory or ``builtin:sft``.
        reward_model: Reward model (hub id, local directory or ``builtin:reward_model``).
        dataset: Prompt dataset (hub id, local file or ``builtin:prompts``).
        prompt_column: Column with the prompt text.
        steps: Optimizer steps (``num_epochs`` per generated batch).
        num_epochs: PPO epochs per generated batch.
        batch_size: Prompts per batch.
        k: Completions per prompt.
        kl_coef: Weight of the per-token KL penalty.
        clip_eps: Clipping of the policy ratio and of the values.
        vf_coef: Weight of the value loss.
        lam: GAE lambda (gamma is 1).
        lr: AdamW learning rate.
        temperature: Sampling temperature, also applied to the training logits.
        max_new_tokens: Longest completion.
        missing_eos_penalty: Score of a completion without eos (None keeps the reward).
        max_staleness: ``None`` generates in this process with the current weights; ``N`` runs a
            generator process that samples up to ``N`` policy versions behind (1: the paper's async).
        backend: Generator process backend, ``transformers`` or ``vllm``.
        generator_device: Device of the generator process (e.g. ``cuda:1``); default: the policy's.
        evaluate: Measure gold win rate and KL before and after (built-in task only).
        out_dir: Where the CSV metrics go.
        log_prompts: Write each rank's trained prompts to ``<out_dir>/trained_prompts_rank<r>.jsonl``, a line per batch.
        accelerator: Fabric accelerator.
        devices: Fabric devices.
        seed: Random seed.
    """
    train = TrainArgs(
        steps=steps,
        num_epochs=num_epochs,
        batch_size=batch_size,
        kl_coef=kl_coef,
        clip_eps=clip_eps,
        vf_coef=vf_coef,
        lam=lam,
        lr=lr,
        sampling=SamplingConfig(k=k, temperature=temperature, max_new_tokens=max_new_tokens),
        missing_eos_penalty=missing_eos_penalty,
    )
    prepare()  # the built-in task, once (its eval prompts and gold reward are used by --evaluate)
    fabric = L.Fabric(accelerator=accelerator, devices=devices, loggers=CSVLogger(out_dir, name="ppo"))
    fabric.launch(
        main,
        train,
        policy,
        reward_model,
        dataset,
        prompt_column,
        max_staleness,
        backend,
        generator_device,
        evaluate,
        out_dir,
        log_prompts,
        seed,
    )


def main(
    fabric: L.Fabric,
    train: TrainArgs,
    policy: str,
    reward_model: str,
    dataset: str,
    prompt_column: str,
    max_staleness: int | None,
    backend: str,
    generator_device: str | None,
    evaluate: bool,
    out_dir: str,
    log_prompts: bool,
    seed: int,
) -> None:
    fabric.seed_everything(seed)
    data = PromptDataModule(dataset, prompt_column=prompt_column, batch_size=train.batch_size, seed=seed)
    tokenizer = load_tokenizer(policy)
    model = load_policy(policy).train()
    ref_policy = freeze(load_policy(policy)).to(fabric.device)
    reward = RewardModelScore(reward_model)
    reward.setup(fabric.device)
    critic_model = load_reward_model(reward_model).train()  # the paper starts the critic from the reward model
    optimizer = torch.optim.AdamW([*model.parameters(), *critic_model.parameters()], lr=train.lr)
    fabric_policy, critic = fabric.setup_module(model), fabric.setup_module(critic_model)
    optimizer = fabric.setup_optimizers(optimizer)
    loader = fabric.setup_dataloaders(
        data.dataloader(fabric.world_size, fabric.global_rank)
    )  # each rank its own prompts
    source = start_source(
        model, tokenizer, policy, max_staleness, backend=backend, seed=seed, generator_device=generator_device
    )
    prompts_log = Path(out_dir, f"trained_prompts_rank{fabric.global_rank}.jsonl") if log_prompts else None
    if prompts_log is not None:
        prompts_log.parent.mkdir(parents=True, exist_ok=True)
        prompts_log.write_text("")  # this run's batches only

    gold_rows = [dict(r) for r in load_rows("builtin:eval_prompts")] if evaluate else []
    if gold_rows:
        before = evaluate_policy(model, ref_policy, tokenizer, CopyGoldReward(), gold_rows, train.sampling, seed=1234)
        fabric.print(f"before: {before}")
    try:
        fit(fabric, fabric_policy, critic, ref_policy, optimizer, source, reward, tokenizer, loader, train, prompts_log)
    finally:
        source.close()
    if gold_rows:
        after = evaluate_policy(model, ref_policy, tokenizer, CopyGoldReward(), gold_rows, train.sampling, seed=1234)
        fabric.log_dict(after, step=train.steps)
        fabric.print(f"after: {after}")
        fabric.print(
            f"gold win rate: {before['eval/gold_win_rate']:.3f} -> {after['eval/gold_win_rate']:.3f}; KL to reference: {after['eval/kl']:.3f}"
        )
    fabric.logger.finalize("success")


def fit(
    fabric: L.Fabric,
    policy: torch.nn.Module,
    critic: torch.nn.Module,
    ref_policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    source: RolloutSource,
    reward: RewardModelScore,
    tokenizer: PreTrainedTokenizerBase,
    loader: DataLoader,
    train: TrainArgs,
    prompts_log: Path | None,
) -> None:
    sampling = train.sampling
    share = sampling.k > 1  # a prompt's samples run it through the model once (rollout_batch.response_logprobs)
    step, version, start = 0, 0, time.perf_counter()
    while step < train.steps:
        for batch in loader:
            ready = source.step(batch, prompt_token_ids(tokenizer, [r["prompt"] for r in batch]), sampling, version)
            if ready is None:
                continue  # asynchronous: the generator is filling the pipeline
            batch, generations = ready
            staleness = version - generations.policy_version  # versions between sampling and this update (0: on-policy)
            rollouts = build_rollout_batch(generations, tokenizer.pad_token_id).to(fabric.device)
            scores, _, _ = score_rollouts(reward, tokenizer, generations, batch, train.missing_eos_penalty)
            scores = scores.to(fabric.device)  # (b,)
            mask = rollouts.response_mask  # (b, t)
            with torch.no_grad():
                old_logprobs = response_logprobs(policy, rollouts, sampling.temperature, share)  # (b, t)
                old_values = critic_values(critic, rollouts)  # (b, t)
                ref_logprobs = response_logprobs(ref_policy, rollouts, sampling.temperature, share)  # (b, t)
                rewards, kl = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, train.kl_coef)  # (b, t)
                advantages, returns = gae(rewards, old_values, mask, gamma=1.0, lam=train.lam)  # (b, t)
                advantages = masked_whiten(advantages, mask)
            for _ in range(train.num_epochs):
                logprobs, values = (
                    response_logprobs(policy, rollouts, sampling.temperature, share),
                    critic_values(critic, rollouts),
                )
                policy_loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, train.clip_eps)
                value_loss, _ = clipped_value_loss(values, old_values, returns, mask, train.clip_eps)
                loss = policy_loss + train.vf_coef * value_loss
                optimizer.zero_grad()
                fabric.backward(loss)
                fabric.clip_gradients(policy, optimizer, max_norm=1.0)
                optimizer.step()
                step += 1
            version += 1
            source.after_update(version)  # refreshes the generator (a no-op when generating in this process)
            metrics = {
                "train/loss": loss.item(),
                "train/clipfrac": stats.clipfrac.item(),
                "objective/scores": scores.mean().item(),
                "objective/kl": (kl * mask).sum(-1).mean().item(),
                "rollout/staleness": float(staleness),
            }
            fabric.log_dict(metrics, step=step)
            if prompts_log is not None:
                with prompts_log.open("a") as f:
                    f.write(json.dumps({"step": step, "prompts": [r["prompt"] for r in batch]}) + "\n")
            if step % 10 == 0 or step == train.steps:
                fabric.print(
                    f"step {step:4d}  loss {metrics['train/loss']:.4f}  score {metrics['objective/scores']:+.3f}  kl {metrics['objective/kl']:.3f}  {time.perf_counter() - start:.1f}s"
                )
            if step >= train.steps:
                return


if __name__ == "__main__":
    CLI(setup)
