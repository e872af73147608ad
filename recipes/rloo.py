"""RLOO as a standalone Lightning Fabric script.

    python recipes/rloo.py --train.steps 80
    python recipes/rloo.py --rollout.max_staleness 1     # asynchronous: a generator process one version behind
    python recipes/rloo.py --help

The same library pieces as the ``RLOO`` LightningModule -- the generation backend,
rewards, rollout tensors, :func:`lightning_rlhf.losses.rloo_advantages` and
:func:`lightning_rlhf.losses.ppo_policy_loss` -- in a plain loop: sample k
completions per prompt, shape the score with the sequence KL, take the
leave-one-out advantage and make one clipped policy-gradient step. Gold win
rate and KL to the SFT policy are measured before and after when the built-in
task is used. The arguments and the loop every recipe shares are in
``recipes/shared.py``; the algorithm is :func:`update`.

Differs from the ``RLOO`` LightningModule:
    * One update per generated batch, on all of it (the module takes ``num_mini_batches`` x ``num_epochs``).
    * No ``normalize_advantages`` (the module's option, off by default).
    * Logs only the loss, clip fraction, score, KL and staleness.
    * And what every recipe does differently (``recipes/shared.py``): AdamW, a frozen reference, no checkpoint.
"""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
from jsonargparse import CLI
from lightning.fabric.loggers import CSVLogger

from lightning_rlhf.losses import kl_k1, ppo_policy_loss, rloo_advantages
from lightning_rlhf.modules.accumulation import WeightedSum, check_micro_batch_size
from lightning_rlhf.rollout_batch import RolloutBatch, in_micro_batches, micro_batches
from lightning_rlhf.rollout_forwards import response_logprobs
from lightning_rlhf.tasks.copy import prepare
from shared import Learner, RolloutArgs, RolloutLoop, RunArgs, ScoredBatch, TrainArgs, check_k, load_models


def setup(
    kl_coef: float = 0.05,
    clip_eps: float = 0.2,
    # frozen dataclasses, so one default instance is safe to share (ruff cannot see that across modules)
    train: TrainArgs = TrainArgs(),  # noqa: B008
    rollout: RolloutArgs = RolloutArgs(),  # noqa: B008
    run: RunArgs = RunArgs(),  # noqa: B008
) -> None:
    """Train a policy with RLOO, one optimizer step per generated batch (``--rollout.k`` at least 2).

    Args:
        kl_coef: Weight of the sequence KL to the reference in the reward.
        clip_eps: Clipping of the sequence ratio.
    """
    check_k(rollout.k, 2, "RLOO needs at least two completions per prompt for the leave-one-out baseline")
    check_micro_batch_size(train.micro_batch_size)
    prepare()  # the built-in task, once (its eval prompts and gold reward are used by --run.evaluate)
    fabric = L.Fabric(accelerator=run.accelerator, devices=run.devices, loggers=CSVLogger(run.out_dir, "rloo"))
    fabric.launch(main, kl_coef, clip_eps, train, rollout, run)


def main(
    fabric: L.Fabric, kl_coef: float, clip_eps: float, train: TrainArgs, rollout: RolloutArgs, run: RunArgs
) -> None:
    tokenizer, model, ref_policy = load_models(fabric, run)
    policy, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=train.lr))
    learner = Learner(fabric, policy, ref_policy, optimizer, train, rollout)
    with RolloutLoop(fabric, model, ref_policy, tokenizer, train.steps, train, rollout, run) as batches:
        for step, batch in enumerate(batches, start=1):
            batches.log(step, batch, update(learner, batch, kl_coef, clip_eps))


def update(learner: Learner, batch: ScoredBatch, kl_coef: float, clip_eps: float) -> dict[str, torch.Tensor]:
    """One clipped policy-gradient step with the leave-one-out advantage; returns the step's metrics.

    ``b = n * k`` rollouts; the loss is a mean over sequences, each one "token" of ``ppo_policy_loss``.
    """
    rollouts, size, b = batch.rollouts, learner.train.micro_batch_size, len(batch.rollouts)

    def logps_of(model: torch.nn.Module, rows: RolloutBatch) -> torch.Tensor:  # (b,) summed at the sampling temperature
        return response_logprobs(model, rows, learner.rollout.temperature).sum(-1)

    with torch.no_grad():
        old_logps = in_micro_batches(partial(logps_of, learner.policy), rollouts, size)  # (b,)
        ref_logps = in_micro_batches(partial(logps_of, learner.ref_policy), rollouts, size)  # (b,)
        kl = kl_k1(old_logps, ref_logps)  # (b,)
        advantages = rloo_advantages((batch.scores - kl_coef * kl).view(-1, learner.rollout.k)).flatten()  # (b,)
    sums = WeightedSum()

    def loss_of(chunk: torch.Tensor) -> torch.Tensor:  # (c,) rollout indices
        logps = logps_of(learner.policy, rollouts[chunk])[:, None]  # (c, 1)
        ones = torch.ones_like(logps)  # (c, 1): every sequence counts
        loss, stats = ppo_policy_loss(logps, old_logps[chunk, None], advantages[chunk, None], ones, clip_eps)
        share = len(chunk) / b  # the loss is a mean over sequences
        sums.add(share, loss=loss, clipfrac=stats.clipfrac)
        return loss * share

    learner.optimizer_step(micro_batches(torch.arange(b, device=kl.device), size), loss_of)
    return {"train/loss": sums.totals["loss"], "train/clipfrac": sums.totals["clipfrac"], "objective/kl": kl.mean()}


if __name__ == "__main__":
    CLI(setup)
