"""SharedSource against a stand-in generator: the exchange, the refresh rule and the pending prompts, no processes.

One rank runs over a real gloo group of one; several ranks run as threads of this process over
:class:`ThreadRanks`, a stand-in for the object collectives SharedSource makes. The runs with real
generators and real ranks are in tests/strategies/test_async.py.
"""

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from fake_generator import FakeGenerator, Policy, weights_of
from lightning_rlhf.generation import SamplingConfig, shared
from lightning_rlhf.generation.pipeline import PipelinedSource
from lightning_rlhf.generation.process import GeneratorError
from lightning_rlhf.generation.shared import SharedSource

SAMPLING = SamplingConfig(k=1, temperature=1.0, max_new_tokens=2)


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist.new_group(backend="gloo")
    dist.destroy_process_group()


class ThreadRanks:
    """``world_size`` ranks as threads: the calls SharedSource makes of ``torch.distributed``, where a rank's group is its handle."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=5)  # a rank that skips a collective fails, never hangs
        self.slots: list = [None] * world_size

    def group(self, rank: int) -> SimpleNamespace:
        return SimpleNamespace(rank=rank)

    def get_rank(self, group) -> int:
        return group.rank

    def get_world_size(self, group) -> int:
        return self.world_size

    def get_global_rank(self, group, rank: int) -> int:
        return rank

    def gather_object(self, obj, gathered, dst, group) -> None:
        self.slots[group.rank] = obj
        self.barrier.wait()
        if group.rank == dst:
            gathered[:] = self.slots
        self.barrier.wait()

    def scatter_object_list(self, received, shares, src, group) -> None:
        if group.rank == src:
            self.slots = list(shares)
        self.barrier.wait()
        received[0] = self.slots[group.rank]
        self.barrier.wait()


@pytest.fixture
def two_ranks(monkeypatch) -> ThreadRanks:
    ranks = ThreadRanks(2)
    monkeypatch.setattr(shared, "dist", ranks)
    return ranks


def in_lockstep(*per_rank):
    """Run each rank's function in its own thread; their results in rank order."""
    with ThreadPoolExecutor(len(per_rank)) as pool:
        futures = [pool.submit(run) for run in per_rank]
        return [future.result(timeout=30) for future in futures]


def drive(
    source: SharedSource, policy: Policy, batches: int, first_prompt: int = 0, probe_at: int | None = None
) -> tuple[list[int], list[int]]:
    """Step, train ``policy``, after_update, as an RL module does. Returns the prompts trained and their staleness."""
    trained, staleness, version = [], [], 0
    for prompt in range(first_prompt, first_prompt + batches):
        ready = source.next_rollouts([{"prompt": prompt}], [[prompt]], SAMPLING, version)
        if ready is None:
            assert source.pending_rows()[-1] == [{"prompt": prompt}]  # in flight, kept for a checkpoint
            continue
        rows, generations = ready
        trained.append(rows[0]["prompt"])
        staleness.append(version - generations.policy_version)
        version = policy.version = version + 1
        source.after_update(version)
        if version == probe_at:
            source.probe_logprobs(version)
    return trained, staleness


@pytest.mark.parametrize("max_staleness, sync_every", [(0, 1), (1, 1), (1, 3), (2, 2)])
def test_the_shared_pipeline_keeps_the_bound_and_the_refresh_period(group, max_staleness, sync_every):
    policy = Policy()
    inner = PipelinedSource(FakeGenerator(), max_staleness, sync_every, weights=policy.weights)
    source = SharedSource(inner, group, sync_every, max_staleness, policy.weights)
    trained, staleness = drive(source, policy, 9)
    assert trained == list(range(9 - max_staleness)) and max(staleness) <= max_staleness
    periodic = [r.version for r in source.refreshes if r.reason == "period"]
    assert periodic == list(range(sync_every, 9 - max_staleness + 1, sync_every))
    assert len(source.pending_rows()) == max_staleness


@pytest.mark.parametrize("max_staleness, sync_every", [(1, 3), (0, 1), (1, 1), (2, 2), (2, 5)])
def test_every_rank_takes_part_in_every_refresh_rank_0_makes(two_ranks, max_staleness, sync_every):
    policies, generator = [Policy(), Policy()], FakeGenerator()
    inner = PipelinedSource(generator, max_staleness, sync_every, weights=policies[0].weights)
    sources = [
        SharedSource(inner, two_ranks.group(0), sync_every, max_staleness, policies[0].weights),
        SharedSource(None, two_ranks.group(1), sync_every, max_staleness, policies[1].weights),
    ]
    (trained_0, staleness_0), (trained_1, staleness_1) = in_lockstep(
        lambda: drive(sources[0], policies[0], 9), lambda: drive(sources[1], policies[1], 9, first_prompt=100)
    )
    # each rank trains its own prompts, in order, within the bound
    assert trained_0 == list(range(9 - max_staleness)) and trained_1 == list(range(100, 109 - max_staleness))
    assert staleness_0 == staleness_1 and max(staleness_0) <= max_staleness
    # rank 0's generator was refreshed exactly when rank 1 took part, and each rank read its weights each time
    refreshes = [[(r.version, r.reason) for r in source.refreshes] for source in sources]
    assert refreshes[0] == refreshes[1]
    assert policies[0].streams == policies[1].streams == len(refreshes[0])
    if (max_staleness, sync_every) == (1, 3):
        # by hand: the request sent at version v is trained at v + 1, so the bound refreshes whenever the
        # generator holds v - 1 or older; the period refreshes after versions 3 and 6
        bound, period = [0, 1, 2, 4, 5, 7], [3, 6]
        assert refreshes[0] == sorted([(v, "bound") for v in bound] + [(v, "period") for v in period])


# as the pipeline's own test: the old code lost the batch whose result it was awaiting when the generator died
@pytest.mark.parametrize("die_at", [("result", 2), ("result", 1), ("submit", 3), ("push", 2), ("logprobs", 1)])
def test_a_replacement_of_the_shared_generator_is_asked_again_for_every_rank_s_batches_in_flight(two_ranks, die_at):
    policies, started = [Policy(), Policy()], [FakeGenerator(die_at=die_at)]
    fresh = (FakeGenerator() for _ in itertools.count())

    def restart():
        started.append(next(fresh))
        return started[-1]

    inner = PipelinedSource(started[0], 1, 1, weights=policies[0].weights, restart=restart)
    sources = [
        SharedSource(inner, two_ranks.group(0), 1, 1, policies[0].weights),
        SharedSource(None, two_ranks.group(1), 1, 1, policies[1].weights),
    ]
    (trained_0, staleness_0), (trained_1, staleness_1) = in_lockstep(
        lambda: drive(sources[0], policies[0], 9, probe_at=3),
        lambda: drive(sources[1], policies[1], 9, first_prompt=100, probe_at=3),
    )
    assert trained_0 == list(range(8)) and trained_1 == list(range(100, 108))  # every prompt drawn, once, in order
    assert max(staleness_0 + staleness_1) <= 1
    assert sources[0].restarts == 1 and len(started) == 2 and started[0].closed
    assert started[1].version == 8 and torch.equal(started[1].weights["w"], weights_of(8)["w"])
    # the refit is rank 0's alone; every other refresh was made by both ranks
    assert [r for r in sources[0].refreshes if r.reason != "restart"] == sources[1].refreshes
    assert [r.reason for r in sources[0].refreshes].count("restart") == 1


def test_a_failure_on_rank_0_reaches_every_rank(two_ranks):
    policies = [Policy(), Policy()]
    inner = PipelinedSource(FakeGenerator(die_at=("result", 1)), 1, 1, weights=policies[0].weights)
    sources = [
        SharedSource(inner, two_ranks.group(0), 1, 1, policies[0].weights),
        SharedSource(None, two_ranks.group(1), 1, 1, policies[1].weights),
    ]

    def expect_failure(rank: int) -> str:
        with pytest.raises(GeneratorError, match="died at result 1") as failure:
            drive(sources[rank], policies[rank], 3)
        return str(failure.value)

    on_rank_0, on_rank_1 = in_lockstep(lambda: expect_failure(0), lambda: expect_failure(1))
    assert on_rank_0 == "died at result 1"
    assert on_rank_1 == "The shared generator on rank 0 failed: GeneratorError: died at result 1"


def test_a_failure_on_rank_0_reaches_the_caller(group):
    policy = Policy()
    inner = PipelinedSource(FakeGenerator(die_at=("result", 1)), 1, 1, weights=policy.weights)
    source = SharedSource(inner, group, 1, 1, policy.weights)
    with pytest.raises(GeneratorError, match="died at result 1"):
        drive(source, policy, 3)


def test_only_rank_0_owns_the_generator(group):
    with pytest.raises(ValueError, match="Rank 0, and only rank 0"):
        SharedSource(None, group, 1, 1, Policy().weights)
