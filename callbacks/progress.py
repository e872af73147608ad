"""A progress bar that counts optimizer steps, the unit ``trainer.max_steps`` is in.

Lightning's bars count batches. An RL run's batches are not its steps: the
asynchronous pipeline's first ``max_staleness`` batches only start generation,
and a generated batch makes ``num_mini_batches * num_epochs`` updates. With
``max_steps`` set, Lightning's bar totals ``min(batches per epoch, max_steps -
global_step)`` (``ProgressBar.total_train_batches``) and counts batches, so the
quickstart ended at ``101/100``; and with the ``max_epochs=-1`` that ``max_steps``
implies, ``RichProgressBar`` wrote the epoch as ``Epoch 0/-2`` (fixed in Lightning
2.7, Lightning-AI/pytorch-lightning#21924; we allow 2.5-2.6).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities.types import STEP_OUTPUT
from typing_extensions import override


class StepProgressBar(RichProgressBar):
    """Lightning's ``RichProgressBar``, counting optimizer steps when the run is bounded by ``max_steps`` alone.

    The bar then reads ``trainer.global_step`` of ``max_steps`` over the whole run (it
    does not start again at each pass over the prompts) and the epoch without a total.
    A run bounded by epochs gets Lightning's bar unchanged. Takes ``RichProgressBar``'s
    arguments.
    """

    def _counts_steps(self) -> bool:
        return self.trainer.max_epochs == -1 and self.trainer.max_steps > 0

    @property
    @override
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._counts_steps() else super().total_train_batches

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        if self._counts_steps():
            batch_idx = trainer.global_step - 1  # the bar shows batch_idx + 1 done
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        if not self._counts_steps():
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        return f"{description:{len(self.validation_description)}}"  # as wide as "Validation", as Lightning pads it
