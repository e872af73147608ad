"""Prompts too long for the generator: dropped at load and counted, or refused in one sentence
before any process starts."""

import json

import psutil
import pytest
import torch

from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.modules import OnlineDPO
from lightning_rlhf.rewards import RewardFunction

LONG = "copy " + "1 " * 100 + "="  # about 100 tokens of the built-in word-level tokenizer


class Constant(RewardFunction):
    def __call__(self, prompts, completions, rows=None):
        return torch.zeros(len(completions))


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [f"copy {i} {i + 1} =" for i in range(8)]
    rows.insert(3, LONG)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    return str(path)


@pytest.fixture
def tokenizer():
    from lightning_rlhf.tasks.copy import make_tokenizer

    return make_tokenizer()


def test_prompts_longer_than_max_prompt_tokens_are_dropped_and_counted(prompts, tokenizer, caplog):
    data = PromptDataModule(prompts, batch_size=4, shuffle=False, max_prompt_tokens=20)
    with caplog.at_level("INFO"):
        data.drop_long_prompts(tokenizer)
        data.drop_long_prompts(tokenizer)  # once only
    assert data.dropped == 1 and len(data.rows) == 8
    assert [r["prompt"] for batch in data.dataloader() for r in batch] == [f"copy {i} {i + 1} =" for i in range(8)]
    assert caplog.text.count("dropped 1 of 9 prompts longer than max_prompt_tokens=20 tokens") == 1


def test_without_max_prompt_tokens_every_prompt_stays(prompts, tokenizer):
    data = PromptDataModule(prompts, batch_size=4)
    data.drop_long_prompts(tokenizer)
    assert len(data.rows) == 9


def test_every_prompt_too_long_is_one_sentence(prompts, tokenizer):
    data = PromptDataModule(prompts, batch_size=4, max_prompt_tokens=2)
    with pytest.raises(ConfigError, match=r"Every prompt of .* is longer than max_prompt_tokens=2 tokens; raise"):
        data.drop_long_prompts(tokenizer)


def test_max_prompt_tokens_below_one_is_refused(prompts):
    with pytest.raises(ConfigError, match="max_prompt_tokens must be at least 1"):
        PromptDataModule(prompts, max_prompt_tokens=0)


def test_prompt_plus_completion_longer_than_the_policy_s_context_is_refused(prompts, tiny_model_dir, quiet_trainer):
    module = OnlineDPO(policy=tiny_model_dir, reward=Constant(), max_new_tokens=53)  # the tiny model: 64 positions
    with pytest.raises(ConfigError, match=r"max_prompt_tokens=20 plus max_new_tokens=53 exceeds the policy's context"):
        quiet_trainer().fit(module, PromptDataModule(prompts, batch_size=4, max_prompt_tokens=20))


def test_prompt_plus_completion_longer_than_vllm_s_max_model_len_is_refused_before_it_starts(
    prompts, tiny_model_dir, quiet_trainer
):
    pytest.importorskip("vllm")
    from lightning_rlhf.strategies import AsyncRLHFStrategy, GenerationConfig

    module = OnlineDPO(policy=tiny_model_dir, reward=Constant(), max_new_tokens=20)
    strategy = AsyncRLHFStrategy(generation=GenerationConfig(backend="vllm", vllm_kwargs={"max_model_len": 32}))
    with pytest.raises(ConfigError, match=r"plus max_new_tokens=20 exceeds vllm_kwargs.max_model_len of 32 tokens"):
        quiet_trainer(strategy=strategy).fit(module, PromptDataModule(prompts, batch_size=4, max_prompt_tokens=16))
    assert strategy.generator is None and not psutil.Process().children()  # no generator was started


def test_a_run_with_a_long_prompt_trains_on_the_others(prompts, tiny_model_dir, quiet_trainer):
    seen = []
    module = OnlineDPO(policy=tiny_model_dir, reward=Constant(), max_new_tokens=8)
    step = module.training_step
    module.training_step = lambda batch, *args: (seen.extend(r["prompt"] for r in batch), step(batch, *args))[1]
    data = PromptDataModule(prompts, batch_size=8, shuffle=False, max_prompt_tokens=20)
    quiet_trainer().fit(module, data)
    assert len(seen) == 8 and LONG not in seen
