"""Rollout sources that sample in the training process: on-policy, or from a snapshot for the off-policy experiment.

Both follow :class:`lightning_rlhf.generation.source.RolloutSource`; nothing is ever
in flight, so ``pending_rows`` is empty and a checkpoint has nothing to ask again.
"""

from __future__ import annotations

import copy
import time

import torch

from lightning_rlhf.generation.base import GenerationBackend, Generations, Probe, SamplingConfig
from lightning_rlhf.generation.source import Refresh
from lightning_rlhf.generation.transformers_backend import TransformersBackend


class InProcessSource:
    """Synchronous: sample with the current weights, in this process."""

    samples_in_process = True

    def __init__(self, backend: GenerationBackend) -> None:
        self.backend = backend
        self.refreshes: list[Refresh] = []  # the backend samples from the training weights themselves: nothing to send

    def next_rollouts(
        self, rows: list[dict], prompt_ids: list[list[int]], sampling: SamplingConfig, version: int
    ) -> tuple[list[dict], Generations]:
        if self.backend.share_weights:
            self.backend.load_weights((), version)
        return rows, self.backend.generate(prompt_ids, sampling)

    def after_update(self, version: int) -> None:
        """Nothing to refresh."""

    def pending_rows(self) -> list[list[dict]]:
        return []

    def resubmit(self, batches, prompt_ids, sampling, version) -> None:
        raise RuntimeError(
            "A synchronous run has no prompts in flight to resubmit; "
            "resume an asynchronous checkpoint with an asynchronous strategy."
        )

    def set_probe(self, probe: Probe | None) -> None:
        pass  # no generator apart from the policy itself: nothing to check

    def probe_logprobs(self, version: int) -> None:
        return None

    def evaluate(self, prompt_ids: list[list[int]], sampling: SamplingConfig, version: int) -> None:
        return None  # the caller generates with the policy itself (a snapshot may be older)

    def close(self) -> None:
        self.backend.close()


class SnapshotSource(InProcessSource):
    """Off-policy in one process: sample from a frozen copy of the policy, refreshed every ``every`` versions.

    The paper's off-policy experiment (Noukhovitch et al. 2025, Sec. 3.1): ``N``
    mini-batches are generated with the policy of one moment, then the learner
    takes ``N`` updates on them, one per mini-batch, so mini-batch ``i`` of a
    round is ``i`` versions old when trained on (``0 .. N - 1``). ``every=1`` is
    on-policy and samples exactly what :class:`InProcessSource` samples (same seeded
    streams). No process, no side group: a way to study staleness, not to go faster.

    Args:
        policy: The policy being trained; copied now and at every refresh.
        stop_token_ids: Token ids that end a completion.
        pad_token_id: Id used for padding.
        every: ``N``, the generated batches per policy snapshot.
        seed: Base seed of the sampling streams.
    """

    def __init__(
        self, policy: torch.nn.Module, stop_token_ids: list[int], pad_token_id: int, every: int, seed: int | None = None
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1 (1 is on-policy), got {every}.")
        self.policy = policy
        self.every = every
        self.snapshot = copy.deepcopy(policy).eval().requires_grad_(False)
        super().__init__(
            TransformersBackend(self.snapshot, stop_token_ids, pad_token_id, share_weights=False, seed=seed)
        )
        self.snapshot_version: int | None = None

    def _refresh(self, version: int) -> None:
        """Copy the policy's current weights into the snapshot."""
        start = time.perf_counter()
        with torch.no_grad():
            for target, source in zip(self.snapshot.parameters(), self.policy.parameters()):
                target.copy_(source)
        self.backend.policy_version = version
        self.snapshot_version = version
        self.refreshes.append(Refresh(version, time.perf_counter() - start, "period"))

    def next_rollouts(
        self, rows: list[dict], prompt_ids: list[list[int]], sampling: SamplingConfig, version: int
    ) -> tuple[list[dict], Generations]:
        round_start = version - version % self.every  # the version this round's mini-batches are sampled with
        if self.snapshot_version != round_start:
            self._refresh(round_start)
        return rows, self.backend.generate(prompt_ids, sampling)
