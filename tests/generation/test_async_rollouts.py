"""AsyncRollouts' pipeline, staleness bound and restarts against a stand-in generator: no processes, milliseconds.

The subprocess tests in tests/strategies/test_async.py run the same paths with real generators.
"""

import itertools

import pytest

from lightning_rlhf.generation import Generations, SamplingConfig
from lightning_rlhf.generation.process import GeneratorError
from lightning_rlhf.generation.rollouts import AsyncRollouts

SAMPLING = SamplingConfig(k=1, temperature=1.0, max_new_tokens=2)


class FakeGenerator:
    """Answers requests in order with the weights it last took; dies at its ``die_at`` call, e.g. ``("result", 2)``."""

    def __init__(self, die_at: tuple[str, int] | None = None) -> None:
        self.die_at, self.calls = die_at, {}
        self.version: int | None = None
        self.requests: dict[int, tuple[list[list[int]], int]] = {}
        self.dead = self.closed = False

    def _call(self, kind: str) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        if self.die_at == (kind, self.calls[kind]):
            self.dead = True
        if self.dead:
            raise GeneratorError(f"died at {kind} {self.calls[kind]}")

    def submit(self, request_id, prompt_ids, sampling):
        self._call("submit")
        self.requests[request_id] = (prompt_ids, self.version)

    def result(self, request_id):
        self._call("result")
        prompt_ids, version = self.requests.pop(request_id)
        return Generations(prompt_ids, [[7] for _ in prompt_ids], [[-1.0] for _ in prompt_ids], ["stop"] * len(prompt_ids), version, 1)

    def push_weights(self, named_tensors, version, snapshot=True):
        self._call("push")
        self.version = version
        return 0.0

    def sequence_logprobs(self, prompt_ids, completion_ids, temperature):
        self._call("logprobs")
        return [0.0]

    def close(self):
        self.closed = True


def run(source: AsyncRollouts, batches: int, probe_at: int | None = None) -> tuple[list[int], list[int]]:
    """Drive ``source`` as a module and WeightSync do: step, train, refresh. Returns the prompts trained and their staleness."""
    trained, staleness, version = [], [], 0
    for prompt in range(batches):
        ready = source.step([{"prompt": prompt}], [[prompt]], SAMPLING, version)
        if ready is None:
            continue
        rows, generations = ready
        trained.append(rows[0]["prompt"])
        staleness.append(version - generations.policy_version)
        version += 1
        source.refresh(version)
        if version == probe_at:
            source.sequence_logprobs([1], [2], 1.0, version)
    return trained, staleness


def restarting(first: FakeGenerator, *replacements: FakeGenerator) -> tuple[AsyncRollouts, list[FakeGenerator]]:
    started = [first]
    fresh = iter(replacements) if replacements else (FakeGenerator() for _ in itertools.count())

    def restart():
        started.append(next(fresh))
        return started[-1]

    return AsyncRollouts(first, max_staleness=1, weights=lambda: [], restart=restart), started


@pytest.mark.parametrize("max_staleness, expected", [(0, [0] * 8), (1, [0] + [1] * 6), (2, [0, 1] + [2] * 4)])
def test_the_pipeline_keeps_max_staleness_batches_in_flight(max_staleness, expected):
    source = AsyncRollouts(FakeGenerator(), max_staleness, weights=lambda: [])
    trained, staleness = run(source, 8)
    assert trained == list(range(8 - max_staleness)) and staleness == expected
    assert source.forced_refreshes == 1  # refreshed every version by the caller; only the first was forced


def test_a_refresh_period_longer_than_the_bound_is_made_up_by_forced_refreshes():
    generator = FakeGenerator()
    source = AsyncRollouts(generator, max_staleness=1, weights=lambda: [])
    staleness, version = [], 0
    for prompt in range(9):
        ready = source.step([{"prompt": prompt}], [[prompt]], SAMPLING, version)
        if ready is not None:
            staleness.append(version - ready[1].policy_version)
            version += 1
            if version % 3 == 0:  # the caller refreshes only every 3 versions
                source.refresh(version)
    assert max(staleness) <= 1 and source.forced_refreshes > 1


# the old code lost the batch whose result it was awaiting when the generator died ("result")
@pytest.mark.parametrize("die_at", [("result", 2), ("result", 1), ("submit", 3), ("push", 2), ("logprobs", 1)])
def test_a_replacement_is_asked_again_for_every_batch_in_flight(die_at):
    source, started = restarting(FakeGenerator(die_at=die_at))
    trained, staleness = run(source, 9, probe_at=3)
    assert trained == list(range(8))  # every prompt drawn, once, in order
    assert max(staleness) <= 1
    assert source.restarts == 1 and len(started) == 2 and started[0].closed
    assert started[1].version == 8  # the replacement was refitted, then refreshed as usual


def test_a_replacement_that_dies_while_being_refitted_is_replaced_in_turn():
    source, started = restarting(FakeGenerator(die_at=("result", 2)), FakeGenerator(die_at=("submit", 1)), FakeGenerator())
    trained, _ = run(source, 9)
    assert trained == list(range(8)) and source.restarts == 2


def test_after_max_restarts_failures_in_a_row_the_error_stops_training():
    source, started = restarting(FakeGenerator(die_at=("result", 1)), *[FakeGenerator(die_at=("push", 1)) for _ in range(4)])
    with pytest.raises(GeneratorError, match="died at push 1"):
        run(source, 4)
    assert source.restarts == 3  # max_restarts replacements, then the error


def test_without_restart_a_death_is_an_error():
    source = AsyncRollouts(FakeGenerator(die_at=("result", 1)), max_staleness=1, weights=lambda: [])
    with pytest.raises(GeneratorError):
        run(source, 4)
