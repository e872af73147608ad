"""Every end-of-sequence id of the model ends a completion and counts as a stop for the missing-EOS penalty."""

import json
import shutil

import pytest
import torch

from lightning_rlhf.generation import SamplingConfig, TransformersBackend
from lightning_rlhf.models import load_policy, load_tokenizer, stop_token_ids
from lightning_rlhf.modules import OnlineDPO
from lightning_rlhf.rewards import RewardFunction
from lightning_rlhf.scoring import score_rollouts
from lightning_rlhf.tokens import prompt_token_ids

GREEDY = SamplingConfig(k=1, temperature=0.0, max_new_tokens=6)
PROMPT = "copy 1 2 ="


class Constant(RewardFunction):
    def __call__(self, prompts, completions, rows=None):
        return torch.ones(len(completions))


@pytest.fixture
def two_eos_model(tiny_model_dir, tmp_path):
    """The tiny model, whose generation config also ends a turn on the token it greedily writes first."""
    tokenizer, policy = load_tokenizer(tiny_model_dir), load_policy(tiny_model_dir)
    backend = TransformersBackend(policy, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    first = backend.generate(prompt_token_ids(tokenizer, [PROMPT]), GREEDY).completion_ids[0][0]
    assert first != tokenizer.eos_token_id
    path = tmp_path / "two_eos"
    shutil.copytree(tiny_model_dir, path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.eos_token_id, first]}))
    return str(path), tokenizer.eos_token_id, first


def test_stop_ids_are_the_tokenizer_s_eos_and_every_generation_config_eos(two_eos_model):
    path, eos, other = two_eos_model
    tokenizer = load_tokenizer(path)
    assert stop_token_ids(tokenizer, path) == sorted({eos, other})
    assert stop_token_ids(tokenizer, load_policy(path)) == sorted({eos, other})


def test_the_module_s_generator_stops_on_the_second_eos_and_does_not_penalize_it(two_eos_model):
    path, eos, other = two_eos_model
    module = OnlineDPO(policy=path, reward=Constant(), k=2)
    module.configure_model()
    generations = module.rollout_source.backend.generate(prompt_token_ids(module.tokenizer, [PROMPT]), GREEDY)
    assert generations.completion_ids == [[other]] and generations.finish_reasons == ["stop"]
    scores, _, _ = score_rollouts(Constant(), module.tokenizer, generations, [{"prompt": PROMPT}], -10.0)
    assert scores.tolist() == [1.0]  # a stop, not a missing eos
