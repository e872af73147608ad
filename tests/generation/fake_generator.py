"""A stand-in for :class:`~lightning_rlhf.generation.process.GeneratorProcess`: no process, no model, milliseconds.

The policy is a stand-in too: :class:`Policy` holds one small tensor that
records the version it was trained to, so the weights every refresh carries
say which version they are, and :class:`FakeGenerator` refuses any refresh
whose weights are not those of the version it is told.
"""

import torch

from lightning_rlhf.generation import Generations
from lightning_rlhf.generation.process import GeneratorError
from lightning_rlhf.generation.weights import WeightStream, stream_of


def weights_of(version: int) -> dict[str, torch.Tensor]:
    """The stand-in policy's weights at ``version``."""
    return {"w": torch.full((2,), float(version)), "step": torch.tensor([version])}


class Policy:
    """The trainer's policy, a stand-in: trained to ``version`` (the test moves it on), streamed as a refresh reads it.

    ``streams`` counts the weight streams read to their end (under ZeRO-3, each is a round of gathers with every rank).
    """

    def __init__(self, version: int = 0) -> None:
        self.version, self.streams = version, 0

    def weights(self) -> WeightStream:
        stream = stream_of(list(weights_of(self.version).items()))
        return WeightStream(stream.meta, self._counted(stream.tensors))

    def _counted(self, tensors):
        yield from tensors
        self.streams += 1


class FakeGenerator:
    """Answers requests in order with the weights it last took; dies at its ``die_at`` call, e.g. ``("result", 2)``.

    A refresh reads the :class:`WeightStream` as a generator does (the description, then every tensor, once)
    and must carry ``weights_of(version)``: stale or wrong weights raise ``AssertionError``, which no
    source survives. ``weights`` is what the last refresh carried.
    """

    def __init__(self, die_at: tuple[str, int] | None = None) -> None:
        self.die_at, self.calls = die_at, {}
        self.version: int | None = None
        self.weights: dict[str, torch.Tensor] | None = None
        self.requests: dict[int, tuple[list[list[int]], int]] = {}
        self.rows: dict[int, list[dict] | None] = {}  # the rows each request carried (to be scored), by request id
        self.probes: dict[int, object] = {}  # the probe each refresh carried, by version
        self.dead = self.closed = False

    def _call(self, kind: str) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        if self.die_at == (kind, self.calls[kind]):
            self.dead = True
        if self.dead:
            raise GeneratorError(f"died at {kind} {self.calls[kind]}")

    def submit(self, request_id, prompt_ids, sampling, rows=None, score_share=None):
        self._call("submit")
        self.requests[request_id] = (prompt_ids, self.version)
        self.rows[request_id] = rows

    def result(self, request_id):
        self._call("result")
        prompt_ids, version = self.requests.pop(request_id)
        return Generations(
            prompt_ids, [[7] for _ in prompt_ids], [[-1.0] for _ in prompt_ids], ["stop"] * len(prompt_ids), version, 1
        )

    def push_weights(self, stream: WeightStream, version, probe=None):
        self._call("push")
        tensors = list(stream.tensors)
        assert len(tensors) == len(stream.meta), f"{len(stream.meta)} tensors described, {len(tensors)} sent"
        received = {}
        for (name, shape, dtype), tensor in zip(stream.meta, tensors):
            assert tuple(tensor.shape) == tuple(shape), f"{name}: described as {shape}, sent as {tuple(tensor.shape)}"
            received[name] = tensor.detach().to(getattr(torch, dtype)).clone()  # a generator loads a copy
        expected = weights_of(version)
        assert received.keys() == expected.keys() and all(torch.equal(received[n], expected[n]) for n in expected), (
            f"the refresh to version {version} carried {received}, not that version's weights {expected}"
        )
        self.version, self.weights = version, received
        self.probes[version] = probe
        return 0.0

    def probe_logprobs(self, version):
        self._call("logprobs")
        return [0.0] if self.probes.get(version) is not None else None

    def close(self):
        self.closed = True
