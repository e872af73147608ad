import warnings

import pytest
import torch

from lightning_rlhf.rewards import GSM8kExactMatch, apply_missing_eos_penalty, extract_gsm8k_answer


def test_extract_gsm8k_answer():
    assert extract_gsm8k_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert extract_gsm8k_answer("#### 1,234") == "1234"
    assert extract_gsm8k_answer("#### -3.5") == "-3.5"
    assert extract_gsm8k_answer("#### 1\n#### 2") == "2"  # the last one counts
    assert extract_gsm8k_answer("the answer is 7") is None


def test_gsm8k_exact_match_uses_the_answer_column():
    reward = GSM8kExactMatch(answer_column="answer")
    rows = [{"answer": "3 + 4 = 7\n#### 7"}, {"answer": "#### 10"}, {"answer": "12"}]
    scores = reward(["q"] * 3, ["#### 7", "#### 11", "I think #### 12.0"], rows)
    assert scores.tolist() == [1.0, 0.0, 1.0]


def test_gsm8k_exact_match_names_a_missing_column():
    with pytest.raises(ValueError, match="answer_column"):
        GSM8kExactMatch(answer_column="solution")(["q"], ["#### 1"], [{"answer": "#### 1"}])


def test_missing_eos_penalty_replaces_the_score():
    scores = torch.tensor([0.5, 2.0, -3.0])
    finished = torch.tensor([True, False, False])
    # replaced, not subtracted: unfinished scores become exactly the penalty
    assert apply_missing_eos_penalty(scores, finished, -1.0).tolist() == [0.5, -1.0, -1.0]
    assert apply_missing_eos_penalty(scores, finished, None).tolist() == [0.5, 2.0, -3.0]


def test_missing_eos_penalty_warns_when_it_would_reward_a_missing_stop_token():
    finished = torch.tensor([True, True, False])
    with pytest.warns(UserWarning, match="rewards a missing stop token"):
        apply_missing_eos_penalty(
            torch.tensor([-4.0, -3.0, -5.0]), finished, -1.0
        )  # -1 beats the finished mean of -3.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_missing_eos_penalty(torch.tensor([0.5, 1.5, 2.0]), finished, -1.0)  # a real penalty: silent
