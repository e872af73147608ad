"""Several generator processes behind the interface of one (``num_generators``).

Each request's prompts are split into consecutive parts, one per generator;
the parts' rollouts come back in order and are put together again, so the
:class:`~lightning_rlhf.generation.pipeline.PipelinedSource` above sees one
generator: the staleness bound, its accounting and the checkpointed prompts in
flight are unchanged. Every refresh packs the weights once and sends the same
buckets to every generator before any later request, so all parts of a request
are sampled with the same version. A generator that dies fails the pool, and a
restart replaces the whole pool.
"""

from __future__ import annotations

import time

from lightning_rlhf.generation.base import Generations, Probe, SamplingConfig
from lightning_rlhf.generation.process import GeneratorProcess
from lightning_rlhf.generation.weights import RefreshManifest, WeightStream, pack_device, pack_stream


def split_sizes(n: int, parts: int) -> list[int]:
    """``n`` prompts in ``parts`` consecutive parts as even as can be (the first ones take the remainder)."""
    return [n // parts + (i < n % parts) for i in range(parts)]


class GeneratorPool:
    """Generator processes sharing each request (see the module docstring);
    the interface of :class:`GeneratorProcess`."""

    def __init__(self, generators: list[GeneratorProcess]) -> None:
        if not generators:
            raise ValueError("A generator pool needs at least one generator.")
        self.generators = generators
        self._parts: dict[int, list[int]] = {}

    def start(self) -> None:
        for generator in self.generators:
            generator.start()

    @property
    def version(self) -> int | None:
        return self.generators[0].version

    @property
    def pid(self) -> int | None:
        return self.generators[0].pid

    @property
    def pids(self) -> list[int | None]:
        return [g.pid for g in self.generators]

    @property
    def last_refresh_seconds(self) -> float | None:
        seconds = [g.last_refresh_seconds for g in self.generators if g.last_refresh_seconds is not None]
        return max(seconds) if seconds else None

    def alive(self) -> bool:
        return all(g.alive() for g in self.generators)

    def submit(
        self,
        request_id: int,
        prompt_ids: list[list[int]],
        sampling: SamplingConfig,
        rows: list[dict] | None = None,
        score_share: float | None = None,
    ) -> None:
        sizes = split_sizes(len(prompt_ids), len(self.generators))
        start = 0
        for generator, size in zip(self.generators, sizes):
            if size:
                part_rows = rows[start : start + size] if rows is not None else None
                generator.submit(request_id, prompt_ids[start : start + size], sampling, part_rows, score_share)
            start += size
        self._parts[request_id] = sizes

    def result(self, request_id: int) -> Generations:
        sizes = self._parts[request_id]
        parts = [g.result(request_id) for g, size in zip(self.generators, sizes) if size]
        del self._parts[request_id]
        return Generations.concat(parts)

    def push_weights(self, stream: WeightStream, version: int, probe: Probe | None = None) -> float:
        """Pack once, send the same buckets to every generator; returns the seconds the trainer was held up.

        ``probe`` is scored by the first generator (all hold the same weights).
        """
        start = time.perf_counter()
        spec = self.generators[0].spec
        buffers = pack_stream(stream, spec.bucket_bytes, pack_device(spec.transport))
        refit = RefreshManifest(stream.meta, spec.bucket_bytes)
        for i, generator in enumerate(self.generators):
            generator.push_packed(refit, buffers, version, probe if i == 0 else None)
        return time.perf_counter() - start

    def probe_logprobs(self, version: int) -> list[float] | None:
        return self.generators[0].probe_logprobs(version)

    def finish_transfer(self) -> None:
        for generator in self.generators:
            generator.finish_transfer()

    def wait_loaded(self) -> None:
        for generator in self.generators:
            generator.wait_loaded()

    def sequence_logprobs(self, prompt_ids: list[int], completion_ids: list[int], temperature: float) -> list[float]:
        """The first generator's logprobs (all hold the same weights)."""
        return self.generators[0].sequence_logprobs(prompt_ids, completion_ids, temperature)

    def close(self) -> None:
        for generator in self.generators:
            generator.close()
