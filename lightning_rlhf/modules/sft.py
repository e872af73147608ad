"""Supervised fine-tuning: the first stage of the pipeline (Stiennon et al. 2020; Noukhovitch et al. 2025, Sec. 3).

Cross-entropy on the completion tokens (and the closing eos) only; prompt
tokens and padding are masked out of the loss.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from typing_extensions import override

from lightning_rlhf.models import load_policy, load_tokenizer, resolve_source
from lightning_rlhf.tokens import prompt_token_ids


class SFT(L.LightningModule):
    """Fine-tune a causal LM on prompt/completion demonstrations.

    Args:
        policy: Hub id, local directory or ``"builtin:base"`` of the model to fine-tune.
        optimizer: Optimizer factory (``class_path``/``init_args`` in YAML).
        max_length: Sequences are truncated to this many tokens.
    """

    def __init__(
        self, policy: str = "builtin:base", optimizer: OptimizerCallable = torch.optim.AdamW, max_length: int = 512
    ) -> None:
        super().__init__()
        if not policy.startswith("builtin:"):
            resolve_source(policy, "policy model")
        self.save_hyperparameters(ignore=["optimizer"])
        self.policy_source = policy
        self.optimizer_factory = optimizer
        self.max_length = max_length
        self.policy: torch.nn.Module | None = None

    @override
    def configure_model(self) -> None:
        if self.policy is None:
            self.tokenizer = load_tokenizer(self.policy_source)
            self.policy = load_policy(self.policy_source).train()

    @override
    def configure_optimizers(self):
        return self.optimizer_factory(self.policy.parameters())

    def encode(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside completions), each (b, s)."""
        prompts = prompt_token_ids(self.tokenizer, [r["prompt"] for r in rows])
        completions = self.tokenizer([r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        sequences = [(p + c + [eos])[: self.max_length] for p, c in zip(prompts, completions)]
        width = max(len(s) for s in sequences)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (p, s) in enumerate(zip(prompts, sequences)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            labels[i, len(p) : len(s)] = ids[i, len(p) : len(s)]
        return ids.to(self.device), mask.to(self.device), labels.to(self.device)

    @override
    def training_step(self, batch: list[dict], batch_idx: int) -> torch.Tensor:
        ids, mask, labels = self.encode(batch)
        loss = self.policy(input_ids=ids, attention_mask=mask, labels=labels).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def save_pretrained(self, path: str | Path) -> None:
        """Write the policy and tokenizer in Hugging Face format."""
        self.policy.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
