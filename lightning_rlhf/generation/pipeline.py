"""The asynchronous rollout source: a generator process samples ahead of the trainer, within a staleness bound.

Follows :class:`lightning_rlhf.generation.source.RolloutSource`: ``next_rollouts`` takes
this step's prompts and returns the ``(rows, generations)`` to train on now, or
``None`` while the pipeline is filling up.

Staleness (Noukhovitch et al. 2025, Sec. 4): ``version`` counts the generated
batches the policy has been trained on. A rollout sampled with version ``v``
and trained on at version ``u`` is ``u - v`` versions old. With
``max_staleness = N`` the asynchronous source keeps up to ``N`` batches in
flight, so batch ``i`` is sampled while batches ``i - N .. i - 1`` are trained
on; 0 is synchronous, 1 is the paper's "one step behind".

Refreshes are decided here, and only here: after every ``sync_every``-th
version (:meth:`PipelinedSource.after_update`), and before a request that
could otherwise be trained on more than ``N`` versions after the generator's
weights, so the bound holds whatever the refresh period.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import torch

from lightning_rlhf.dtypes import torch_dtype
from lightning_rlhf.generation.base import Generations, Probe, SamplingConfig
from lightning_rlhf.generation.in_process import InProcessSource
from lightning_rlhf.generation.process import GeneratorError, GeneratorHandle, GeneratorProcess
from lightning_rlhf.generation.source import Refresh, RefreshReason
from lightning_rlhf.generation.transformers_backend import TransformersBackend
from lightning_rlhf.generation.weights import WeightStream, policy_state, stream_of
from lightning_rlhf.generation.worker import GeneratorSpec, host_clock
from lightning_rlhf.lora import LoRA, lora_dict
from lightning_rlhf.models import resolve_source, stop_token_ids

T = TypeVar("T")


class ScoringBalance:
    """Chooses how much of each batch the generator scores, so that neither it nor the trainer waits
    (``score_on_generator: auto``).

    Asynchronously the trainer scores and learns on batch ``i`` while the generator
    samples and scores its share of batch ``i + 1``. Each batch tells how far
    off the balance was: ``late``, the moment the generator had it ready minus
    the moment the trainer asked for it (positive: the trainer waited; negative:
    the generator sat idle). That gap grows with the generator's share of this
    batch and with its share of the one before (which the trainer scored the rest
    of meanwhile), each at the rate of the time to score a whole batch, so the
    share that closes it is

        share = (share_i + share_(i-1)) / 2 - gain * late_i / (seconds_gen + seconds_trainer)

    taking the mean of the two shares it measured (an alternation of high and low
    shares would otherwise go unseen) and assuming a prompt costs the trainer what
    it costs a generator (``seconds_trainer = generators * seconds_gen``, the
    generators' parts being scored side by side). The new share applies to the next
    request sent, which is two batches on (one is in flight already). The error
    then evolves as ``e_(i+2) = (1 - gain) * (e_i + e_(i-1)) / 2``: stable for any
    gain up to 2 (so for a cost estimate up to ``2 / gain`` times off), deadbeat at
    1. Each step's gap also jumps either way at random, by as much as the imbalance
    being corrected, so the default closes only 0.3 of each: an error shrinks about
    13 % a step (halved in about five). What was measured on a 2-core CPU, and what a
    larger gain did, is in docs/results.md, section 3, "The numbers behind choices in
    the code".

    Args:
        generators: Generator processes sharing each request.
        share: The first requests' share, before any batch has been measured.
        gain: How much of each measured gap to close.
    """

    def __init__(self, generators: int = 1, share: float = 0.5, gain: float = 0.3) -> None:
        self.generators, self.share, self.gain = generators, share, gain
        self.batch_seconds: float | None = None  # a generator's time to score the whole of its part of a batch
        self.sent: dict[int, float] = {}  # the share each request in flight was sent with
        self.previous: float | None = None  # the share of the batch received before

    def share_for(self, request_id: int) -> float:
        """The share of request ``request_id``'s prompts for the generator to score."""
        self.sent[request_id] = self.share
        return self.share

    def measured(self, request_id: int, generations: Generations, asked_at: float) -> None:
        """Learn from a received batch, which the trainer asked for at ``asked_at`` (:func:`host_clock`)."""
        share = self.sent.pop(request_id, None)
        if share is None or generations.finished_at is None:
            return
        if share >= 0.2:  # a small share's time is mostly per-call overhead: it would overstate the cost
            seconds = generations.scoring_seconds / share
            self.batch_seconds = seconds if self.batch_seconds is None else (self.batch_seconds + seconds) / 2
        previous, self.previous = self.previous, share
        if previous is None:  # the first batch: the trainer asked as the pipeline filled, before any training
            return
        if self.batch_seconds:
            late = generations.finished_at - asked_at
            slope = self.batch_seconds * (1 + self.generators)
            self.share = min(1.0, max(0.0, (share + previous) / 2 - self.gain * late / slope))

    def forget(self) -> None:
        """Requests in flight were dropped (a generator restart sends them again under new ids)."""
        self.sent.clear()


class PipelinedSource:
    """Asynchronous: a generator process samples ahead, at most ``max_staleness`` versions behind.

    Args:
        generator: The generator process.
        max_staleness: Most versions a rollout may lag the policy it trains.
        sync_every: Refresh the generator's weights after every this many versions.
        weights: Returns the policy's weights to send, a :class:`~lightning_rlhf.generation.weights.WeightStream`
            (gathered parameter by parameter under ZeRO-3).
        restart: Starts a replacement generator after a failure; ``None`` lets the failure stop training.
        max_restarts: Most replacements in a row for one call before its error is raised.
        balance: Chooses each training request's share scored on the generator (``score_on_generator: auto``);
            ``None``: the generator's scorer, if any, scores its fixed share.
    """

    samples_in_process = False

    def __init__(
        self,
        generator: GeneratorHandle,
        max_staleness: int,
        sync_every: int,
        weights: Callable[[], WeightStream],
        restart: Callable[[], GeneratorHandle] | None = None,
        max_restarts: int = 3,
        balance: ScoringBalance | None = None,
    ) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be 0 or more, got {max_staleness}.")
        if sync_every < 1:
            raise ValueError(f"sync_every must be at least 1, got {sync_every}.")
        self.generator = generator
        self.max_staleness = max_staleness
        self.sync_every = sync_every
        self.weights = weights
        self.restart = restart
        self.max_restarts = max_restarts
        self.restarts = 0  # generators replaced so far
        self.pending: deque[tuple[int, list[dict], list[list[int]], SamplingConfig]] = deque()
        self.request_ids = 0
        self.refreshes: list[Refresh] = []
        self.balance = balance
        self.probe: Probe | None = None  # scored by the generator after each refresh (set_probe)

    @property
    def forced_refreshes(self) -> int:
        """Refreshes the staleness bound demanded (the first request's included)."""
        return sum(r.reason == "bound" for r in self.refreshes)

    def after_update(self, version: int) -> None:
        if version % self.sync_every == 0:
            self.refresh(version, "period")

    def refresh(self, version: int, reason: RefreshReason) -> None:
        """Send the current weights as ``version``."""
        seconds = self._surviving(lambda: self.generator.push_weights(self.weights(), version, self.probe), version)
        self.refreshes.append(Refresh(version, seconds, reason))

    def set_probe(self, probe: Probe | None) -> None:
        self.probe = probe

    def probe_logprobs(self, version: int) -> list[float] | None:
        """The probe's logprobs after ``version``'s refresh, if its acknowledgement is in; never waits.

        A generator that has failed answers ``None`` here: the next request or
        result meets the failure (and restarts it) on the training path.
        """
        try:
            return self.generator.probe_logprobs(version)
        except GeneratorError:
            return None

    def evaluate(self, prompt_ids: list[list[int]], sampling: SamplingConfig, version: int) -> Generations:
        """Completions of ``version``'s weights on the generator (refreshed first when it holds older ones).

        The request queues behind those in flight; it is not one of them (not in
        ``pending``, not in checkpoints), and a failure is survived like any other call.
        """
        if self.generator.version != version:
            self.refresh(version, "eval")

        def ask() -> Generations:
            return self.generator.result(self._send(prompt_ids, sampling))

        return self._surviving(ask, version)

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
        if self.restart is None:
            raise RuntimeError("PipelinedSource._replace needs a restart function.")
        self.generator.close()
        self.generator = self.restart()
        self.restarts += 1
        seconds = self.generator.push_weights(self.weights(), version, self.probe)
        self.refreshes.append(Refresh(version, seconds, "restart"))
        if self.balance is not None:
            self.balance.forget()
        for i, (_, rows, ids, sampling) in enumerate(self.pending):
            self.pending[i] = (self._send(ids, sampling, rows), rows, ids, sampling)

    def _send(self, prompt_ids: list[list[int]], sampling: SamplingConfig, rows: list[dict] | None = None) -> int:
        """Ask the generator for rollouts of ``prompt_ids`` (scored there, given ``rows``, when it has a scorer);
        returns the request's id (raises if the generator is dead)."""
        request_id, self.request_ids = self.request_ids, self.request_ids + 1
        share = self.balance.share_for(request_id) if rows and self.balance is not None else None
        self.generator.submit(request_id, prompt_ids, sampling, rows, share)
        return request_id

    def _submit(self, rows: list[dict], prompt_ids: list[list[int]], sampling: SamplingConfig) -> None:
        self.pending.append((self._send(prompt_ids, sampling, rows), rows, prompt_ids, sampling))

    def next_rollouts(
        self, rows: list[dict], prompt_ids: list[list[int]], sampling: SamplingConfig, version: int
    ) -> tuple[list[dict], Generations] | None:
        trained_at = version + len(self.pending)  # the version that will train on this request
        if self.generator.version is None or trained_at - self.generator.version > self.max_staleness:
            self.refresh(version, "bound")
        self._surviving(lambda: self._submit(rows, prompt_ids, sampling), version)
        if len(self.pending) <= self.max_staleness:
            return None  # filling the pipeline
        # the oldest request stays in pending until its result is here: a replacement is asked for it again
        asked_at, restarts = host_clock(), self.restarts
        generations = self._surviving(lambda: self.generator.result(self.pending[0][0]), version)
        request_id, rows, _, _ = self.pending.popleft()
        if self.balance is not None and self.restarts == restarts:  # a wait through a restart measures the restart
            self.balance.measured(request_id, generations, asked_at)
        if version - generations.policy_version > self.max_staleness:
            raise RuntimeError(
                f"Rollout {request_id} is {version - generations.policy_version} versions old, "
                f"over max_staleness={self.max_staleness}."
            )
        return rows, generations

    def close(self) -> None:
        self.generator.close()

    def pending_rows(self) -> list[list[dict]]:
        """Prompts requested but not yet trained on (kept in checkpoints so none is lost on resume)."""
        return [rows for _, rows, _, _ in self.pending]

    def resubmit(
        self,
        batches: list[list[dict]],
        prompt_ids: Callable[[list[dict]], list[list[int]]],
        sampling: SamplingConfig,
        version: int,
        refresh: bool = True,
    ) -> None:
        """After a resume: request the checkpoint's pending prompts again, in order, with the current weights.

        ``refresh=False``: the caller has just refreshed (a shared generator, whose ranks refresh together).
        """
        if refresh:
            self.refresh(version, "resume")
        for rows in batches:
            self._surviving(partial(self._submit, rows, prompt_ids(rows), sampling), version)


def start_source(
    model: torch.nn.Module,
    tokenizer,
    policy_source: str,
    max_staleness: int | None,
    sync_every: int = 1,
    backend: str = "transformers",
    seed: int = 0,
    vllm_kwargs: dict | None = None,
    generator_device: str | None = None,
    weight_transport: str = "gloo",
    dtype: str = "auto",
    lora: LoRA | None = None,
) -> InProcessSource | PipelinedSource:
    """A rollout source for a plain (Fabric) training loop; call ``close()`` when done.

    Args:
        model: The policy being trained (unwrapped).
        tokenizer: Its tokenizer.
        policy_source: Where the generator process loads the architecture from (weights are sent before use).
        max_staleness: ``None`` samples in this process with the current weights; ``N`` starts a generator process.
        sync_every: Refresh the generator's weights after every this many versions.
        backend: Generator process backend, ``"transformers"`` or ``"vllm"``.
        seed: Base seed of the sampling streams.
        vllm_kwargs: Extra ``vllm.LLM`` arguments.
        generator_device: Device of the generator process; default: the policy's.
        weight_transport: ``"gloo"``, ``"nccl"`` or ``"cuda_ipc"`` (see :mod:`lightning_rlhf.generation.weights`).
        dtype: Generator weights dtype; ``"auto"``: bfloat16 on a GPU, float32 on CPU.
        lora: The adapter of a LoRA ``model`` (what it was wrapped with); its ``refresh`` says what a refresh sends.
    """
    if max_staleness is None:
        return InProcessSource(
            TransformersBackend(model, stop_token_ids(tokenizer, model), tokenizer.pad_token_id, seed=seed)
        )
    device = generator_device or str(next(model.parameters()).device)
    dtype = resolve_dtype(dtype, device)
    spec = GeneratorSpec(
        backend=backend,
        model=resolve_source(policy_source, "policy model"),
        dtype=dtype,
        seed=seed,
        device=device,
        vllm_kwargs=vllm_kwargs or {},
        transport=weight_transport,
        lora=lora_dict(lora) if lora is not None and lora.refresh == "adapter" else None,
    )
    generator = GeneratorProcess(spec)
    generator.start()
    tied_head = backend == "vllm" and device == "cpu"
    refresh = lora.refresh if lora is not None else "full"
    return PipelinedSource(
        generator,
        max_staleness,
        sync_every,
        lambda: stream_of(policy_state(model, tied_head, refresh), torch_dtype(dtype)),
    )


def resolve_dtype(dtype: str, device: str) -> str:
    """``"auto"``: bfloat16 on a GPU (half the bytes to send and hold), float32 on CPU
    (logprobs equal the trainer's)."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype
