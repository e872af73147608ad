"""The forwards of a rollout batch: the critic's values here; the logprob forwards are checked against whole
forwards of a tiny model in tests/generation/test_transformers_backend.py."""

import torch
from transformers import AutoModelForSequenceClassification

from lightning_rlhf.generation import Generations
from lightning_rlhf.rollout_batch import build_rollout_batch
from lightning_rlhf.rollout_forwards import critic_values

PAD = 0


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


def test_the_critic_gives_padding_no_value(tiny_model_dir, two_prompts):
    critic = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    batch = build_rollout_batch(two_prompts, PAD)
    with torch.no_grad():
        values = critic_values(critic, batch)
    assert values.shape == (4, 3)
    assert (values[batch.response_mask == 0] == 0).all() and (values[batch.response_mask == 1] != 0).all()
