"""Log each refresh of the generator's weights, and check that it took.

The rollout source decides when weights are refreshed (every ``sync_every``
versions, and when the staleness bound demands it) and records each refresh;
this callback only observes. For every periodic refresh it logs
``sync/seconds`` and ``sync/version``, and every ``probe_every`` of them it
compares the generator's logprobs of a fixed probe sequence with the
trainer's: the largest difference is logged as ``sync/logprob_max_diff``
(float32: expect < 1e-3; bfloat16 vLLM differs by about 1e-2 before any
refresh). The probe is the first rollout trained on.

The probe never makes the trainer wait (defect h of the GPU review: a probe
queued as a request of its own waited behind the generation in flight, a whole
batch): the source hands it to the generator with the refresh, the generator
scores it right after loading the weights and sends the logprobs back with its
acknowledgement, and the difference is logged at the first step that finds
them in (usually one or two steps after the refresh). The trainer's side is
computed at the refresh, with the weights that were sent.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_rlhf.contracts import RLModule, RolloutSource, TrainedOn
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
        self._awaited: dict[
            int, torch.Tensor
        ] = {}  # version -> the trainer's probe logprobs, until the generator's come
        self._armed = False  # the source holds the probe: the next periodic refresh carries it

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        source = pl_module.rollout_source if isinstance(pl_module, RLModule) else None
        self._seen = len(source.refreshes) if source is not None else 0
        self._unlogged, self._awaited = {}, {}  # nothing from an earlier fit is logged in this one
        if source is not None:
            self._ask(source)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: TrainedOn | None, batch, batch_idx: int
    ) -> None:
        source = pl_module.rollout_source if isinstance(pl_module, RLModule) else None
        if source is None:
            return
        # a step that trained; one filling the pipeline returned None, which Lightning hands on as {}
        g = outputs.get("generations") if outputs else None
        if self.probe is None and g is not None:
            self.probe = (g.prompt_ids[0], g.completion_ids[0])
        new, self._seen = source.refreshes[self._seen :], len(source.refreshes)
        for refresh in (r for r in new if r.reason == "period"):
            self.refreshes += 1
            self._unlogged.update({"sync/seconds": refresh.seconds, "sync/version": float(refresh.version)})
            if self._armed and self.probe is not None and self._probes(self.refreshes):
                # on every rank, also those without a generator: under ZeRO-3 a forward pass gathers from all ranks
                prompt, completion = self.probe
                self._awaited[refresh.version] = sequence_logprobs(pl_module.policy, prompt, completion, 1.0)
        for version in sorted(self._awaited):
            answer = source.probe_logprobs(version)
            if answer is not None:  # with a shared generator only rank 0 ever has one
                trainer_logprobs = self._awaited.pop(version)
                self._unlogged["sync/logprob_max_diff"] = (trainer_logprobs - torch.tensor(answer)).abs().max().item()
        for version in sorted(self._awaited)[:-4]:  # never answered (another rank's generator, a restart)
            del self._awaited[version]
        self._ask(source)
        if self._unlogged and (self.log_every_step or logger_writes_now(trainer)):
            pl_module.log_dict(self._unlogged, batch_size=1)
            self._unlogged = {}

    def _probes(self, refresh: int) -> bool:
        """Whether the ``refresh``-th periodic refresh (counting from 1) is checked."""
        return bool(self.probe_every) and (refresh - 1) % self.probe_every == 0

    def _ask(self, source: RolloutSource) -> None:
        """Have the next periodic refresh carry the probe when it is one to check (any refresh before it will too)."""
        self._armed = self.probe is not None and self._probes(self.refreshes + 1)
        source.set_probe((self.probe[0], self.probe[1], 1.0) if self._armed and self.probe is not None else None)

    @override
    def state_dict(self) -> dict:
        return {"refreshes": self.refreshes, "probe": self.probe}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.refreshes, self.probe = state_dict["refreshes"], state_dict["probe"]
