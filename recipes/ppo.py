"""PPO as a standalone Lightning Fabric script.

    python recipes/ppo.py --train.steps 80
    python recipes/ppo.py --rollout.max_staleness 1     # asynchronous: a generator process one version behind
    python recipes/ppo.py --help

The same library pieces as the ``PPO`` LightningModule -- the generation backend,
rewards, rollout tensors, a critic started from the reward model, and the losses
:func:`~lightning_rlhf.losses.kl_penalized_rewards`, :func:`~lightning_rlhf.losses.gae`,
:func:`~lightning_rlhf.losses.ppo_policy_loss` and :func:`~lightning_rlhf.losses.clipped_value_loss`
-- in a plain loop with ``num_epochs`` clipped updates per generated batch. Gold win rate
and KL to the SFT policy are measured before and after when the built-in task is used.
The arguments and the loop every recipe shares are in ``recipes/shared.py``; the
algorithm is :func:`update`.

Differs from the ``PPO`` LightningModule:
    * ``num_epochs`` updates per generated batch, each on all of it (the module splits it into ``num_mini_batches``).
    * ``clip_eps`` also clips the values (the module has a separate ``value_clip_eps``, 0.2 by default).
    * Fixed where the module has options: ``gamma`` = 1, the k1 KL estimator, whitened advantages, a separate
      critic loaded from ``--run.reward_model`` (no ``critic=None`` value head).
    * Logs only the loss, clip fraction, score, KL and staleness.
    * And what every recipe does differently (``recipes/shared.py``): AdamW, a frozen reference, no checkpoint.
"""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import torch
from jsonargparse import CLI
from lightning.fabric.loggers import CSVLogger

from lightning_rlhf.losses import clipped_value_loss, gae, kl_penalized_rewards, masked_whiten, ppo_policy_loss
from lightning_rlhf.models import load_reward_model
from lightning_rlhf.modules.accumulation import WeightedSum, check_micro_batch_size
from lightning_rlhf.rollout_batch import in_micro_batches, micro_batches
from lightning_rlhf.rollout_forwards import critic_values, response_logprobs
from lightning_rlhf.tasks.copy import prepare
from shared import Learner, RolloutArgs, RolloutLoop, RunArgs, ScoredBatch, TrainArgs, check_k, load_models


def setup(
    num_epochs: int = 4,
    kl_coef: float = 0.05,
    clip_eps: float = 0.2,
    vf_coef: float = 0.1,
    lam: float = 0.95,
    # frozen dataclasses, so one default instance is safe to share (ruff cannot see that across modules)
    train: TrainArgs = TrainArgs(),  # noqa: B008
    rollout: RolloutArgs = RolloutArgs(k=1),  # noqa: B008
    run: RunArgs = RunArgs(),  # noqa: B008
) -> None:
    """Train a policy and a critic with PPO, ``num_epochs`` optimizer steps per generated batch.

    The critic starts from ``--run.reward_model``.

    Args:
        num_epochs: PPO epochs (optimizer steps) per generated batch; ``--train.steps`` counts all of them.
        kl_coef: Weight of the per-token KL penalty.
        clip_eps: Clipping of the policy ratio and of the values.
        vf_coef: Weight of the value loss.
        lam: GAE lambda (gamma is 1).
    """
    check_k(rollout.k, 1, "PPO needs a completion per prompt at least")
    check_micro_batch_size(train.micro_batch_size)
    prepare()  # the built-in task, once (its eval prompts and gold reward are used by --run.evaluate)
    fabric = L.Fabric(accelerator=run.accelerator, devices=run.devices, loggers=CSVLogger(run.out_dir, "ppo"))
    fabric.launch(main, num_epochs, kl_coef, clip_eps, vf_coef, lam, train, rollout, run)


def main(
    fabric: L.Fabric,
    num_epochs: int,
    kl_coef: float,
    clip_eps: float,
    vf_coef: float,
    lam: float,
    train: TrainArgs,
    rollout: RolloutArgs,
    run: RunArgs,
) -> None:
    tokenizer, model, ref_policy = load_models(fabric, run)
    critic_model = load_reward_model(run.reward_model).train()  # the paper starts the critic from the reward model
    optimizer = torch.optim.AdamW([*model.parameters(), *critic_model.parameters()], lr=train.lr)
    policy, critic = fabric.setup_module(model), fabric.setup_module(critic_model)
    learner = Learner(fabric, policy, ref_policy, fabric.setup_optimizers(optimizer), train, rollout)
    num_batches = math.ceil(train.steps / num_epochs)
    with RolloutLoop(fabric, model, ref_policy, tokenizer, num_batches, train, rollout, run) as batches:
        for i, batch in enumerate(batches, start=1):
            metrics = update(learner, critic, batch, num_epochs, kl_coef, clip_eps, vf_coef, lam)
            batches.log(i * num_epochs, batch, metrics)


def update(
    learner: Learner,
    critic: torch.nn.Module,
    batch: ScoredBatch,
    num_epochs: int,
    kl_coef: float,
    clip_eps: float,
    vf_coef: float,
    lam: float,
) -> dict[str, torch.Tensor]:
    """``num_epochs`` PPO steps of the policy and the critic on one generated batch; returns the last one's metrics.

    The losses are means over the batch's real response tokens, so a micro-batch weighs by its share of them.
    """
    rollouts, size, mask = batch.rollouts, learner.train.micro_batch_size, batch.rollouts.response_mask  # (b, t)
    share_prompts = learner.rollout.k > 1  # a prompt's samples run it through the model once (response_logprobs)
    logprobs_of = partial(response_logprobs, temperature=learner.rollout.temperature, share_prompts=share_prompts)
    with torch.no_grad():
        old_logprobs = in_micro_batches(partial(logprobs_of, learner.policy), rollouts, size)  # (b, t)
        old_values = in_micro_batches(partial(critic_values, critic), rollouts, size)  # (b, t)
        ref_logprobs = in_micro_batches(partial(logprobs_of, learner.ref_policy), rollouts, size)  # (b, t)
        rewards, kl = kl_penalized_rewards(batch.scores, old_logprobs, ref_logprobs, mask, kl_coef)  # (b, t)
        advantages, returns = gae(rewards, old_values, mask, gamma=1.0, lam=lam)  # (b, t)
        advantages = masked_whiten(advantages, mask)
    tokens = mask.sum()

    def loss_of(sums: WeightedSum, chunk: torch.Tensor) -> torch.Tensor:  # chunk: (c,) rollout indices
        chunk_mask = mask[chunk]  # (c, t)
        logprobs, values = logprobs_of(learner.policy, rollouts[chunk]), critic_values(critic, rollouts[chunk])
        policy_loss, stats = ppo_policy_loss(logprobs, old_logprobs[chunk], advantages[chunk], chunk_mask, clip_eps)
        value_loss, _ = clipped_value_loss(values, old_values[chunk], returns[chunk], chunk_mask, clip_eps)
        loss = policy_loss + vf_coef * value_loss
        share = chunk_mask.sum() / tokens  # the losses are means over tokens
        sums.add(share, loss=loss, clipfrac=stats.clipfrac)
        return loss * share

    for _ in range(num_epochs):
        sums = WeightedSum()
        chunks = micro_batches(torch.arange(len(rollouts), device=mask.device), size)
        learner.optimizer_step(chunks, partial(loss_of, sums), also_trained=[critic])
    return {
        "train/loss": sums.totals["loss"],
        "train/clipfrac": sums.totals["clipfrac"],
        "objective/kl": (kl * mask).sum(-1).mean(),
    }


if __name__ == "__main__":
    CLI(setup)
