"""One generator for several training ranks: the paper's layout of one generation device beside N training devices.

Follows :class:`lightning_rlhf.generation.source.RolloutSource` on every rank;
rank 0 runs the :class:`~lightning_rlhf.generation.pipeline.PipelinedSource`
that does the work.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from lightning_rlhf.generation.base import Generations, Probe, SamplingConfig
from lightning_rlhf.generation.pipeline import PipelinedSource
from lightning_rlhf.generation.process import GeneratorError, GeneratorHandle
from lightning_rlhf.generation.source import Refresh, RefreshReason
from lightning_rlhf.generation.weights import WeightStream


class SharedSource:
    """Several training ranks, one generator: the paper's layout of one generation device beside N training devices.

    Global rank 0 owns the generator and its :class:`~lightning_rlhf.generation.pipeline.PipelinedSource`. At every
    step each rank sends its prompts to rank 0 (over ``group``, a gloo group of
    all ranks, so objects never touch the GPUs), rank 0 submits them as one
    request and sends each rank its share of the rollouts that come back: the
    same pipeline, staleness bound and refresh rule as one rank with its own
    generator, on the ranks' prompts together. Rank 0 sends the weights, and
    every rank reads its own :class:`~lightning_rlhf.generation.weights.WeightStream`
    alongside: under ZeRO-3 (the paper's chat layout: seven sharded training
    GPUs beside one generation GPU) that is each parameter's gather. So every
    refresh is decided identically on every rank, here, before rank 0's
    pipeline would decide it alone. Every rank keeps its own prompts in flight,
    so checkpoints and resumes work as with a generator per rank. A failure on
    rank 0 is raised on every rank, so none waits forever.

    Args:
        inner: Rank 0's pipelined source; ``None`` on every other rank.
        group: Process group of all training ranks, gloo backend.
        sync_every: Refresh the generator's weights after every this many versions (all ranks take part).
        max_staleness: The pipeline's bound (the same as ``inner``'s).
        weights: This rank's weight stream, read at every refresh (rank 0's is ``inner``'s).
    """

    samples_in_process = False

    def __init__(
        self,
        inner: PipelinedSource | None,
        group,
        sync_every: int,
        max_staleness: int,
        weights: Callable[[], WeightStream],
    ) -> None:
        self.inner = inner
        self.group = group
        self.sync_every = sync_every
        self.max_staleness = max_staleness
        self.weights = weights
        self.generator_version: int | None = None  # the version last refreshed, known alike on every rank
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        if (self.rank == 0) != (inner is not None):
            raise ValueError("Rank 0, and only rank 0, owns the shared generator's rollouts.")
        self.pending: deque[list[dict]] = deque()  # this rank's prompts in flight, in order
        self._sizes: deque[list[int]] = deque()  # rank 0: each request in flight's prompts per rank, in order
        self._refreshes: list[
            Refresh
        ] = []  # on the ranks without the generator: the periodic refreshes they took part in

    @property
    def generator(self) -> GeneratorHandle | None:
        return self.inner.generator if self.inner is not None else None

    def _owner(self) -> PipelinedSource:
        """Rank 0's pipelined source (only rank 0 calls this)."""
        if self.inner is None:
            raise RuntimeError(f"Rank {self.rank} has no shared generator; only rank 0 runs it.")
        return self.inner

    @property
    def restarts(self) -> int:
        return self.inner.restarts if self.inner is not None else 0

    @property
    def forced_refreshes(self) -> int:
        return self.inner.forced_refreshes if self.inner is not None else 0

    @property
    def refreshes(self) -> list[Refresh]:
        return self.inner.refreshes if self.inner is not None else self._refreshes

    def set_probe(self, probe: Probe | None) -> None:
        if self.inner is not None:
            self.inner.set_probe(probe)

    def probe_logprobs(self, version: int) -> list[float] | None:
        """The shared generator's answer on rank 0; ``None`` on the other ranks."""
        return self.inner.probe_logprobs(version) if self.inner is not None else None

    def evaluate(self, prompt_ids: list[list[int]], sampling: SamplingConfig, version: int) -> None:
        """``None``: each rank evaluates in its own process
        (a refresh for rank 0 alone would leave the others behind)."""
        return None

    def after_update(self, version: int) -> None:
        if version % self.sync_every == 0:
            self._refresh(version, "period")

    def _refresh(self, version: int, reason: RefreshReason) -> None:
        """Every rank reads its weights (their gathers under ZeRO-3), rank 0 sends; a failure reaches every rank."""
        failure = None
        if self.inner is not None:
            weights, opened = self.inner.weights, []

            def opening() -> WeightStream:  # the streams rank 0 opens, recorded
                opened.append(weights())
                return opened[-1]

            self.inner.weights = opening
            try:
                self.inner.refresh(version, reason)
            except Exception as err:  # reported through the exchange, after every rank is done gathering
                failure = err
                # The other ranks are reading their streams, which under ZeRO-3 gather each parameter with
                # every rank: read the rest of ours too (all of it, when the refresh failed before opening
                # it), so that no rank is left in a gather rank 0 skipped (issue 30, defect a; a hang
                # there was not reproduced on CPU ranks).
                (opened[-1] if opened else weights()).drain()
            finally:
                self.inner.weights = weights
        else:
            self.weights().drain()

        def work(_: list) -> list:
            if failure is not None:
                raise failure
            return [self._owner().refreshes[-1]] * self.world_size

        refresh = self._exchange(None, work)
        self.generator_version = version
        if self.inner is None:
            self._refreshes.append(refresh)

    def _exchange(self, mine, work: Callable[[list], list]):
        """Gather every rank's ``mine`` on rank 0, run ``work`` on the list there, give each rank its entry back."""
        owner = dist.get_global_rank(self.group, 0)
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        shares: list[tuple[str, Any]] = []
        failure: Exception | None = None
        received: list[Any] = [None]
        try:
            dist.gather_object(mine, gathered, dst=owner, group=self.group)
            if self.rank == 0:
                try:
                    shares = [("ok", share) for share in work(gathered or [])]
                except Exception as err:  # every rank must hear of it, or the others wait for their share forever
                    failure = err
                    shares = [("error", f"{type(err).__name__}: {' '.join(str(err).split())[:600]}")] * self.world_size
            dist.scatter_object_list(received, shares if self.rank == 0 else None, src=owner, group=self.group)
        except RuntimeError as err:
            if self.rank == 0:
                raise
            raise GeneratorError(
                f"Rank {self.rank} lost rank 0, which runs the shared generator "
                f"({' '.join(str(err).split())[:200]}); rank 0's error says why."
            ) from err
        if failure is not None:
            raise failure
        status, value = received[0]
        if status == "error":
            raise GeneratorError(f"The shared generator on rank 0 failed: {value}")
        return value

    def next_rollouts(
        self, rows: list[dict], prompt_ids: list[list[int]], sampling: SamplingConfig, version: int
    ) -> tuple[list[dict], Generations] | None:
        def work(per_rank: list[tuple[list[dict], list[list[int]]]]) -> list:
            inner = self._owner()
            self._sizes.append([len(rank_rows) for rank_rows, _ in per_rank])
            ready = inner.next_rollouts(
                [row for rank_rows, _ in per_rank for row in rank_rows],
                [ids for _, rank_ids in per_rank for ids in rank_ids],
                sampling,
                version,
            )
            if ready is None:
                return [None] * self.world_size
            rows, generations = ready
            sizes = self._sizes.popleft()  # the request answered is the oldest in flight
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            rows_per_rank = [rows[start : start + size] for start, size in zip(starts, sizes)]
            return list(zip(rows_per_rank, generations.split(sizes)))

        trained_at = version + len(self.pending)  # as PipelinedSource.step decides, so rank 0's never differs
        if self.generator_version is None or trained_at - self.generator_version > self.max_staleness:
            self._refresh(version, "bound")
        self.pending.append(rows)
        share = self._exchange((rows, prompt_ids), work)
        if share is not None:
            self.pending.popleft()
        return share

    def pending_rows(self) -> list[list[dict]]:
        """This rank's prompts requested but not yet trained on."""
        return list(self.pending)

    def resubmit(
        self,
        batches: list[list[dict]],
        prompt_ids: Callable[[list[dict]], list[list[int]]],
        sampling: SamplingConfig,
        version: int,
    ) -> None:
        """After a restart: every rank's checkpointed prompts in flight go to the generator again, step by step."""

        def work(per_rank: list[list[list[dict]]]) -> list:
            if len({len(b) for b in per_rank}) > 1:
                raise ValueError(
                    f"The ranks resume with different numbers of batches in flight ({[len(b) for b in per_rank]}); "
                    "resume on the layout that saved the checkpoint."
                )
            steps = list(zip(*per_rank))  # step j: every rank's j-th batch
            self._sizes = deque([len(rows) for rows in step] for step in steps)
            flat = [[row for rows in step for row in rows] for step in steps]
            self._owner().resubmit(flat, prompt_ids, sampling, version, refresh=False)
            return [None] * self.world_size

        self._refresh(version, "resume")
        self._exchange(batches, work)
        self.pending = deque(batches)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
