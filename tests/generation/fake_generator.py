"""A stand-in for :class:`~lightning_rlhf.generation.process.GeneratorProcess`: no process, no model, milliseconds."""

from lightning_rlhf.generation import Generations
from lightning_rlhf.generation.process import GeneratorError


class FakeGenerator:
    """Answers requests in order with the weights it last took; dies at its ``die_at`` call, e.g. ``("result", 2)``."""

    def __init__(self, die_at: tuple[str, int] | None = None) -> None:
        self.die_at, self.calls = die_at, {}
        self.version: int | None = None
        self.requests: dict[int, tuple[list[list[int]], int]] = {}
        self.rows: dict[int, list[dict] | None] = {}  # the rows each request carried (to be scored), by request id
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

    def push_weights(self, stream, version, probe=None):
        self._call("push")
        self.version = version
        self.probes = {**getattr(self, "probes", {}), version: probe}
        return 0.0

    def probe_logprobs(self, version):
        self._call("logprobs")
        return [0.0] if self.probes.get(version) is not None else None

    def close(self):
        self.closed = True
