"""Scoring rollouts: what the trainer scores, what the generator scores, and the missing-EOS penalty."""

import torch

from lightning_rlhf.generation import Generations
from lightning_rlhf.rewards import RewardFunction
from lightning_rlhf.scoring import RewardScorer, raw_scores, score_rollouts


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


def test_score_rollouts_keeps_the_generator_s_scores_and_penalizes_what_did_not_end(two_prompts):
    generations = two_prompts
    generations.scores = [10.0, None, None, None]
    scores, raw, completions = score_rollouts(
        Lengths(), Digits(), generations, [{"prompt": "a"}, {"prompt": "b"}], -1.0
    )
    assert completions == ["123", "4", "89", ""]
    assert raw.tolist() == [10.0, 1.0, 2.0, 0.0]
    assert scores.tolist() == [10.0, -1.0, 2.0, -1.0]  # the second and fourth hit max_new_tokens
