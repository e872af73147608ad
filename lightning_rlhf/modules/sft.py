"""Supervised fine-tuning: the first stage of the pipeline (Stiennon et al. 2020; Noukhovitch et al. 2025, Sec. 3).

Cross-entropy on the completion tokens (and the closing eos) only; prompt
tokens and padding are masked out of the loss, which averages over the batch's
completion tokens (also when the batch runs in micro-batches).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from typing_extensions import override

from lightning_rlhf.lora import LoRA, check_peft, lora_dict, save_policy, wrap
from lightning_rlhf.models import load_policy, load_tokenizer, loaded, resolve_source
from lightning_rlhf.modules.accumulation import GradientAccumulation, WeightedSum, check_micro_batch_size
from lightning_rlhf.modules.base import enable_gradient_checkpointing
from lightning_rlhf.rollout_batch import micro_batches
from lightning_rlhf.tokens import prompt_token_ids


class SFT(GradientAccumulation, L.LightningModule):
    """Fine-tune a causal LM on prompt/completion demonstrations.

    Args:
        policy: Hub id, local directory or ``"builtin:base"`` of the model to fine-tune.
        optimizer: Optimizer factory (``class_path``/``init_args`` in YAML).
        max_length: Sequences are truncated to this many tokens.
        micro_batch_size: Sequences per forward and backward; a larger batch accumulates the
            gradients of its micro-batches into one optimizer step equal to the single pass's
            (:mod:`~lightning_rlhf.modules.accumulation`). ``None`` (default): the whole batch.
        gradient_checkpointing: Recompute activations in the backward instead of keeping them.
        gradient_clip_val: Max gradient norm; ``None`` (default) disables clipping. (The module
            steps its optimizer itself, so ``Trainer(gradient_clip_val=...)`` does not apply.)
        lora: Train a LoRA adapter instead of the weights (:class:`~lightning_rlhf.lora.LoRA`; needs ``peft``).

    Raises:
        ConfigError: If ``micro_batch_size`` is below 1 or the model path does not exist.
    """

    def __init__(
        self,
        policy: str = "builtin:base",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        max_length: int = 512,
        micro_batch_size: int | None = None,
        gradient_checkpointing: bool = False,
        gradient_clip_val: float | None = None,
        lora: LoRA | None = None,
    ) -> None:
        super().__init__()
        if not policy.startswith("builtin:"):
            resolve_source(policy, "policy model")
        check_micro_batch_size(micro_batch_size)
        if lora is not None:
            check_peft()
        self.save_hyperparameters(ignore=["optimizer"])
        self.hparams["lora"] = lora_dict(lora)  # plain data: a checkpoint loads with torch.load(weights_only=True)
        self.automatic_optimization = False  # micro-batches accumulate into one step (GradientAccumulation)
        self.policy_source = policy
        self.optimizer_factory = optimizer
        self.max_length = max_length
        self.micro_batch_size, self.gradient_checkpointing = micro_batch_size, gradient_checkpointing
        self.gradient_clip_val = gradient_clip_val
        self.lora = lora
        self.policy: torch.nn.Module | None = None

    @override
    def configure_model(self) -> None:
        if self.policy is None:
            self.tokenizer = load_tokenizer(self.policy_source)
            self.policy = load_policy(self.policy_source).train()
            if self.lora is not None:
                self.policy = wrap(self.policy, self.lora)
            if self.gradient_checkpointing:
                enable_gradient_checkpointing(self.policy)

    @override
    def configure_optimizers(self):
        return self.optimizer_factory([p for p in loaded(self.policy, self).parameters() if p.requires_grad])

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
    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        ids, mask, labels = self.encode(batch)
        counts = (labels[:, 1:] != -100).sum(-1).tolist()  # (b,) completion tokens per row (each one predicted)
        sums = WeightedSum()
        chunks = micro_batches(torch.arange(len(batch)), self.micro_batch_size)
        self.optimizer_step_over(chunks, partial(self._loss, ids, mask, labels, counts, sums))
        if "loss" in sums.totals:  # a batch whose prompts were all cut at max_length has no completion token
            self.log("train/loss", sums.totals["loss"], prog_bar=True, batch_size=len(batch))

    def _loss(self, ids, mask, labels, counts: list[int], sums: WeightedSum, chunk: torch.Tensor) -> torch.Tensor:
        """The mean token loss of the rows ``chunk``, weighted by their share of the batch's completion tokens."""
        out = loaded(self.policy, self)(input_ids=ids[chunk], attention_mask=mask[chunk], labels=labels[chunk])
        tokens = sum(counts[i] for i in chunk.tolist())
        if tokens == 0:  # prompts cut at max_length: nothing to learn, but every micro-batch runs a backward
            return out.logits.sum() * 0.0
        share = tokens / sum(counts)
        sums.add(share, loss=out.loss)
        return out.loss * share

    def save_pretrained(self, path: str | Path) -> None:
        """Write the policy and tokenizer in Hugging Face format (a LoRA policy merged, its adapter in ``adapter/``)."""
        save_policy(loaded(self.policy, self), path)
        self.tokenizer.save_pretrained(path)
