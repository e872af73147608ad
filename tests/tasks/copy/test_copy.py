import random

import pytest

from lightning_rlhf.tasks.copy import CopyGoldReward, gold_score, make_prompt, make_tokenizer, noisy_copy, prompt_digits


def test_gold_score_golden_values():
    prompt = make_prompt(["1", "2", "3", "4"])
    assert prompt == "copy 1 2 3 4 ="
    assert prompt_digits(prompt) == ["1", "2", "3", "4"]
    assert gold_score(prompt, "1 2 3 4") == 1.0
    # 3 of 4 positions right, same length: 3/4
    assert gold_score(prompt, "1 2 9 4") == pytest.approx(0.75)
    # one digit dropped: "1 2 4" matches positions 0 and 1 -> 2/4, length error 1/4 * 0.5 -> 0.5 - 0.125
    assert gold_score(prompt, "1 2 4") == pytest.approx(0.375)
    # one extra: 4/4 - 0.5 * 1/4
    assert gold_score(prompt, "1 2 3 4 5") == pytest.approx(0.875)
    # empty: 0 - 0.5 * 4/4
    assert gold_score(prompt, "") == pytest.approx(-0.5)


def test_gold_reward_scores_a_batch():
    scores = CopyGoldReward()(["copy 1 2 3 4 =", "copy 5 5 5 5 ="], ["1 2 3 4", "5 5"])
    assert scores.tolist() == pytest.approx([1.0, 0.5 - 0.25])


def test_noisy_copy_is_imperfect_but_close():
    rng = random.Random(0)
    digits = ["1", "2", "3", "4", "5"]
    copies = [noisy_copy(digits, rng) for _ in range(500)]
    exact = sum(c == digits for c in copies) / len(copies)
    mean_gold = sum(gold_score(make_prompt(digits), " ".join(c)) for c in copies) / len(copies)
    assert 0.05 < exact < 0.5  # imperfect demonstrations leave room for RL
    assert 0.5 < mean_gold < 0.95


def test_tokenizer_round_trip():
    tokenizer = make_tokenizer()
    ids = tokenizer("copy 1 2 3 =")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "copy 1 2 3 ="
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert tokenizer.unk_token_id not in tokenizer("copy 0 9 =")["input_ids"]


def test_an_unprepared_builtin_names_the_command_that_prepares_it(tmp_path, monkeypatch):
    from lightning_rlhf.builtin import BUILTIN_TASK, PREPARE_COMMAND, builtin_path
    from lightning_rlhf.errors import ConfigError
    from lightning_rlhf.models import resolve_source
    from lightning_rlhf.tasks.copy import prepare

    monkeypatch.setenv("LIGHTNING_RLHF_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(ConfigError, match=f"'builtin:sft' is not prepared yet .*`{PREPARE_COMMAND}`"):
        resolve_source("builtin:sft", "policy model")
    with pytest.raises(ConfigError, match="Unknown built-in artifact 'builtin:nope'; choose one of builtin:base"):
        prepare("nope")
    prepare("prompts")  # the datasets alone: no model is trained for them
    assert builtin_path("builtin:prompts").endswith("prompts.jsonl")
    assert not (tmp_path / BUILTIN_TASK / "sft").exists()


def _floor_run(accuracies, seeds=(0, 1, 2), floor=0.85):
    from lightning_rlhf.tasks.copy.artifacts import train_until_floor

    fitted, said, results = [], [], iter(accuracies)
    outcome = train_until_floor(fitted.append, lambda: next(results), seeds=seeds, floor=floor, say=said.append)
    return outcome, fitted, said


def test_proxy_preparation_stops_at_the_first_seed_that_reaches_the_floor():
    assert _floor_run([0.97]) == ((0.97, 0), [0], [])
    (outcome, fitted, said) = _floor_run([0.70, 0.90])
    assert outcome == (0.90, 1) and fitted == [0, 1]
    assert len(said) == 1 and "seed 0 ranks 0.700" in said[0] and "below 0.85; training it again" in said[0]


def test_proxy_preparation_keeps_the_best_seed_when_none_reaches_the_floor():
    outcome, fitted, said = _floor_run([0.60, 0.80, 0.70])
    assert outcome == (0.80, 1)
    assert fitted == [0, 1, 2, 1]  # the best one is fitted again, so the saved model is seed 1's
    assert len(said) == 4 and said[2].endswith("keeping the best one.") and "warning" in said[3]
    outcome, fitted, _ = _floor_run([0.60, 0.70, 0.80])
    assert outcome == (0.80, 2) and fitted == [0, 1, 2]  # the last fitted is the best: nothing fitted again


def test_prepared_proxy_passed_its_own_check(builtin_models):
    import json

    from lightning_rlhf.tasks.copy.artifacts import PROXY_FLOOR

    with open(f"{builtin_models['reward_model']}/config.json") as f:
        config = json.load(f)
    assert config["proxy_pair_accuracy"] >= PROXY_FLOOR, config["proxy_pair_accuracy"]
    assert config["proxy_seed"] in (0, 1, 2)
