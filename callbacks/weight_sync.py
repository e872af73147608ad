"""Log each refresh of the generator's weights, and check that it took.

The rollout source decides when weights are refreshed (every ``sync_every``
versions, and when the staleness bound demands it) and records each refresh;
this callback only observes. For every periodic refresh it logs
``sync/seconds`` and ``sync/version``, and every ``probe_every`` of them it
compares the generator's logprobs of a fixed probe sequence with the
trainer's: the largest difference is logged as ``sync/logprob_max_diff``
(float32: expect < 1e-3; bfloat16 vLLM differs by about 1e-2 before any
refresh). The probe is the first rollout trained on.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_rlhf.contracts import RLModule, RolloutSource
from lightning_rlhf.generation.transformers_backend import sequence_logprobs
from lightning_rlhf.metrics.cadence import logger_writes_now


class WeightSync(Callback):
    """Log the rollout source's weight refreshes and probe the generator after them.

    The asynchronous strategies add one when the trainer has none.

    Args:
        probe_every: Compare trainer and generator logprobs every this many periodic refreshes; 0 never.
        log_every_step: Log in every step with a refresh; ``False``: only in the steps Lightning's
            loggers write (as the RL modules' argument of that name), each key with its newest value
            since the last write (probes are still made on schedule).
    """

    def __init__(self, probe_every: int = 10, log_every_step: bool = True) -> None:
        self.probe_every = probe_every
        self.log_every_step = log_every_step
        self.refreshes = 0  # periodic refreshes seen
        self.probe: tuple[list[int], list[int]] | None = None
        self._unlogged: dict[str, float] = {}  # newest value of each key not yet handed to Lightning
        self._seen = 0  # entries of the source's refresh log already looked at

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        source = pl_module.rollout_source if isinstance(pl_module, RLModule) else None
        self._seen = len(source.refreshes) if source is not None else 0
        self._unlogged = {}  # nothing from an earlier fit is logged in this one

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        source = pl_module.rollout_source if isinstance(pl_module, RLModule) else None
        if source is None:
            return
        if self.probe is None and isinstance(outputs, dict) and outputs.get("generations") is not None:
            g = outputs["generations"]
            self.probe = (g.prompt_ids[0], g.completion_ids[0])
        new, self._seen = source.refreshes[self._seen :], len(source.refreshes)
        for refresh in (r for r in new if r.reason == "period"):
            self.refreshes += 1
            metrics = {"sync/seconds": refresh.seconds, "sync/version": float(refresh.version)}
            if self.probe is not None and self.probe_every and (self.refreshes - 1) % self.probe_every == 0:
                diff = self.logprob_max_diff(pl_module, source, refresh.version)
                if diff is not None:  # with a shared generator only rank 0 has one to probe
                    metrics["sync/logprob_max_diff"] = diff
            self._unlogged.update(metrics)
        if self._unlogged and (self.log_every_step or logger_writes_now(trainer)):
            pl_module.log_dict(self._unlogged, batch_size=1)
            self._unlogged = {}

    def logprob_max_diff(
        self, pl_module: RLModule, source: RolloutSource, version: int, temperature: float = 1.0
    ) -> float | None:
        """Largest |trainer - generator| logprob over the probe's completion tokens; ``None`` without a generator here."""
        prompt, completion = self.probe
        # on every rank, also those without a generator: under ZeRO-3 a forward pass gathers from all ranks
        trainer_logprobs = sequence_logprobs(pl_module.policy, prompt, completion, temperature)
        generator_logprobs = source.sequence_logprobs(prompt, completion, temperature, version)
        if generator_logprobs is None:
            return None
        return (trainer_logprobs - torch.tensor(generator_logprobs)).abs().max().item()

    @override
    def state_dict(self) -> dict:
        return {"refreshes": self.refreshes, "probe": self.probe}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.refreshes, self.probe = state_dict["refreshes"], state_dict["probe"]
