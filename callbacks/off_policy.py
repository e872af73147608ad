"""Train on deliberately stale rollouts, in one process: the paper's off-policy experiment.

Noukhovitch et al. 2025, Sec. 3.1: generate ``N`` mini-batches with the
current policy, then take ``N`` updates on them, one per mini-batch. ``N = 1``
is on-policy; larger ``N`` trains on data up to ``N - 1`` versions old. This
callback hands the module a rollout source that samples from a policy snapshot
refreshed every ``N`` versions (:class:`~lightning_rlhf.generation.in_process.SnapshotSource`),
so the effect of staleness can be measured without generator processes or
timing noise. ``bench/offpolicy_sweep.py`` sweeps it.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_rlhf.contracts import RLModule
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.generation.in_process import SnapshotSource
from lightning_rlhf.models import stop_token_ids


class OffPolicySimulation(Callback):
    """Sample each round of ``num_batches`` generated batches from one snapshot of the policy.

    Use with one update per generated batch (``num_mini_batches: 1``,
    ``num_epochs: 1``) for the paper's definition. Not for asynchronous
    strategies, whose generator already samples with older weights.

    Args:
        num_batches: ``N``, generated batches per policy snapshot (1 is on-policy).
    """

    def __init__(self, num_batches: int) -> None:
        if num_batches < 1:
            raise ConfigError(f"OffPolicySimulation needs num_batches >= 1 (1 is on-policy), got {num_batches}.")
        self.num_batches = num_batches

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, RLModule):
            raise ConfigError(
                f"OffPolicySimulation needs an RL module (OnlineDPO, RLOO, PPO), not {type(pl_module).__name__}."
            )
        source = pl_module.rollout_source
        if source is None or not source.samples_in_process:
            raise ConfigError(
                "OffPolicySimulation simulates staleness in one process; "
                "drop it or use a synchronous strategy instead of an asynchronous one."
            )
        tokenizer = pl_module.tokenizer
        snapshot = SnapshotSource(
            pl_module.policy,
            stop_token_ids(tokenizer, pl_module.policy),
            tokenizer.pad_token_id,
            self.num_batches,
            seed=pl_module.generation_seed,
        )
        pl_module.use_rollout_source(snapshot)
