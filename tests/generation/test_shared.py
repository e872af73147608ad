"""SharedSource on one rank against a stand-in generator: the exchange, the refresh rule and the pending prompts, no processes.

The two-rank runs with real generators are in tests/strategies/test_async.py.
"""

import pytest
import torch.distributed as dist

from fake_generator import FakeGenerator
from lightning_rlhf.generation import SamplingConfig
from lightning_rlhf.generation.pipeline import PipelinedSource
from lightning_rlhf.generation.process import GeneratorError
from lightning_rlhf.generation.shared import SharedSource
from lightning_rlhf.generation.weights import WeightStream

SAMPLING = SamplingConfig(k=1, temperature=1.0, max_new_tokens=2)


def no_weights() -> WeightStream:
    return WeightStream([], [])


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist.new_group(backend="gloo")
    dist.destroy_process_group()


def drive(source: SharedSource, batches: int) -> tuple[list[int], list[int]]:
    """Step, train, after_update, as an RL module does. Returns the prompts trained and their staleness."""
    trained, staleness, version = [], [], 0
    for prompt in range(batches):
        ready = source.step([{"prompt": prompt}], [[prompt]], SAMPLING, version)
        if ready is None:
            assert source.pending_rows()[-1] == [{"prompt": prompt}]  # in flight, kept for a checkpoint
            continue
        rows, generations = ready
        trained.append(rows[0]["prompt"])
        staleness.append(version - generations.policy_version)
        version += 1
        source.after_update(version)
    return trained, staleness


@pytest.mark.parametrize("max_staleness, sync_every", [(0, 1), (1, 1), (1, 3), (2, 2)])
def test_the_shared_pipeline_keeps_the_bound_and_the_refresh_period(group, max_staleness, sync_every):
    inner = PipelinedSource(FakeGenerator(), max_staleness, sync_every, weights=no_weights)
    source = SharedSource(inner, group, sync_every, max_staleness, no_weights)
    trained, staleness = drive(source, 9)
    assert trained == list(range(9 - max_staleness)) and max(staleness) <= max_staleness
    periodic = [r.version for r in source.refreshes if r.reason == "period"]
    assert periodic == list(range(sync_every, 9 - max_staleness + 1, sync_every))
    assert len(source.pending_rows()) == max_staleness


def test_a_failure_on_rank_0_reaches_the_caller(group):
    inner = PipelinedSource(FakeGenerator(die_at=("result", 1)), 1, 1, weights=no_weights)
    source = SharedSource(inner, group, 1, 1, no_weights)
    with pytest.raises(GeneratorError, match="died at result 1"):
        drive(source, 3)


def test_only_rank_0_owns_the_generator(group):
    with pytest.raises(ValueError, match="Rank 0, and only rank 0"):
        SharedSource(None, group, 1, 1, no_weights)
