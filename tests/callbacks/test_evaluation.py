"""AccuracyEvaluation, the judges and the arithmetic task's data: exact values on stand-ins, no processes."""

import json
from types import SimpleNamespace

import pytest
import torch

from lightning_rlhf.callbacks import AccuracyEvaluation, GoldEvaluation, RewardJudge
from lightning_rlhf.callbacks.judges import GenerativeJudge
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.generation import Generations, SamplingConfig
from lightning_rlhf.rewards import RewardFunction, extract_gsm8k_answer

ANSWERS = ["2 + 2 = 4\n#### 4", "#### 7", "it is 9", "#### 1,000"]  # right, wrong, no format, right with a comma


class WordTokenizer:
    """Token i decodes to ANSWERS[i]; a prompt is one token (its length)."""

    chat_template = None
    eos_token_id, pad_token_id = 0, 0

    def __call__(self, text, add_special_tokens=True):
        if isinstance(text, list):  # a batch, as a Hugging Face tokenizer takes it
            return {"input_ids": [[len(t)] for t in text]}
        return {"input_ids": [len(text)]}

    def batch_decode(self, ids, skip_special_tokens=True):
        return [ANSWERS[i[0]] for i in ids]


class FixedSource:
    """A rollout source whose generator answers request i with ANSWERS[i]; records what it was asked."""

    def __init__(self):
        self.asked = []

    def evaluate(self, prompt_ids, sampling, version):
        self.asked.append((len(prompt_ids), sampling.temperature, version))
        n = len(prompt_ids)
        return Generations(
            prompt_ids, [[i] for i in range(n)], [[0.0]] * n, ["stop"] * (n - 1) + ["length"], version, 1
        )


def test_accuracy_is_the_share_of_exact_answers_after_the_marks_and_format_the_share_with_marks(tmp_path):
    path = tmp_path / "problems.jsonl"
    references = ["#### 4", "#### 8", "#### 9", "#### 1000"]
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": a}) + "\n" for i, a in enumerate(references)))
    evaluation = AccuracyEvaluation(str(path), prompt_template="Problem: {question}")
    source = FixedSource()
    module = SimpleNamespace(
        tokenizer=WordTokenizer(), rollout_source=source, policy_version=3, sampling=SamplingConfig(max_new_tokens=5)
    )
    metrics = evaluation.measure(None, module)
    assert metrics["eval/accuracy"] == 2 / 4  # answers 0 and 3
    assert metrics["eval/format_rate"] == 3 / 4
    assert metrics["eval/eos_rate"] == 3 / 4 and metrics["eval/response_length"] == 1
    assert source.asked == [(4, 0.0, 3)]  # greedy, on the training's generator, at the current version
    assert evaluation.rows[0]["prompt"] == "Problem: q0"


def test_reward_judge_wins_ties_and_losses():
    class Length(RewardFunction):
        def __call__(self, prompts, completions, rows=None):
            return torch.tensor([float(len(c)) for c in completions])

    outcomes = RewardJudge(Length())(["p"] * 3, ["long one", "ab", "a"], ["short", "cd", "abc"])
    assert outcomes.tolist() == [1.0, 0.5, 0.0]


def test_generative_judge_asks_in_both_orders_and_splits_disagreement(tiny_model_dir, monkeypatch):
    judge = GenerativeJudge(tiny_model_dir)
    answers = iter([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])  # response as A, then as B
    monkeypatch.setattr(judge, "_prefers_a", lambda prompts, a, b: next(answers))
    judge.backend = object()  # loaded
    assert judge(["p"] * 3, ["x"] * 3, ["y"] * 3).tolist() == [1.0, 0.5, 0.0]


def test_gold_evaluation_takes_exactly_one_judge():
    with pytest.raises(ConfigError, match="exactly one"):
        GoldEvaluation()


def test_the_arithmetic_task_holds_out_problems_and_answers_them_right(tmp_path):
    from lightning_rlhf.tasks.arithmetic import write_datasets

    write_datasets(tmp_path, num_train=300, num_eval=200)
    train = [json.loads(line) for line in open(tmp_path / "prompts.jsonl")]
    held_out = [json.loads(line) for line in open(tmp_path / "eval.jsonl")]
    assert len(train) == 300 and len(held_out) == 200
    assert not {r["question"] for r in train} & {r["question"] for r in held_out}
    for row in train + held_out:
        a, b = (int(x) for x in row["question"].removeprefix("What is ").rstrip("?").split(" + "))
        assert extract_gsm8k_answer(row["answer"]) == str(a + b)
        assert row["messages"][-1] == {"role": "user", "content": row["question"]}
        assert row["messages"][1]["content"].endswith("#### 37")  # the worked example shows the format
