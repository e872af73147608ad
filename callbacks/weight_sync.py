"""Refresh the generator's weights every ``sync_every`` policy versions, and check that the refresh took.

After a refresh the generator's logprobs of a fixed probe sequence should equal
the trainer's; the largest difference is logged as ``sync/logprob_max_diff``
every ``probe_every`` refreshes (float32: expect < 1e-3; bfloat16 vLLM differs
by about 1e-2 before any refresh). The probe is the first rollout trained on.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_rlhf.generation.transformers_backend import sequence_logprobs


class WeightSync(Callback):
    """Push the policy's weights to the generator process every ``sync_every`` versions.

    Only active under an asynchronous strategy (``async_rlhf``, ``async_rlhf_ddp``);
    the strategy adds one with its ``sync_every`` when the trainer has none.

    Args:
        sync_every: Refresh every this many policy versions (generated batches trained on);
            ``None`` takes the strategy's.
        probe_every: Compare trainer and generator logprobs every this many refreshes; 0 never.
    """

    def __init__(self, sync_every: int | None = None, probe_every: int = 10) -> None:
        self.sync_every = sync_every
        self.probe_every = probe_every
        self.version: int | None = None  # last version sent
        self.refreshes = 0
        self.probe: tuple[list[int], list[int]] | None = None

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        rollouts = getattr(trainer.strategy, "rollouts", None)
        version = pl_module.policy_version
        every = self.sync_every or trainer.strategy.sync_every
        if rollouts is None or version == 0 or version == self.version or version % every:
            return
        seconds = rollouts.refresh(version)
        self.version = version
        self.refreshes += 1
        metrics = {"sync/seconds": seconds, "sync/version": float(version)}
        if self.probe is None and getattr(pl_module, "last_generations", None) is not None:
            g = pl_module.last_generations
            self.probe = (g.prompt_ids[0], g.completion_ids[0])
        # with a shared generator only rank 0 has one to probe
        if self.probe is not None and self.probe_every and (self.refreshes - 1) % self.probe_every == 0 and rollouts.generator is not None:
            metrics["sync/logprob_max_diff"] = self.logprob_max_diff(pl_module, rollouts, version)
        pl_module.log_dict(metrics, batch_size=1)

    def logprob_max_diff(self, pl_module: L.LightningModule, rollouts, version: int, temperature: float = 1.0) -> float:
        """Largest |trainer - generator| logprob over the probe's completion tokens."""
        prompt, completion = self.probe
        trainer_logprobs = sequence_logprobs(pl_module.policy, prompt, completion, temperature)
        generator_logprobs = torch.tensor(rollouts.sequence_logprobs(prompt, completion, temperature, version))
        return (trainer_logprobs - generator_logprobs).abs().max().item()

    @override
    def state_dict(self) -> dict:
        return {"version": self.version, "refreshes": self.refreshes, "probe": self.probe}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.version, self.refreshes, self.probe = state_dict["version"], state_dict["refreshes"], state_dict["probe"]
