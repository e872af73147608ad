"""Micro-batches with gradient accumulation, for the LightningModules that step their optimizer themselves.

A mini-batch (what one optimizer step learns from) runs through the model in
micro-batches of at most ``micro_batch_size`` sequences: each micro-batch's
forward and backward, its activations freed before the next, its gradients
added to the last ones; then one clip and one optimizer step. Each
micro-batch's loss is weighted by its share of the mini-batch's count (tokens
or sequences, whatever the loss averages over), so the accumulated gradient is
the gradient of the single pass's loss, not a mean of micro-batch means (which
would weigh a short completion's tokens more when lengths differ).

Distributed, only the last micro-batch of a mini-batch reduces gradients:

* DDP: the others run inside ``DDPStrategy.block_backward_sync`` (``DistributedDataParallel.no_sync``), as
  Lightning's own accumulation does (``lightning/pytorch/loops/utilities.py``,
  ``_block_parallel_sync_behavior``; ``LightningOptimizer.toggle_model(sync_grad=False)`` for manual
  optimization);
* DeepSpeed: the engine is told which backward ends the mini-batch
  (``DeepSpeedEngine.set_gradient_accumulation_boundary``, ``deepspeed/runtime/engine.py``: "the final
  forward/backward should have the boundary state set to True ... call engine.step() once after all the
  gradient accumulation passes"); Lightning's DeepSpeed backward (``DeepSpeedPrecision.backward``,
  ``lightning/pytorch/plugins/precision/deepspeed.py``) hands the loss to ``engine.backward``, whose
  ``gradient_accumulation_steps`` is Lightning's ``accumulate_grad_batches`` (1: nothing rescaled).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, ParallelStrategy

from lightning_rlhf.errors import ConfigError


def check_micro_batch_size(micro_batch_size: int | None, unit: int = 1) -> None:
    """Refuse a ``micro_batch_size`` below one ``unit`` of sequences or not a multiple of it
    (``None``: the whole mini-batch)."""
    if micro_batch_size is None:
        return
    if micro_batch_size < unit or micro_batch_size % unit:
        what = "at least 1" if unit == 1 else f"a multiple of {unit} (a pair is {unit} sequences)"
        raise ConfigError(
            f"micro_batch_size (sequences per forward and backward) must be {what}, "
            f"or null for the whole mini-batch; got {micro_batch_size}."
        )


# Each mixin of the RL modules precedes LightningModule in their MRO; type-checked as one, it may use its members.
if TYPE_CHECKING:
    from lightning.pytorch import LightningModule as _LightningModule
else:
    _LightningModule = object


class GradientAccumulation(_LightningModule):
    """Mixin for a LightningModule with ``automatic_optimization = False``: one optimizer step over micro-batches.

    The module sets ``gradient_clip_val`` (``None``: no clipping) and ``steps_schedule`` (whether it
    steps its learning-rate scheduler after each optimizer step).
    """

    gradient_clip_val: float | None = None
    steps_schedule: bool = False

    def optimizer_step_over(
        self, chunks: Sequence[torch.Tensor], loss_of: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        """One optimizer step: zero the gradients, backward ``loss_of(chunk)`` for each chunk, clip, step.

        ``loss_of`` returns the chunk's share of the mini-batch's loss (its loss times its share of
        the count the loss averages over), so the gradients add up to the whole mini-batch's.
        """
        optimizer = self.optimizers()
        optimizer.zero_grad()
        for i, chunk in enumerate(chunks):
            with self._reduce_gradients(last=i == len(chunks) - 1):
                self.manual_backward(loss_of(chunk))
        if self.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        optimizer.step()
        if self.steps_schedule:
            self.lr_schedulers().step()

    @contextlib.contextmanager
    def _reduce_gradients(self, last: bool) -> Iterator[None]:
        """Reduce gradients across ranks only in the backward of the mini-batch's last micro-batch."""
        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            self.trainer.model.set_gradient_accumulation_boundary(last)
            yield
        elif last or not isinstance(strategy, ParallelStrategy):
            yield
        else:
            with strategy.block_backward_sync():
                yield


class WeightedSum:
    """Running sums of detached statistics, each added with a weight (its micro-batch's share):
    the mini-batch's values."""

    def __init__(self) -> None:
        self.totals: dict[str, torch.Tensor] = {}

    def add(self, weight: float | torch.Tensor, **stats: torch.Tensor) -> None:
        for name, value in stats.items():
            value = value.detach().float() * weight
            self.totals[name] = self.totals[name] + value if name in self.totals else value
