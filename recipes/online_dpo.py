"""Online DPO as a standalone Lightning Fabric script.

    python recipes/online_dpo.py --train.steps 80
    python recipes/online_dpo.py --rollout.max_staleness 1     # asynchronous: a generator process one version behind
    python recipes/online_dpo.py --help

The same library pieces as the ``OnlineDPO`` LightningModule -- the generation
backend, rewards, rollout tensors and :func:`lightning_rlhf.losses.online_dpo_loss`
-- in a plain loop: sample k completions per prompt, score them, train DPO on the
best against the worst. Gold win rate and KL to the SFT policy are measured
before and after when the built-in task is used. The arguments and the loop
every recipe shares are in ``recipes/shared.py``; the algorithm is :func:`update`.

Differs from the ``OnlineDPO`` LightningModule:
    * One optimizer step per generated batch (the module takes ``num_mini_batches`` x ``num_epochs``).
    * The sigmoid (DPO) loss only, no ``loss_type="ipo"``.
    * ``k`` defaults to 4, sized for the built-in task (the module's: 2).
    * Logs only the loss, accuracy, score, KL and staleness.
    * And what every recipe does differently (``recipes/shared.py``): AdamW, a frozen reference, no checkpoint.
"""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
from jsonargparse import CLI
from lightning.fabric.loggers import CSVLogger

from lightning_rlhf.losses import online_dpo_loss
from lightning_rlhf.modules.accumulation import WeightedSum, check_micro_batch_size
from lightning_rlhf.rollout_batch import RolloutBatch, in_micro_batches, micro_batches
from lightning_rlhf.rollout_forwards import response_logprobs
from lightning_rlhf.tasks.copy import prepare
from shared import Learner, RolloutArgs, RolloutLoop, RunArgs, ScoredBatch, TrainArgs, check_k, load_models


def setup(
    beta: float = 0.1,
    # frozen dataclasses, so one default instance is safe to share (ruff cannot see that across modules)
    train: TrainArgs = TrainArgs(),  # noqa: B008
    rollout: RolloutArgs = RolloutArgs(),  # noqa: B008
    run: RunArgs = RunArgs(),  # noqa: B008
) -> None:
    """Train a policy with online DPO, one optimizer step per generated batch.

    ``--rollout.k`` is at least 2; ``--train.micro_batch_size`` counts sequences, two per pair.

    Args:
        beta: DPO's KL strength.
    """
    check_k(rollout.k, 2, "Online DPO needs at least two completions per prompt to form a pair")
    check_micro_batch_size(train.micro_batch_size, unit=2)
    prepare()  # the built-in task, once (its eval prompts and gold reward are used by --run.evaluate)
    fabric = L.Fabric(accelerator=run.accelerator, devices=run.devices, loggers=CSVLogger(run.out_dir, "online_dpo"))
    fabric.launch(main, beta, train, rollout, run)


def main(fabric: L.Fabric, beta: float, train: TrainArgs, rollout: RolloutArgs, run: RunArgs) -> None:
    tokenizer, model, ref_policy = load_models(fabric, run)
    policy, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=train.lr))
    learner = Learner(fabric, policy, ref_policy, optimizer, train, rollout)
    with RolloutLoop(fabric, model, ref_policy, tokenizer, train.steps, train, rollout, run) as batches:
        for step, batch in enumerate(batches, start=1):
            batches.log(step, batch, update(learner, batch, beta))


def update(learner: Learner, batch: ScoredBatch, beta: float) -> dict[str, torch.Tensor]:
    """One DPO step on each prompt's best completion against its worst; returns the step's metrics.

    ``n`` prompts, ``k`` completions each; a pair's two sequences run in the same micro-batch.
    """
    n, k, size = len(batch.rows), learner.rollout.k, learner.train.micro_batch_size
    scores = batch.scores.view(n, k)  # (n, k)
    offsets = torch.arange(n, device=scores.device) * k
    chosen, rejected = offsets + scores.argmax(1), offsets + scores.argmin(1)  # (n,) rollout indices
    pairs = batch.rollouts[torch.stack([chosen, rejected], dim=1).flatten()]  # (2n,) each pair's chosen, rejected

    def logps_of(model: torch.nn.Module, rows: RolloutBatch) -> torch.Tensor:  # (b,) summed at the sampling temperature
        return response_logprobs(model, rows, learner.rollout.temperature).sum(-1)

    with torch.no_grad():
        ref_logps = in_micro_batches(partial(logps_of, learner.ref_policy), pairs, size).view(n, 2)  # (n, 2)
    sums = WeightedSum()

    def loss_of(chunk: torch.Tensor) -> torch.Tensor:  # (c,) pair indices
        rows = torch.stack([2 * chunk, 2 * chunk + 1], dim=1).flatten()  # (2c,) each pair's chosen, rejected
        logps = logps_of(learner.policy, pairs[rows]).view(-1, 2)  # (c, 2)
        ref = ref_logps[chunk]  # (c, 2)
        loss, stats = online_dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta)
        share = len(chunk) / n  # the loss is a mean over pairs
        sums.add(share, loss=loss, accuracy=stats.accuracy, kl=(logps.detach() - ref).mean())
        return loss * share

    pairs_per_pass = None if size is None else size // 2
    learner.optimizer_step(micro_batches(torch.arange(n, device=offsets.device), pairs_per_pass), loss_of)
    return {
        "train/loss": sums.totals["loss"],
        "train/accuracy": sums.totals["accuracy"],
        "objective/kl": sums.totals["kl"],
    }


if __name__ == "__main__":
    CLI(setup)
