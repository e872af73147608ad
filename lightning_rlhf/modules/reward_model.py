"""Reward-model training on preference pairs (Bradley-Terry), the pipeline's second stage.

As in the paper (Noukhovitch et al. 2025, Sec. 3, after Stiennon et al. 2020)
the reward model starts from the SFT policy's weights with a fresh scalar
head (``AutoModelForSequenceClassification``, one label) and learns
``-log sigmoid(r(chosen) - r(rejected))`` (:func:`lightning_rlhf.losses.bradley_terry_loss`).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from typing_extensions import override

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.losses import bradley_terry_loss
from lightning_rlhf.models import load_reward_model, load_tokenizer, loaded, resolve_source
from lightning_rlhf.modules.accumulation import GradientAccumulation, WeightedSum, check_micro_batch_size
from lightning_rlhf.modules.base import LR_SCHEDULES, enable_gradient_checkpointing, linear_schedule
from lightning_rlhf.rewards.model import score_sequences
from lightning_rlhf.rollout_batch import micro_batches
from lightning_rlhf.tokens import encode_prompt_completion, left_pad


class RewardModel(GradientAccumulation, L.LightningModule):
    """Train a scalar reward model on (prompt, chosen, rejected) rows.

    Args:
        model: Hub id, local directory or ``"builtin:sft"`` to start from.
        optimizer: Optimizer factory (``class_path``/``init_args`` in YAML).
        lr_schedule: ``"constant"``, or ``"linear"``: after ``warmup_steps`` of linear warm-up the
            learning rate decays linearly to 0 at ``trainer.max_steps`` (or the epochs' batches).
            A run that ends at a small learning rate ends near where its last updates averaged,
            not wherever its last noisy step threw it (why the built-in proxy trains with it).
        warmup_steps: Optimizer steps of linear warm-up under ``lr_schedule: linear``.
        micro_batch_size: Sequences per forward and backward, an even number (a pair is two); a
            larger batch accumulates the gradients of its micro-batches into one optimizer step
            equal to the single pass's. ``None`` (default): the whole batch.
        gradient_checkpointing: Recompute activations in the backward instead of keeping them.
        gradient_clip_val: Max gradient norm; ``None`` (default) disables clipping.

    Raises:
        ConfigError: If ``lr_schedule`` is unknown, ``warmup_steps`` negative, ``micro_batch_size``
            not a positive even number, or the model path does not exist.
    """

    def __init__(
        self,
        model: str = "builtin:sft",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Literal["constant", "linear"] = "constant",
        warmup_steps: int = 0,
        micro_batch_size: int | None = None,
        gradient_checkpointing: bool = False,
        gradient_clip_val: float | None = None,
    ) -> None:
        super().__init__()
        if not model.startswith("builtin:"):
            resolve_source(model, "reward model")
        if lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}.")
        if warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be 0 or more, got {warmup_steps}.")
        check_micro_batch_size(micro_batch_size, unit=2)
        self.save_hyperparameters(ignore=["optimizer"])
        self.automatic_optimization = False  # micro-batches accumulate into one step (GradientAccumulation)
        self.micro_batch_size, self.gradient_checkpointing = micro_batch_size, gradient_checkpointing
        self.gradient_clip_val = gradient_clip_val
        self.steps_schedule = lr_schedule != "constant"
        self.model_source = model
        self.optimizer_factory = optimizer
        self.lr_schedule, self.warmup_steps = lr_schedule, warmup_steps
        self.model: torch.nn.Module | None = None

    @override
    def configure_model(self) -> None:
        if self.model is None:
            self.tokenizer = load_tokenizer(self.model_source)
            self.model = load_reward_model(self.model_source).train()
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
            if self.gradient_checkpointing:
                enable_gradient_checkpointing(self.model)

    @override
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.model.parameters())
        if self.lr_schedule == "constant":
            return optimizer
        total = self.trainer.max_steps if self.trainer.max_steps != -1 else self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ConfigError(
                "lr_schedule: linear decays over the run's length, but the run has none; "
                "set trainer.max_steps or max_epochs."
            )
        schedule = linear_schedule(optimizer, int(total), self.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @override
    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        prompts = [r["prompt"] for r in batch]
        sequences = encode_prompt_completion(
            self.tokenizer, prompts + prompts, [r["chosen"] for r in batch] + [r["rejected"] for r in batch]
        )
        ids, mask = left_pad(sequences, self.tokenizer.pad_token_id)  # (2b, s): chosen rows, then rejected
        sums = WeightedSum()
        chunks = micro_batches(
            torch.arange(len(batch)), None if self.micro_batch_size is None else self.micro_batch_size // 2
        )
        self.optimizer_step_over(chunks, partial(self._loss, ids, mask, len(batch), sums))
        self.log_dict(
            {f"train/{name}": value for name, value in sums.totals.items()}, prog_bar=True, batch_size=len(batch)
        )

    def _loss(self, ids: torch.Tensor, mask: torch.Tensor, pairs: int, sums: WeightedSum, chunk: torch.Tensor):
        """The Bradley-Terry loss of the pairs ``chunk``, weighted by their share of the batch's ``pairs``."""
        rows = torch.cat([chunk, chunk + pairs])  # (2c,) the chunk's chosen, then its rejected
        scores = score_sequences(self.model, ids[rows].to(self.device), mask[rows].to(self.device))  # (2c,)
        loss, stats = bradley_terry_loss(scores[: len(chunk)], scores[len(chunk) :])
        share = len(chunk) / pairs
        sums.add(share, loss=loss, accuracy=stats.accuracy, margin=stats.margin)
        return loss * share

    def save_pretrained(self, path: str | Path) -> None:
        """Write the reward model and tokenizer in Hugging Face format."""
        loaded(self.model, self, "reward model").save_pretrained(path)
        self.tokenizer.save_pretrained(path)
