import pytest
import torch

from lightning_rlhf.generation import SamplingConfig, TransformersBackend
from lightning_rlhf.generation.in_process import InProcessSource, SnapshotSource
from lightning_rlhf.models import load_policy, load_tokenizer
from lightning_rlhf.tokens import prompt_token_ids


def _nudge(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_each_round_of_n_batches_is_sampled_by_the_policy_of_its_first_version(tiny_model_dir):
    tokenizer, policy = load_tokenizer(tiny_model_dir), load_policy(tiny_model_dir)
    source = SnapshotSource(policy, [tokenizer.eos_token_id], tokenizer.pad_token_id, every=3, seed=0)
    prompts = prompt_token_ids(tokenizer, ["copy 1 2 3 ="])
    sampling = SamplingConfig(k=2, temperature=1.0, max_new_tokens=4)
    sampled_with, round_weights = [], None
    for version in range(7):  # one "update" per batch, as in the paper's definition
        _, generations = source.next_rollouts([{}], prompts, sampling, version)
        sampled_with.append(generations.policy_version)
        if version % 3 == 0:
            round_weights = [p.detach().clone() for p in policy.parameters()]
        for snapshot, expected in zip(source.backend.model.parameters(), round_weights):
            assert torch.equal(snapshot, expected)  # still the weights of the round's first version
        _nudge(policy)
    assert sampled_with == [0, 0, 0, 3, 3, 3, 6]
    assert [v - s for v, s in enumerate(sampled_with)] == [0, 1, 2, 0, 1, 2, 0]  # staleness 0 .. N-1


def test_every_1_samples_exactly_what_on_policy_generation_samples(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    a, b = load_policy(tiny_model_dir), load_policy(tiny_model_dir)
    snapshot = SnapshotSource(a, [tokenizer.eos_token_id], tokenizer.pad_token_id, every=1, seed=5)
    local = InProcessSource(TransformersBackend(b, [tokenizer.eos_token_id], tokenizer.pad_token_id, seed=5))
    prompts = prompt_token_ids(tokenizer, ["copy 1 2 3 =", "copy 4 5 ="])
    sampling = SamplingConfig(k=2, temperature=1.0, max_new_tokens=5)
    for version in range(3):
        _, from_snapshot = snapshot.next_rollouts([{}], prompts, sampling, version)
        _, from_local = local.next_rollouts([{}], prompts, sampling, version)
        assert from_snapshot.completion_ids == from_local.completion_ids
        torch.manual_seed(version)
        _nudge(a)
        torch.manual_seed(version)
        _nudge(b)


def test_every_must_be_positive(tiny_model_dir):
    tokenizer, policy = load_tokenizer(tiny_model_dir), load_policy(tiny_model_dir)
    with pytest.raises(ValueError, match="every must be at least 1"):
        SnapshotSource(policy, [tokenizer.eos_token_id], tokenizer.pad_token_id, every=0)


def test_generations_split_into_parts_of_prompts():
    from lightning_rlhf.generation.base import Generations

    g = Generations(
        [[1], [2], [3]],
        [[10], [11], [20], [21], [30], [31]],
        [[-1.0], [-1.1], [-2.0], [-2.1], [-3.0], [-3.1]],
        ["stop"] * 5 + ["length"],
        7,
        2,
    )
    first, second = g.split([1, 2])
    assert (
        first.prompt_ids == [[1]]
        and first.completion_ids == [[10], [11]]
        and first.behavior_logprobs == [[-1.0], [-1.1]]
    )
    assert (
        second.prompt_ids == [[2], [3]]
        and second.completion_ids == [[20], [21], [30], [31]]
        and second.finish_reasons == ["stop", "stop", "stop", "length"]
    )
    assert first.policy_version == second.policy_version == 7
    with pytest.raises(ValueError, match="do not add up"):
        g.split([1, 1])


def test_scores_from_the_generator_follow_their_completions_through_split_and_concat():
    from lightning_rlhf.generation.base import Generations

    g = Generations([[1], [2]], [[10], [11], [20], [21]], [[-1.0]] * 4, ["stop"] * 4, 3, 2, [0.1, 0.2, 0.3, 0.4])
    first, second = g.split([1, 1])
    assert first.scores == [0.1, 0.2] and second.scores == [0.3, 0.4]
    assert Generations.concat([first, second]).scores == [0.1, 0.2, 0.3, 0.4]
    unscored = Generations([[3]], [[30], [31]], [[-1.0]] * 2, ["stop"] * 2, 3, 2)
    assert Generations.concat([first, unscored]).scores is None  # partly scored: the trainer scores them all
    with pytest.raises(ValueError, match="4 completions but 3 scores"):
        Generations([[1], [2]], [[10], [11], [20], [21]], [[-1.0]] * 4, ["stop"] * 4, 3, 2, [0.1, 0.2, 0.3])


def test_each_snapshot_is_recorded_as_a_periodic_refresh(tiny_model_dir):
    tokenizer, policy = load_tokenizer(tiny_model_dir), load_policy(tiny_model_dir)
    source = SnapshotSource(policy, [tokenizer.eos_token_id], tokenizer.pad_token_id, every=2, seed=0)
    sampling = SamplingConfig(k=1, temperature=1.0, max_new_tokens=2)
    for version in range(5):
        source.next_rollouts([{}], prompt_token_ids(tokenizer, ["copy 1 ="]), sampling, version)
        source.after_update(version + 1)  # nothing is sent after an update: the next round's step copies the weights
    assert [(r.version, r.reason) for r in source.refreshes] == [(0, "period"), (2, "period"), (4, "period")]
    assert source.pending_rows() == [] and source.probe_logprobs(5) is None
