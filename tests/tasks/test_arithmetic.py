"""The arithmetic task's rows and datasets, written to a temporary folder: no model."""

import json
from pathlib import Path

from lightning_rlhf.rewards import GSM8kExactMatch
from lightning_rlhf.tasks import arithmetic
from lightning_rlhf.tasks.arithmetic import EXAMPLE, make_problem, prepare, write_datasets


def read(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def numbers(row: dict) -> tuple[int, int]:
    a, b = row["question"].removeprefix("What is ").removesuffix("?").split(" + ")
    return int(a), int(b)


def test_a_problem_has_gsm8k_s_shape_and_its_conversation_ends_with_the_question():
    assert make_problem(13, 58) == {
        "question": "What is 13 + 58?",
        "answer": "13 + 58 = 71\n#### 71",
        "messages": [
            {"role": "user", "content": "What is 13 + 24?"},
            {"role": "assistant", "content": "13 + 24 = 37\n#### 37"},
            {"role": "user", "content": "What is 13 + 58?"},
        ],
    }
    assert make_problem(13, 58)["messages"][:2] == EXAMPLE
    # the reward reads the number after ####: the right answer scores 1, another 0
    reward = GSM8kExactMatch()
    row = make_problem(13, 58)
    assert reward(["q", "q"], ["13 + 58 = 71\n#### 71", "#### 70"], [row, row]).tolist() == [1.0, 0.0]


def test_the_datasets_are_seeded_two_digit_sums_with_the_held_out_problems_apart(tmp_path):
    write_datasets(tmp_path / "a", seed=3, num_train=40, num_eval=10)
    write_datasets(tmp_path / "b", seed=3, num_train=40, num_eval=10)
    write_datasets(tmp_path / "c", seed=4, num_train=40, num_eval=10)
    train, held_out = read(tmp_path / "a" / "prompts.jsonl"), read(tmp_path / "a" / "eval.jsonl")
    assert len(train) == 40 and len(held_out) == 10
    assert train == read(tmp_path / "b" / "prompts.jsonl") and held_out == read(tmp_path / "b" / "eval.jsonl")
    assert train != read(tmp_path / "c" / "prompts.jsonl")  # another seed, another draw
    pairs = [numbers(row) for row in train + held_out]
    assert len(set(pairs)) == 50  # no problem twice, none both trained on and held out
    assert all(10 <= a <= 99 and 10 <= b <= 99 for a, b in pairs)
    assert [row for row in train + held_out] == [make_problem(a, b) for a, b in pairs]


def test_all_problems_are_the_8100_ordered_pairs_of_two_digit_numbers(tmp_path):
    write_datasets(tmp_path, num_train=8100 - 100, num_eval=100)
    pairs = [numbers(row) for row in read(tmp_path / "prompts.jsonl") + read(tmp_path / "eval.jsonl")]
    assert sorted(pairs) == [(a, b) for a in range(10, 100) for b in range(10, 100)]


def test_prepare_makes_each_artifact_asked_for_once_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_RLHF_CACHE", str(tmp_path))
    made = []

    def smollm2_135m(folder: str) -> None:  # a stand-in for the 20 s dequantization into ``folder``
        made.append(folder)
        Path(folder).mkdir(parents=True)

    monkeypatch.setattr(arithmetic, "smollm2_135m", smollm2_135m)
    root = arithmetic.builtin_root()
    prepare("builtin:smollm2", "builtin:sft")  # the model alone (sft is another task's artifact)
    assert made == [str(root / "smollm2-135m-instruct")] and not (root / "arithmetic").exists()
    prepare("builtin:arithmetic_prompts", "builtin:smollm2")  # the model is made already: not again
    folder = root / "arithmetic"
    assert len(read(folder / "prompts.jsonl")) == arithmetic.NUM_TRAIN and len(read(folder / "eval.jsonl")) == 256
    assert (folder / ".done").exists() and len(made) == 1
    (folder / "eval.jsonl").write_text("kept\n")
    prepare("builtin:arithmetic_eval")  # prepared already: nothing is written again
    assert (folder / "eval.jsonl").read_text() == "kept\n"
