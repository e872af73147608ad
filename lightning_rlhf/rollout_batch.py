"""The rollout batch: from :class:`Generations` to padded training tensors, and its micro- and mini-batches.

Shared by the LightningModules and the Fabric recipes, so both compute
exactly the same quantities. What the models make of a batch (logprobs, hidden
states, values) is in :mod:`lightning_rlhf.rollout_forwards`; its rewards in
:mod:`lightning_rlhf.scoring`.

Notation: ``n`` prompts, ``k`` samples per prompt, ``b = n * k`` rollouts,
``p`` padded prompt length, ``t`` padded response length.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from lightning_rlhf.generation.base import Generations
from lightning_rlhf.tokens import left_pad


@dataclass
class RolloutBatch:
    """Padded rollouts. ``input_ids`` is the left-padded prompt followed by the right-padded response."""

    input_ids: torch.Tensor  # (b, p + t)
    attention_mask: torch.Tensor  # (b, p + t)
    response_ids: torch.Tensor  # (b, t)
    response_mask: torch.Tensor  # (b, t), 1 on real response tokens (the stop token included)
    behavior_logprobs: torch.Tensor  # (b, t), 0 on padding
    finished: torch.Tensor  # (b,), True where the response ended with the stop token
    policy_version: torch.Tensor  # (b,), version of the weights that sampled each rollout

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1] - self.response_ids.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device) -> RolloutBatch:
        return RolloutBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __getitem__(self, index: torch.Tensor) -> RolloutBatch:
        return RolloutBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def build_rollout_batch(generations: Generations, pad_token_id: int) -> RolloutBatch:
    """Pad :class:`Generations` into a :class:`RolloutBatch` (each prompt repeated ``k`` times)."""
    k = generations.k
    prompts, prompt_mask = left_pad([p for p in generations.prompt_ids for _ in range(k)], pad_token_id)  # (b, p)
    b = len(generations.completion_ids)
    lengths = torch.tensor([len(c) for c in generations.completion_ids], dtype=torch.long)
    t = max(1, int(lengths.max()))
    filled = torch.arange(t) < lengths[:, None]  # (b, t): each row's first len(c) places
    response_ids = torch.full((b, t), pad_token_id, dtype=torch.long)
    response_ids[filled] = torch.tensor([x for c in generations.completion_ids for x in c], dtype=torch.long)
    response_mask = filled.long()
    behavior = torch.zeros((b, t))
    logprob_lengths = torch.tensor([len(lp) for lp in generations.behavior_logprobs], dtype=torch.long)
    behavior[torch.arange(t) < logprob_lengths[:, None]] = torch.tensor(
        [x for lp in generations.behavior_logprobs for x in lp], dtype=torch.float32
    )
    return RolloutBatch(
        input_ids=torch.cat([prompts, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
        response_ids=response_ids,
        response_mask=response_mask,
        behavior_logprobs=behavior,
        finished=torch.tensor([r == "stop" for r in generations.finish_reasons]),
        policy_version=torch.full((b,), generations.policy_version, dtype=torch.long),
    )


def micro_batches(indices: torch.Tensor, size: int | None) -> list[torch.Tensor]:
    """``indices`` in consecutive chunks of ``size`` (the last may be shorter); ``None``: one chunk, all of them."""
    if size is None or size >= len(indices):
        return [indices]
    return list(indices.split(size))


def in_micro_batches(fn, rollouts: RolloutBatch, size: int | None) -> torch.Tensor:
    """``fn(rollouts)`` for a function of the rollouts row by row (no gradient), ``size`` rollouts per forward at most.

    The reference, old-policy and critic forwards of a generated batch hold the same
    activations and logits as a training forward; run in micro-batches their peak is that
    of ``size`` rollouts whatever the batch. Rows stay in order; ``None``: one forward.
    """
    chunks = micro_batches(torch.arange(len(rollouts)), size)
    if len(chunks) == 1:
        return fn(rollouts)
    return torch.cat([fn(rollouts[chunk]) for chunk in chunks])


def minibatches(size: int, num_mini_batches: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """A random split of ``range(size)`` into ``num_mini_batches`` equal parts.

    Raises:
        ValueError: If ``size`` is not divisible by ``num_mini_batches``.
    """
    if num_mini_batches < 1 or size % num_mini_batches:
        raise ValueError(
            f"{size} samples cannot be split into num_mini_batches={num_mini_batches} equal parts; "
            f"pick a divisor of {size}."
        )
    return list(torch.randperm(size, generator=generator).chunk(num_mini_batches))
