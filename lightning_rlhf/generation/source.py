"""The contract of a rollout source: what an RL module asks of wherever its rollouts come from.

Implemented by :mod:`~lightning_rlhf.generation.in_process` (sampling in the
training process), :mod:`~lightning_rlhf.generation.pipeline` (a generator
process sampling ahead) and :mod:`~lightning_rlhf.generation.shared` (one
generator for several ranks), with the same signatures. See
:mod:`lightning_rlhf.contracts` for who calls what.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from lightning_rlhf.generation.base import Generations, Probe, SamplingConfig

Row = dict[str, Any]  # one dataset row (a prompt, and whatever columns a reward reads)


RefreshReason = Literal["period", "bound", "restart", "resume", "eval"]


@dataclass(frozen=True)
class Refresh:
    """One refresh of a generator's weights.

    Attributes:
        version: The policy version sent.
        seconds: Trainer-side seconds it took.
        reason: ``"period"`` (every ``sync_every`` versions), ``"bound"`` (the staleness
            bound demanded it before a request), ``"restart"`` (a replacement generator
            refitted), ``"resume"`` (before asking again for a checkpoint's prompts) or
            ``"eval"`` (an evaluation needed the current weights).
    """

    version: int
    seconds: float
    reason: RefreshReason


@runtime_checkable
class RolloutSource(Protocol):
    """Where a training step's rollouts come from (``generation.in_process``, ``.pipeline``, ``.shared``)."""

    @property
    def refreshes(self) -> list[Refresh]:
        """Every refresh so far, in order; empty where the weights are shared in-process."""

    @property
    def samples_in_process(self) -> bool:
        """Whether rollouts are sampled in the training process itself (no generator process)."""

    def next_rollouts(
        self, rows: list[Row], prompt_ids: list[list[int]], sampling: SamplingConfig, version: int
    ) -> tuple[list[Row], Generations] | None:
        """Take this step's prompts; return the ``(rows, generations)`` to train on now,
        or ``None`` while filling up."""

    def after_update(self, version: int) -> None:
        """The policy is now ``version``: refresh the generator's weights if the source's rule says so."""

    def pending_rows(self) -> list[list[Row]]:
        """Prompt batches requested but not trained on yet, oldest first (saved in checkpoints)."""

    def resubmit(
        self,
        batches: list[list[Row]],
        prompt_ids: Callable[[list[Row]], list[list[int]]],
        sampling: SamplingConfig,
        version: int,
    ) -> None:
        """After a resume: ask again for a checkpoint's ``pending_rows``, in order, with the weights of ``version``."""

    def set_probe(self, probe: Probe | None) -> None:
        """Have the generator score ``probe`` right after each refresh from now on (``None``: stop),
        to check the refresh."""

    def probe_logprobs(self, version: int) -> list[float] | None:
        """The generator's logprobs of the probe after ``version``'s refresh once they are in; never waits.

        ``None`` until then, and always where this rank has no generator.
        """

    def evaluate(self, prompt_ids: list[list[int]], sampling: SamplingConfig, version: int) -> Generations | None:
        """Completions of the policy at ``version`` on this source's generator, or ``None`` where it has none.

        For evaluation: ``None`` tells the caller to generate in its own process
        with the policy itself. A greedy request (temperature 0) draws no random
        numbers, so the training's sampling streams are the same with or without it.
        """

    def close(self) -> None:
        """Release what the source started."""
