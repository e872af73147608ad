"""Reward-model training on preference pairs (Bradley-Terry), the pipeline's second stage.

As in the paper (Noukhovitch et al. 2025, Sec. 3, after Stiennon et al. 2020)
the reward model starts from the SFT policy's weights with a fresh scalar
head (``AutoModelForSequenceClassification``, one label) and learns
``-log sigmoid(r(chosen) - r(rejected))`` (:func:`lightning_rlhf.losses.bradley_terry_loss`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from typing_extensions import override

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.losses import bradley_terry_loss
from lightning_rlhf.models import load_reward_model, load_tokenizer, resolve_source
from lightning_rlhf.modules.base import LR_SCHEDULES, linear_schedule
from lightning_rlhf.rewards.model import score_sequences
from lightning_rlhf.tokens import encode_prompt_completion, left_pad


class RewardModel(L.LightningModule):
    """Train a scalar reward model on (prompt, chosen, rejected) rows.

    Args:
        model: Hub id, local directory or ``"builtin:sft"`` to start from.
        optimizer: Optimizer factory (``class_path``/``init_args`` in YAML).
        lr_schedule: ``"constant"``, or ``"linear"``: after ``warmup_steps`` of linear warm-up the
            learning rate decays linearly to 0 at ``trainer.max_steps`` (or the epochs' batches).
            A run that ends at a small learning rate ends near where its last updates averaged,
            not wherever its last noisy step threw it (why the built-in proxy trains with it).
        warmup_steps: Optimizer steps of linear warm-up under ``lr_schedule: linear``.
    """

    def __init__(
        self,
        model: str = "builtin:sft",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Literal["constant", "linear"] = "constant",
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        if not model.startswith("builtin:"):
            resolve_source(model, "reward model")
        if lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}.")
        if warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be 0 or more, got {warmup_steps}.")
        self.save_hyperparameters(ignore=["optimizer"])
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

    @override
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.model.parameters())
        if self.lr_schedule == "constant":
            return optimizer
        total = self.trainer.max_steps if self.trainer.max_steps != -1 else self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ConfigError(
                "lr_schedule: linear decays over the run's length, but the run has none; set trainer.max_steps or max_epochs."
            )
        schedule = linear_schedule(optimizer, int(total), self.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @override
    def training_step(self, batch: list[dict], batch_idx: int) -> torch.Tensor:
        prompts = [r["prompt"] for r in batch]
        sequences = encode_prompt_completion(
            self.tokenizer, prompts + prompts, [r["chosen"] for r in batch] + [r["rejected"] for r in batch]
        )
        ids, mask = left_pad(sequences, self.tokenizer.pad_token_id)
        scores = score_sequences(self.model, ids.to(self.device), mask.to(self.device))  # (2b,)
        loss, stats = bradley_terry_loss(scores[: len(batch)], scores[len(batch) :])
        self.log_dict(
            {"train/loss": loss, "train/accuracy": stats.accuracy, "train/margin": stats.margin},
            prog_bar=True,
            batch_size=len(batch),
        )
        return loss

    def save_pretrained(self, path: str | Path) -> None:
        """Write the reward model and tokenizer in Hugging Face format."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
