"""The rollout batch: padding Generations into tensors, scoring, mini-batching; hand-built inputs, golden values.

The logprob forwards are checked against whole forwards of a tiny model in
tests/generation/test_transformers_backend.py; the critic's values here.
"""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from lightning_rlhf.generation import Generations
from lightning_rlhf.rewards import RewardFunction
from lightning_rlhf.rollout_batch import (
    RewardScorer,
    build_rollout_batch,
    critic_values,
    in_micro_batches,
    micro_batches,
    minibatches,
    raw_scores,
    score_rollouts,
)

PAD = 0


def two_prompts() -> Generations:
    """2 prompts of 2 and 1 tokens, k=2: completions of 3, 1, 2 and 0 tokens; the first and third ended with eos."""
    return Generations(
        prompt_ids=[[5, 6], [7]],
        completion_ids=[[1, 2, 3], [4], [8, 9], []],
        behavior_logprobs=[[-0.1, -0.2, -0.3], [-0.4], [-0.5, -0.6], []],
        finish_reasons=["stop", "length", "stop", "length"],
        policy_version=3,
        k=2,
    )


def test_generations_are_padded_prompts_left_responses_right_each_prompt_k_times():
    batch = build_rollout_batch(two_prompts(), PAD)
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


def test_indexing_a_batch_takes_the_same_rows_of_every_field():
    batch = build_rollout_batch(two_prompts(), PAD)
    picked = batch[torch.tensor([2, 0])].to(torch.device("cpu"))
    assert picked.input_ids.tolist() == [[PAD, 7, 8, 9, PAD], [5, 6, 1, 2, 3]]
    assert picked.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert picked.behavior_logprobs[0].tolist() == pytest.approx([-0.5, -0.6, 0])
    assert picked.finished.tolist() == [True, True] and len(picked) == 2 and picked.prompt_length == 2


class Lengths(RewardFunction):
    """Scores a completion by its length in characters; keeps what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, dict]] = []

    def __call__(self, prompts, completions, rows=None):
        self.asked += list(zip(prompts, completions, rows))
        return torch.tensor([float(len(c)) for c in completions], dtype=torch.float64)


def test_raw_scores_score_only_the_completions_not_scored_already_each_with_its_prompt_s_row():
    rows = [{"prompt": "a", "id": 0}, {"prompt": "b", "id": 1}]
    reward = Lengths()
    scores = raw_scores(reward, rows, ["x", "yy", "zzz", "wwww"], k=2, known=[1.5, None, None, 4.0])
    assert scores.dtype == torch.float32 and scores.tolist() == [1.5, 2.0, 3.0, 4.0]
    assert reward.asked == [("a", "yy", rows[0]), ("b", "zzz", rows[1])]  # completion j is prompt j // k's
    reward.asked.clear()
    assert raw_scores(reward, rows, ["x", "yy", "zzz", "wwww"], k=2).tolist() == [1.0, 2.0, 3.0, 4.0]
    assert [prompt for prompt, _, _ in reward.asked] == ["a", "a", "b", "b"]
    reward.asked.clear()
    assert raw_scores(reward, rows, ["x", "yy"], k=1, known=[7.0, 8.0]).tolist() == [7.0, 8.0]
    assert reward.asked == []  # all scored in the generator: the reward is not called


class Digits:
    """A stand-in tokenizer: token ``i`` decodes as ``str(i)``, tokens joined by nothing."""

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["".join(str(i) for i in sequence) for sequence in ids]


def test_the_generator_scores_the_first_share_of_the_prompts_with_all_their_samples():
    rows = [{"prompt": p} for p in "abcd"]
    generations = Generations([[1]] * 4, [[1], [22], [3], [44], [5], [66], [7], [88]], [[0.0]] * 8, ["stop"] * 8, 0, 2)
    scorer = RewardScorer(Lengths(), "unused", fraction=0.5)
    scorer.tokenizer = Digits()  # what setup() loads in the generator process
    assert scorer(rows, generations) == [1.0, 2.0, 1.0, 2.0] + [None] * 4  # half of 4 prompts: a and b
    assert scorer(rows, generations, share=0.75) == [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, None, None]  # this request's
    scorer.reward.asked.clear()
    assert scorer(rows, generations, share=0.0) == [None] * 8 and scorer.reward.asked == []


def test_score_rollouts_keeps_the_generator_s_scores_and_penalizes_what_did_not_end():
    generations = two_prompts()
    generations.scores = [10.0, None, None, None]
    scores, raw, completions = score_rollouts(
        Lengths(), Digits(), generations, [{"prompt": "a"}, {"prompt": "b"}], -1.0
    )
    assert completions == ["123", "4", "89", ""]
    assert raw.tolist() == [10.0, 1.0, 2.0, 0.0]
    assert scores.tolist() == [10.0, -1.0, 2.0, -1.0]  # the second and fourth hit max_new_tokens


def test_micro_batches_are_consecutive_chunks_of_at_most_size():
    indices = torch.arange(5)
    assert [c.tolist() for c in micro_batches(indices, 2)] == [[0, 1], [2, 3], [4]]
    assert [c.tolist() for c in micro_batches(indices, 5)] == [[0, 1, 2, 3, 4]]
    assert [c.tolist() for c in micro_batches(indices, None)] == [[0, 1, 2, 3, 4]]


def test_a_row_by_row_function_in_micro_batches_gives_the_whole_batch_s_rows_in_order():
    batch = build_rollout_batch(two_prompts(), PAD)
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


def test_the_critic_s_value_of_each_response_token_is_its_score_of_the_sequence_before_that_token(tiny_model_dir):
    critic = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    generations = Generations([[5, 6, 7]], [[8, 9, 10]], [[0.0] * 3], ["stop"], 0, 1)
    batch = build_rollout_batch(generations, PAD)
    with torch.no_grad():
        values = critic_values(critic, batch)
        # the head on the last of the prompt's tokens, then on the prompt and each response token but the last
        prefixes = [critic.model(input_ids=batch.input_ids[:, :n]).last_hidden_state[:, -1] for n in (3, 4, 5)]
        by_prefix = torch.cat([critic.score(h) for h in prefixes], dim=1)
    assert values.shape == (1, 3) and torch.allclose(values, by_prefix, atol=1e-5)
    critic.config.reward_mean, critic.config.reward_std = 0.25, 2.0  # a critic from a normalized reward model
    with torch.no_grad():
        assert torch.allclose(critic_values(critic, batch), (by_prefix - 0.25) / 2.0, atol=1e-5)


def test_the_critic_gives_padding_no_value(tiny_model_dir):
    critic = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    batch = build_rollout_batch(two_prompts(), PAD)
    with torch.no_grad():
        values = critic_values(critic, batch)
    assert values.shape == (4, 3)
    assert (values[batch.response_mask == 0] == 0).all() and (values[batch.response_mask == 1] != 0).all()
