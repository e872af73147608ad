"""The rollout batch: padding Generations into tensors, micro- and mini-batching; hand-built inputs, golden values."""

import pytest
import torch

from lightning_rlhf.generation import Generations
from lightning_rlhf.rollout_batch import build_rollout_batch, in_micro_batches, micro_batches, minibatches

PAD = 0


def test_generations_are_padded_prompts_left_responses_right_each_prompt_k_times(two_prompts):
    batch = build_rollout_batch(two_prompts, PAD)
    assert len(batch) == 4 and batch.prompt_length == 2
    assert batch.input_ids.tolist() == [
        [5, 6, 1, 2, 3],
        [5, 6, 4, PAD, PAD],
        [PAD, 7, 8, 9, PAD],
        [PAD, 7, PAD, PAD, PAD],
    ]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 1, 0, 0, 0]]
    assert batch.response_ids.tolist() == [[1, 2, 3], [4, PAD, PAD], [8, 9, PAD], [PAD, PAD, PAD]]
    assert batch.response_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]]
    expected = torch.tensor([[-0.1, -0.2, -0.3], [-0.4, 0, 0], [-0.5, -0.6, 0], [0, 0, 0]])
    assert torch.allclose(batch.behavior_logprobs, expected)
    assert batch.finished.tolist() == [True, False, True, False] and batch.policy_version.tolist() == [3] * 4


def test_responses_that_are_all_empty_still_get_one_padded_column():
    batch = build_rollout_batch(Generations([[5]], [[]], [[]], ["length"], 0, 1), PAD)
    assert batch.response_ids.tolist() == [[PAD]] and batch.response_mask.tolist() == [[0]]
    assert batch.input_ids.tolist() == [[5, PAD]] and batch.prompt_length == 1


def test_indexing_a_batch_takes_the_same_rows_of_every_field(two_prompts):
    batch = build_rollout_batch(two_prompts, PAD)
    picked = batch[torch.tensor([2, 0])].to(torch.device("cpu"))
    assert picked.input_ids.tolist() == [[PAD, 7, 8, 9, PAD], [5, 6, 1, 2, 3]]
    assert picked.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert picked.behavior_logprobs[0].tolist() == pytest.approx([-0.5, -0.6, 0])
    assert picked.finished.tolist() == [True, True] and len(picked) == 2 and picked.prompt_length == 2


def test_micro_batches_are_consecutive_chunks_of_at_most_size():
    indices = torch.arange(5)
    assert [c.tolist() for c in micro_batches(indices, 2)] == [[0, 1], [2, 3], [4]]
    assert [c.tolist() for c in micro_batches(indices, 5)] == [[0, 1, 2, 3, 4]]
    assert [c.tolist() for c in micro_batches(indices, None)] == [[0, 1, 2, 3, 4]]


def test_a_row_by_row_function_in_micro_batches_gives_the_whole_batch_s_rows_in_order(two_prompts):
    batch = build_rollout_batch(two_prompts, PAD)
    sizes = []

    def response_sums(rollouts):
        sizes.append(len(rollouts))
        return rollouts.response_ids.sum(dim=1)

    whole = in_micro_batches(response_sums, batch, None)
    assert whole.tolist() == [6, 4, 17, 0] and sizes == [4]
    assert in_micro_batches(response_sums, batch, 3).tolist() == [6, 4, 17, 0] and sizes == [4, 3, 1]


def test_minibatches_split_every_sample_once_into_equal_parts_in_a_seeded_order():
    parts = minibatches(12, 3, torch.Generator().manual_seed(0))
    assert [len(p) for p in parts] == [4, 4, 4] and sorted(torch.cat(parts).tolist()) == list(range(12))
    again = minibatches(12, 3, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    assert torch.cat(parts).tolist() != list(range(12))  # shuffled
    for size, n in ((12, 5), (4, 0)):
        with pytest.raises(ValueError, match=rf"{size} samples cannot be split into num_mini_batches={n} equal parts"):
            minibatches(size, n)
