"""One interface for every generation backend (transformers now; vLLM in its own process next).

What crosses it is plain Python data (lists of ints and floats), so the same
:class:`Generations` can come back from another process through a queue.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lightning_rlhf.generation.weights import RefreshManifest

Probe = tuple[list[int], list[int], float]
"""A sequence to check a refresh with: prompt ids, completion ids, and the temperature of its logprobs."""


@dataclass
class SamplingConfig:
    """How completions are sampled.

    Args:
        k: Completions per prompt.
        temperature: Softmax temperature; training logprobs use the same one. ``0`` decodes greedily
            (evaluation only; behaviour logprobs are then unscaled).
        max_new_tokens: Longest completion; longer ones end with finish reason ``"length"``.
    """

    k: int = 2
    temperature: float = 0.7
    max_new_tokens: int = 53


@dataclass
class Generations:
    """``k`` completions for each of ``n`` prompts, flattened prompt-major
    (prompt ``i``, sample ``j`` at ``i * k + j``).

    Attributes:
        prompt_ids: n lists of prompt token ids.
        completion_ids: n*k lists of completion token ids, truncated after the first stop token (kept).
        behavior_logprobs: n*k lists, the sampler's temperature-scaled logprob of each completion token.
        finish_reasons: n*k of ``"stop"`` (ended with a stop token) or ``"length"`` (hit ``max_new_tokens``).
        policy_version: Version of the weights that produced them (number of optimizer steps).
        k: Completions per prompt.
        scores: n*k raw reward scores when the generator scored them (``score_on_generator``), else ``None``;
            ``None`` entries are left for the trainer to score (a fraction scored on the generator).
        scoring_seconds: How long the generator process spent scoring them (0 when it scored none).
        finished_at: When the generator process had them ready, on the host's monotonic clock
            (:func:`~lightning_rlhf.generation.worker.host_clock`); ``None`` when made in the trainer's process.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    behavior_logprobs: list[list[float]]
    finish_reasons: list[str]
    policy_version: int
    k: int
    scores: list[float | None] | None = None
    scoring_seconds: float = 0.0
    finished_at: float | None = None

    def __post_init__(self) -> None:
        n = len(self.prompt_ids) * self.k
        if not len(self.completion_ids) == len(self.behavior_logprobs) == len(self.finish_reasons) == n:
            raise ValueError(
                f"Generations must hold {n} completions ({len(self.prompt_ids)} prompts x k={self.k}), "
                f"got {len(self.completion_ids)}."
            )
        if self.scores is not None and len(self.scores) != n:
            raise ValueError(f"Generations hold {n} completions but {len(self.scores)} scores.")

    @property
    def scored_share(self) -> float:
        """The share of the completions the generator process scored (``score_on_generator``)."""
        if self.scores is None:
            return 0.0
        return sum(s is not None for s in self.scores) / max(1, len(self.scores))

    @classmethod
    def concat(cls, parts: list[Generations]) -> Generations:
        """One batch from consecutive parts (the inverse of :meth:`split`); all must come from one policy version."""
        versions = {p.policy_version for p in parts}
        if len(versions) != 1 or len({p.k for p in parts}) != 1:
            raise ValueError(f"Parts of one request were sampled with different versions or k: {sorted(versions)}.")
        scored = all(p.scores is not None for p in parts)
        return cls(
            [ids for p in parts for ids in p.prompt_ids],
            [ids for p in parts for ids in p.completion_ids],
            [lp for p in parts for lp in p.behavior_logprobs],
            [r for p in parts for r in p.finish_reasons],
            parts[0].policy_version,
            parts[0].k,
            [s for p in parts for s in p.scores or ()] if scored else None,
            max(p.scoring_seconds for p in parts),  # the parts are scored side by side
            None if any(p.finished_at is None for p in parts) else max(p.finished_at or 0.0 for p in parts),
        )

    def split(self, prompts_per_part: list[int]) -> list[Generations]:
        """Cut into consecutive parts of the given numbers of prompts (each with its ``k`` completions)."""
        if sum(prompts_per_part) != len(self.prompt_ids):
            raise ValueError(
                f"Parts of {prompts_per_part} prompts do not add up to the {len(self.prompt_ids)} generated."
            )
        parts, start = [], 0
        for n in prompts_per_part:
            lo, hi = start * self.k, (start + n) * self.k
            parts.append(
                Generations(
                    self.prompt_ids[start : start + n],
                    self.completion_ids[lo:hi],
                    self.behavior_logprobs[lo:hi],
                    self.finish_reasons[lo:hi],
                    self.policy_version,
                    self.k,
                    self.scores[lo:hi] if self.scores is not None else None,
                )
            )
            start += n
        return parts


def call_seed(seed: int, calls: int) -> int:
    """The seed of a backend's ``calls``-th sampled request: one stream per call, the same in every backend.

    Kept below 2**63 (what ``torch.manual_seed`` and vLLM's generators take): a base seed
    from ``torch.initial_seed()`` may itself be a 64-bit number.
    """
    return (seed * 1_000_003 + calls) % 2**63


def truncate_at_stop(
    tokens: list[int], logprobs: list[float], stop_token_ids: set[int]
) -> tuple[list[int], list[float], str]:
    """Cut a completion right after its first stop token.

    The paper's code (async_rlhf, from TRL 0.11 ``truncate_response``) replaces
    everything after the stop token with padding; we drop it instead.
    """
    for i, token in enumerate(tokens):
        if token in stop_token_ids:
            return tokens[: i + 1], logprobs[: i + 1], "stop"
    return tokens, logprobs, "length"


class GenerationBackend(ABC):
    """Samples completions from a copy (or a view) of the policy."""

    policy_version: int = 0
    share_weights: bool = False  # samples with the training policy's own weights (nothing to copy or send)
    calls: int = 0  # sampled requests so far: request i draws with a seed derived from (seed, i)

    @abstractmethod
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> Generations:
        """Sample ``sampling.k`` completions for each prompt."""

    @abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Replace the sampler's weights with the policy's and record their version."""

    def connect(
        self, port: int, prefix: str, transport: str = "gloo", world_size: int = 2, timeout_s: float = 1800.0
    ) -> None:
        """Join the weight-transfer group as rank 1 (or ``1 + tp_rank``) of ``world_size``
        (generator-process backends only)."""
        raise NotImplementedError(f"{type(self).__name__} cannot run in a generator process.")

    def receive_weights(self, refit: RefreshManifest, version: int) -> None:
        """Receive the weights described by ``refit`` (a :class:`~lightning_rlhf.generation.weights.RefreshManifest`)
        and load them."""
        raise NotImplementedError(f"{type(self).__name__} cannot run in a generator process.")

    def sequence_logprobs(self, prompt_ids: list[int], completion_ids: list[int], temperature: float) -> list[float]:
        """Temperature-scaled logprobs of ``completion_ids`` following ``prompt_ids`` (the post-refresh probe)."""
        raise NotImplementedError

    def close(self) -> None:  # noqa: B027 (optional: most backends hold nothing to release)
        """Release processes and memory; idempotent."""
