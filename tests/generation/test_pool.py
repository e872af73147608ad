"""GeneratorPool against stand-in generators: how a request is split and put together, and how a refresh reaches them."""

from types import SimpleNamespace

import pytest
import torch

from lightning_rlhf.generation import Generations, SamplingConfig
from lightning_rlhf.generation.pool import GeneratorPool, split_sizes
from lightning_rlhf.generation.weights import stream_of, unpack

SAMPLING = SamplingConfig(k=1, temperature=1.0, max_new_tokens=2)


class PartGenerator:
    """A stand-in for one GeneratorProcess of a pool; ``log`` (shared by the pool's stand-ins) records every call in order.

    It answers prompt ``[p]`` with the completion ``[100 * index + p]``, sampled with the weights it last took.
    """

    def __init__(self, index: int, log: list, last_refresh_seconds: float | None = None) -> None:
        self.index, self.log, self.last_refresh_seconds = index, log, last_refresh_seconds
        self.spec = SimpleNamespace(bucket_bytes=64, transport="gloo")
        self.version: int | None = None
        self.requests: dict[int, tuple[list[list[int]], int | None]] = {}
        self.received: dict[int, dict[str, torch.Tensor]] = {}  # the weights of each refresh, unpacked, by version
        self.buffers: list[torch.Tensor] | None = None
        self.probes: dict[int, object] = {}
        self.closed = False

    def submit(self, request_id, prompt_ids, sampling, rows=None, score_share=None):
        self.log.append((self.index, "submit", request_id, prompt_ids, rows, score_share))
        self.requests[request_id] = (prompt_ids, self.version)

    def result(self, request_id):
        prompt_ids, version = self.requests.pop(request_id)
        completions = [[100 * self.index + ids[0]] for ids in prompt_ids]
        return Generations(prompt_ids, completions, [[-1.0]] * len(prompt_ids), ["stop"] * len(prompt_ids), version, 1)

    def push_packed(self, refit, buffers, version, probe=None):
        self.log.append((self.index, "push", version))
        self.version, self.buffers, self.probes[version] = version, buffers, probe
        self.received[version] = {
            name: tensor.clone()
            for bucket, buffer in zip(refit.buckets(), buffers)
            for name, tensor in unpack(bucket, buffer)
        }

    def probe_logprobs(self, version):
        return [float(self.index)] if self.probes.get(version) is not None else None

    def alive(self):
        return not self.closed

    def close(self):
        self.closed = True


def pool_of(n: int, **kwargs) -> tuple[GeneratorPool, list]:
    log: list = []
    return GeneratorPool([PartGenerator(i, log, **kwargs) for i in range(n)]), log


@pytest.mark.parametrize(
    "n, parts, sizes", [(7, 3, [3, 2, 2]), (8, 3, [3, 3, 2]), (6, 3, [2, 2, 2]), (2, 3, [1, 1, 0]), (5, 1, [5])]
)
def test_split_sizes_are_as_even_as_can_be_and_the_first_parts_take_the_remainder(n, parts, sizes):
    assert split_sizes(n, parts) == sizes


def test_a_request_is_split_into_consecutive_parts_and_put_together_in_order():
    pool, log = pool_of(3)
    rows = [{"prompt": p} for p in range(1, 8)]
    pool.submit(0, [[p] for p in range(1, 8)], SAMPLING, rows, score_share=0.5)
    # 7 prompts on 3 generators: 3, 2, 2 consecutive ones, each part with its own rows
    assert log == [
        (0, "submit", 0, [[1], [2], [3]], rows[0:3], 0.5),
        (1, "submit", 0, [[4], [5]], rows[3:5], 0.5),
        (2, "submit", 0, [[6], [7]], rows[5:7], 0.5),
    ]
    generations = pool.result(0)
    assert generations.prompt_ids == [[p] for p in range(1, 8)]
    assert generations.completion_ids == [[1], [2], [3], [104], [105], [206], [207]]  # 100 * generator + prompt


def test_a_request_smaller_than_the_pool_leaves_the_last_generators_out():
    pool, log = pool_of(3)
    pool.submit(4, [[1], [2]], SAMPLING)
    assert [(index, prompt_ids, rows) for index, _, _, prompt_ids, rows, _ in log] == [
        (0, [[1]], None),
        (1, [[2]], None),
    ]
    assert pool.result(4).completion_ids == [[1], [102]]
    assert pool.generators[2].requests == {}  # never asked, never waited for


def test_a_refresh_packs_once_and_reaches_every_generator_before_any_later_request():
    pool, log = pool_of(3)
    pool.submit(0, [[p] for p in range(3)], SAMPLING)
    weights = [
        ("embed", torch.arange(12.0).reshape(3, 4)),
        ("head", torch.tensor([0.5, -1.25])),
        ("steps", torch.tensor([7])),
    ]
    pool.push_weights(stream_of(weights, torch.bfloat16), 5, probe=([1], [2], 1.0))
    pool.submit(1, [[p] for p in range(3)], SAMPLING)
    assert [entry[:3] for entry in log] == [(i, "submit", 0) for i in range(3)] + [(i, "push", 5) for i in range(3)] + [
        (i, "submit", 1) for i in range(3)
    ]
    # the same buckets for all, holding the weights as the generators' dtype (integers stay integers)
    assert all(g.buffers is pool.generators[0].buffers for g in pool.generators)
    for generator in pool.generators:
        received = generator.received[5]
        assert received.keys() == {"embed", "head", "steps"}
        assert received["embed"].dtype == torch.bfloat16 and torch.equal(received["embed"], weights[0][1].bfloat16())
        assert received["head"].tolist() == [0.5, -1.25] and received["steps"].tolist() == [7]
    assert pool.result(0).policy_version is None and pool.result(1).policy_version == 5 and pool.version == 5


def test_only_the_first_generator_scores_the_probe_and_answers_for_the_pool():
    pool, _ = pool_of(3)
    pool.push_weights(stream_of([("w", torch.ones(2))]), 1, probe=([1], [2], 1.0))
    assert [g.probes[1] for g in pool.generators] == [([1], [2], 1.0), None, None]
    assert pool.probe_logprobs(1) == [0.0]  # the first generator's answer
    pool.push_weights(stream_of([("w", torch.ones(2))]), 2)
    assert pool.probe_logprobs(2) is None


def test_the_pool_is_alive_while_every_generator_is_and_closes_them_all():
    log: list = []
    pool = GeneratorPool([PartGenerator(0, log, 0.5), PartGenerator(1, log, None), PartGenerator(2, log, 2.0)])
    assert pool.last_refresh_seconds == 2.0  # the slowest generator's, those that have refreshed
    assert pool.alive()
    pool.generators[1].closed = True
    assert not pool.alive()
    pool.close()
    assert all(g.closed for g in pool.generators)
    with pytest.raises(ValueError, match="at least one generator"):
        GeneratorPool([])
