"""Where a training step's rollouts come from: generated now (synchronous) or earlier, by a generator process (asynchronous).

Both sources have one method, ``step(rows, prompt_ids, sampling, version)``:
it takes this step's prompts and returns the ``(rows, generations)`` to train
on now, or ``None`` while the asynchronous pipeline is filling up.

Staleness (Noukhovitch et al. 2025, Sec. 4): ``version`` counts the generated
batches the policy has been trained on. A rollout sampled with version ``v``
and trained on at version ``u`` is ``u - v`` versions old. With
``max_staleness = N`` the asynchronous source keeps up to ``N`` batches in
flight, so batch ``i`` is sampled while batches ``i - N .. i - 1`` are trained
on; 0 is synchronous, 1 is the paper's "one step behind". Before each request
it refreshes the generator's weights itself if the request could otherwise be
trained on more than ``N`` versions later, so the bound holds whatever the
refresh period.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

import torch

from lightning_rlhf.generation.base import GenerationBackend, Generations, SamplingConfig
from lightning_rlhf.generation.process import GeneratorError, GeneratorProcess

T = TypeVar("T")


class LocalRollouts:
    """Synchronous: sample with the current weights, in this process."""

    def __init__(self, backend: GenerationBackend) -> None:
        self.backend = backend

    def refresh(self, version: int) -> float:
        """Nothing to send: the backend samples from the training weights themselves."""
        return 0.0

    def pending_rows(self) -> list[list[dict]]:
        return []  # nothing is ever in flight

    def resubmit(self, batches, prompt_ids, sampling, version) -> None:
        raise RuntimeError("A synchronous run has no prompts in flight to resubmit; resume an asynchronous checkpoint with an asynchronous strategy.")

    def close(self) -> None:
        self.backend.close()

    def step(self, rows: list[dict], prompt_ids: list[list[int]], sampling: SamplingConfig, version: int) -> tuple[list[dict], Generations]:
        if getattr(self.backend, "share_weights", False):
            self.backend.load_weights((), version)
        return rows, self.backend.generate(prompt_ids, sampling)


class SnapshotRollouts(LocalRollouts):
    """Off-policy in one process: sample from a frozen copy of the policy, refreshed every ``every`` versions.

    The paper's off-policy experiment (Noukhovitch et al. 2025, Sec. 3.1): ``N``
    mini-batches are generated with the policy of one moment, then the learner
    takes ``N`` updates on them, one per mini-batch, so mini-batch ``i`` of a
    round is ``i`` versions old when trained on (``0 .. N - 1``). ``every=1`` is
    on-policy and samples exactly what :class:`LocalRollouts` samples (same seeded
    streams). No process, no side group: a way to study staleness, not to go faster.

    Args:
        policy: The policy being trained; copied now and at every refresh.
        stop_token_ids: Token ids that end a completion.
        pad_token_id: Id used for padding.
        every: ``N``, the generated batches per policy snapshot.
        seed: Base seed of the sampling streams.
    """

    def __init__(self, policy: torch.nn.Module, stop_token_ids: list[int], pad_token_id: int, every: int, seed: int | None = None) -> None:
        from lightning_rlhf.generation.transformers_backend import TransformersBackend

        if every < 1:
            raise ValueError(f"every must be at least 1 (1 is on-policy), got {every}.")
        self.policy = policy
        self.every = every
        snapshot = copy.deepcopy(policy).eval().requires_grad_(False)
        super().__init__(TransformersBackend(snapshot, stop_token_ids, pad_token_id, share_weights=False, seed=seed))
        self.snapshot_version: int | None = None

    def refresh(self, version: int) -> float:
        """Copy the policy's current weights into the snapshot."""
        start = time.perf_counter()
        with torch.no_grad():
            for target, source in zip(self.backend.model.parameters(), self.policy.parameters()):
                target.copy_(source)
        self.backend.policy_version = version
        self.snapshot_version = version
        return time.perf_counter() - start

    def step(self, rows: list[dict], prompt_ids: list[list[int]], sampling: SamplingConfig, version: int) -> tuple[list[dict], Generations]:
        round_start = version - version % self.every  # the version this round's mini-batches are sampled with
        if self.snapshot_version != round_start:
            self.refresh(round_start)
        return rows, self.backend.generate(prompt_ids, sampling)


class AsyncRollouts:
    """Asynchronous: a generator process samples ahead, at most ``max_staleness`` versions behind.

    Args:
        generator: The generator process.
        max_staleness: Most versions a rollout may lag the policy it trains.
        weights: Returns the policy's ``(name, tensor)`` pairs to send (gathered under ZeRO-3).
        restart: Starts a replacement generator after a failure; ``None`` lets the failure stop training.
        max_restarts: Most replacements in a row for one call before its error is raised.
    """

    def __init__(
        self,
        generator: GeneratorProcess,
        max_staleness: int,
        weights: Callable[[], list[tuple[str, torch.Tensor]]],
        restart: Callable[[], GeneratorProcess] | None = None,
        max_restarts: int = 3,
    ) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be 0 or more, got {max_staleness}.")
        self.generator = generator
        self.max_staleness = max_staleness
        self.weights = weights
        self.restart = restart
        self.max_restarts = max_restarts
        self.restarts = 0
        self.pending: deque[tuple[int, list[dict], list[list[int]], SamplingConfig]] = deque()
        self.request_ids = 0
        self.forced_refreshes = 0
        self.refresh_seconds: list[float] = []
        # synchronous (0): the trainer waits for the next rollouts, which the generator samples only after
        # taking the weights, so they are unchanged until sent; otherwise the next step trains meanwhile
        self._snapshot = max_staleness > 0

    def refresh(self, version: int) -> float:
        """Send the current weights as ``version``; returns the trainer-side seconds."""
        seconds = self._surviving(lambda: self.generator.push_weights(self.weights(), version, snapshot=self._snapshot), version)
        self.refresh_seconds.append(seconds)
        return seconds

    def sequence_logprobs(self, prompt_ids: list[int], completion_ids: list[int], temperature: float, version: int) -> list[float]:
        """The generator's logprobs of a probe sequence (after a failure, of its replacement, refitted to ``version``)."""
        return self._surviving(lambda: self.generator.sequence_logprobs(prompt_ids, completion_ids, temperature), version)

    def _surviving(self, call: Callable[[], T], version: int) -> T:
        """``call()``; when the generator dies and ``restart`` is set, replace it and call again.

        Whatever the call was (a request, a result, a refresh, a probe), every
        request in flight survives: nothing leaves ``pending`` before its result
        is in hand, and the replacement is asked for all of ``pending`` again, in
        order, so each prompt drawn is trained once, in the order of an
        uninterrupted run. After ``max_restarts`` failures in a row the last
        error is raised: a generator that dies at once again is not restarted forever.
        """
        failures = 0
        while True:
            try:
                if failures:
                    self._replace(version)
                return call()
            except GeneratorError:
                failures += 1
                if self.restart is None or failures > self.max_restarts:
                    raise

    def _replace(self, version: int) -> None:
        """A fresh generator, refitted with the weights of ``version``, asked again for every request in flight.

        Entries of ``pending`` are renumbered in place, never removed, so a
        replacement that dies in turn part-way through leaves nothing out.
        """
        self.generator.close()
        self.generator = self.restart()
        self.restarts += 1
        self.refresh_seconds.append(self.generator.push_weights(self.weights(), version, snapshot=self._snapshot))
        for i, (_, rows, ids, sampling) in enumerate(self.pending):
            self.pending[i] = (self._send(ids, sampling), rows, ids, sampling)

    def _send(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> int:
        """Ask the generator for rollouts of ``prompt_ids``; returns the request's id (raises if the generator is dead)."""
        request_id, self.request_ids = self.request_ids, self.request_ids + 1
        self.generator.submit(request_id, prompt_ids, sampling)
        return request_id

    def _submit(self, rows: list[dict], prompt_ids: list[list[int]], sampling: SamplingConfig) -> None:
        self.pending.append((self._send(prompt_ids, sampling), rows, prompt_ids, sampling))

    def step(self, rows: list[dict], prompt_ids: list[list[int]], sampling: SamplingConfig, version: int) -> tuple[list[dict], Generations] | None:
        trained_at = version + len(self.pending)  # the version that will train on this request
        if self.generator.version is None or trained_at - self.generator.version > self.max_staleness:
            self.refresh(version)
            self.forced_refreshes += 1
        self._surviving(lambda: self._submit(rows, prompt_ids, sampling), version)
        if len(self.pending) <= self.max_staleness:
            return None  # filling the pipeline
        # the oldest request stays in pending until its result is here: a replacement is asked for it again
        generations = self._surviving(lambda: self.generator.result(self.pending[0][0]), version)
        request_id, rows, _, _ = self.pending.popleft()
        if version - generations.policy_version > self.max_staleness:
            raise RuntimeError(f"Rollout {request_id} is {version - generations.policy_version} versions old, over max_staleness={self.max_staleness}.")
        return rows, generations

    def close(self) -> None:
        self.generator.close()

    def pending_rows(self) -> list[list[dict]]:
        """Prompts requested but not yet trained on (kept in checkpoints so none is lost on resume)."""
        return [rows for _, rows, _, _ in self.pending]

    def resubmit(self, batches: list[list[dict]], prompt_ids: Callable[[list[dict]], list[list[int]]], sampling: SamplingConfig, version: int) -> None:
        """After a resume: request the checkpoint's pending prompts again, in order, with the current weights."""
        self.refresh(version)
        for rows in batches:
            ids = prompt_ids(rows)
            self._surviving(lambda: self._submit(rows, ids, sampling), version)


class SharedRollouts:
    """Several training ranks, one generator: the paper's layout of one generation device beside N training devices.

    Global rank 0 owns the generator and its :class:`AsyncRollouts`. At every
    step each rank sends its prompts to rank 0 (over ``group``, a gloo group of
    all ranks, so objects never touch the GPUs), rank 0 submits them as one
    request and sends each rank its share of the rollouts that come back: the
    same pipeline, staleness bound and refresh rule as one rank with its own
    generator, on the ranks' prompts together. Weights are refreshed from rank
    0 alone, which holds the same weights as every rank under DDP (ZeRO-3
    shards them, so it is not supported there). Every rank keeps its own
    prompts in flight, so checkpoints and resumes work as with a generator per
    rank. A failure on rank 0 is raised on every rank, so none waits forever.

    Args:
        inner: Rank 0's asynchronous rollouts; ``None`` on every other rank.
        group: Process group of all training ranks, gloo backend.
    """

    def __init__(self, inner: AsyncRollouts | None, group) -> None:
        import torch.distributed as dist

        self.inner = inner
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        if (self.rank == 0) != (inner is not None):
            raise ValueError("Rank 0, and only rank 0, owns the shared generator's rollouts.")
        self.pending: deque[list[dict]] = deque()  # this rank's prompts in flight, in order

    @property
    def generator(self) -> GeneratorProcess | None:
        return self.inner.generator if self.inner is not None else None

    @property
    def restarts(self) -> int:
        return self.inner.restarts if self.inner is not None else 0

    @property
    def forced_refreshes(self) -> int:
        return self.inner.forced_refreshes if self.inner is not None else 0

    def sequence_logprobs(self, prompt_ids: list[int], completion_ids: list[int], temperature: float, version: int) -> list[float]:
        """Rank 0 only: the shared generator's logprobs of a probe sequence."""
        if self.inner is None:
            raise RuntimeError("Only rank 0 runs the shared generator; probe it there.")
        return self.inner.sequence_logprobs(prompt_ids, completion_ids, temperature, version)

    def refresh(self, version: int) -> float:
        """Rank 0 sends its weights (the others have the same); every rank takes part, so all hear of a failure."""
        return self._exchange(None, lambda _: [self.inner.refresh(version)] * self.world_size)

    def _exchange(self, mine, work: Callable[[list], list]):
        """Gather every rank's ``mine`` on rank 0, run ``work`` on the list there, give each rank its entry back."""
        import torch.distributed as dist

        owner = dist.get_global_rank(self.group, 0)
        gathered = [None] * self.world_size if self.rank == 0 else None
        shares, failure = [None] * self.world_size, None
        received = [None]
        try:
            dist.gather_object(mine, gathered, dst=owner, group=self.group)
            if self.rank == 0:
                try:
                    shares = [("ok", share) for share in work(gathered)]
                except Exception as err:  # every rank must hear of it, or the others wait for their share forever
                    failure = err
                    shares = [("error", f"{type(err).__name__}: {' '.join(str(err).split())[:600]}")] * self.world_size
            dist.scatter_object_list(received, shares if self.rank == 0 else None, src=owner, group=self.group)
        except RuntimeError as err:
            if self.rank == 0:
                raise
            raise GeneratorError(f"Rank {self.rank} lost rank 0, which runs the shared generator ({' '.join(str(err).split())[:200]}); rank 0's error says why.") from err
        if failure is not None:
            raise failure
        status, value = received[0]
        if status == "error":
            raise GeneratorError(f"The shared generator on rank 0 failed: {value}")
        return value

    def step(self, rows: list[dict], prompt_ids: list[list[int]], sampling: SamplingConfig, version: int) -> tuple[list[dict], Generations] | None:
        def work(per_rank: list) -> list:
            ready = self.inner.step([r for r, _ in per_rank], [ids for _, rank_ids in per_rank for ids in rank_ids], sampling, version)
            if ready is None:
                return [None] * self.world_size
            rows_per_rank, generations = ready
            return list(zip(rows_per_rank, generations.split([len(r) for r in rows_per_rank])))

        self.pending.append(rows)
        share = self._exchange((rows, prompt_ids), work)
        if share is not None:
            self.pending.popleft()
        return share

    def pending_rows(self) -> list[list[dict]]:
        """This rank's prompts requested but not yet trained on."""
        return list(self.pending)

    def resubmit(self, batches: list[list[dict]], prompt_ids: Callable[[list[dict]], list[list[int]]], sampling: SamplingConfig, version: int) -> None:
        """After a restart: every rank's checkpointed prompts in flight go to the generator again, step by step."""

        def work(per_rank: list) -> list:
            if len({len(b) for b in per_rank}) > 1:
                raise ValueError(f"The ranks resume with different numbers of batches in flight ({[len(b) for b in per_rank]}); resume on the layout that saved the checkpoint.")
            steps = [list(step) for step in zip(*per_rank)]  # step j: every rank's j-th batch
            self.inner.resubmit(steps, lambda rows_per_rank: [ids for rows in rows_per_rank for ids in prompt_ids(rows)], sampling, version)
            return [None] * self.world_size

        self._exchange(batches, work)
        self.pending = deque(batches)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


def start_rollouts(
    model: torch.nn.Module,
    tokenizer,
    policy_source: str,
    max_staleness: int | None,
    backend: str = "transformers",
    seed: int = 0,
    vllm_kwargs: dict | None = None,
    generator_device: str | None = None,
    weight_transport: str = "gloo",
) -> LocalRollouts | AsyncRollouts:
    """A rollout source for a plain (Fabric) training loop; call ``close()`` when done.

    Args:
        model: The policy being trained (unwrapped).
        tokenizer: Its tokenizer.
        policy_source: Where the generator process loads the architecture from (weights are sent before use).
        max_staleness: ``None`` samples in this process with the current weights; ``N`` starts a generator process.
        backend: Generator process backend, ``"transformers"`` or ``"vllm"``.
        seed: Base seed of the sampling streams.
        vllm_kwargs: Extra ``vllm.LLM`` arguments.
        generator_device: Device of the generator process; default: the policy's.
        weight_transport: ``"gloo"`` or ``"nccl"`` (see :mod:`lightning_rlhf.generation.weights`).
    """
    from lightning_rlhf.generation.process import GeneratorSpec
    from lightning_rlhf.generation.transformers_backend import TransformersBackend
    from lightning_rlhf.generation.weights import policy_state
    from lightning_rlhf.models import resolve_source

    if max_staleness is None:
        return LocalRollouts(TransformersBackend(model, [tokenizer.eos_token_id], tokenizer.pad_token_id, seed=seed))
    device = generator_device or str(next(model.parameters()).device)
    spec = GeneratorSpec(backend=backend, model=resolve_source(policy_source, "policy model"), seed=seed, device=device, vllm_kwargs=vllm_kwargs or {}, transport=weight_transport)
    generator = GeneratorProcess(spec)
    generator.start()
    return AsyncRollouts(generator, max_staleness, lambda: policy_state(model))
