import shutil

import pytest
import torch

from lightning_rlhf.rewards import RewardModelScore
from lightning_rlhf.rewards import model as score_model
from lightning_rlhf.rewards.model import save_reward_normalization
from lightning_rlhf.tokens import left_pad


def test_normalization_from_the_config_gives_sft_like_samples_mean_0_std_1(builtin_models, tmp_path):
    folder = str(tmp_path / "rm")
    shutil.copytree(builtin_models["reward_model"], folder)
    prompts = ["copy 1 2 3 =", "copy 4 5 =", "copy 6 7 8 9 =", "copy 2 2 ="] * 2
    completions = ["1 2 3", "4 4", "6 7 8", "2 2", "3 2 1", "4 5", "6 7 8 9", "1"]
    raw = RewardModelScore(folder, normalize=False)(prompts, completions)
    mean, std = save_reward_normalization(folder, prompts, completions)
    assert mean == pytest.approx(raw.mean().item()) and std == pytest.approx(raw.std().item())

    normalized = RewardModelScore(folder)(prompts, completions)
    assert normalized.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert normalized.std().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(normalized, (raw - mean) / std)  # an affine map: the ranking of completions is unchanged
    torch.testing.assert_close(RewardModelScore(folder, normalize=False)(prompts, completions), raw)


PROMPTS = ["copy 1 2 3 =", "copy 4 5 =", "copy 6 7 8 9 =", "copy 2 ="]
COMPLETIONS = ["1 2 3", "", "4 5", "6 7", "6 7 8 9", "2", "3 2 1", "4 4 4 4 4", "9", "2 2", "1", "6 7 8 9 9"]


def _count_embedded_tokens(model) -> list[int]:
    """Tokens other than padding that each forward pass of ``model`` embeds."""
    counts = []
    pad = model.config.pad_token_id
    model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: counts.append(int((args[0] != pad).sum()))
    )
    return counts


def test_prompts_shared_by_several_samples_run_once_with_the_same_scores(builtin_models):
    prompts = [PROMPTS[i % 4] for i in (0, 1, 2, 3, 3, 2, 1, 0, 0, 2, 1, 3)]  # each three times, not side by side
    whole = RewardModelScore(builtin_models["reward_model"], share_prompts=False)
    shared = RewardModelScore(builtin_models["reward_model"])
    whole.setup(torch.device("cpu")), shared.setup(torch.device("cpu"))
    whole_tokens, shared_tokens = _count_embedded_tokens(whole._model), _count_embedded_tokens(shared._model)

    torch.testing.assert_close(shared(prompts, COMPLETIONS), whole(prompts, COMPLETIONS), atol=1e-5, rtol=1e-5)
    assert len(shared_tokens) == 2 and len(whole_tokens) == 1  # the four distinct prompts, then the completions on top
    assert sum(shared_tokens) < sum(whole_tokens)
    # all four prompts, then all four again (TRL's order), in batches of four: the samples of a prompt are
    # gathered into one batch first, so that prompts are still shared, and the scores come back in the order given
    prompts = PROMPTS * 3
    small_batches = RewardModelScore(builtin_models["reward_model"], batch_size=4)
    small_batches.setup(torch.device("cpu"))
    whole_tokens.clear()
    small_tokens = _count_embedded_tokens(small_batches._model)
    torch.testing.assert_close(small_batches(prompts, COMPLETIONS), whole(prompts, COMPLETIONS), atol=1e-5, rtol=1e-5)
    assert sum(small_tokens) < sum(whole_tokens)


def test_a_model_whose_pad_is_its_eos_scores_whole_sequences(builtin_models):
    """Its head reads the last non-pad token of the ids it is given:
    on an empty completion's lone eos that would be a pad."""
    prompts = [p for p in PROMPTS for _ in range(3)]
    scores = {}
    for share in (False, True):
        reward = RewardModelScore(builtin_models["reward_model"], normalize=False, share_prompts=share)
        reward.setup(torch.device("cpu"))
        reward._tokenizer.pad_token_id = reward._model.config.pad_token_id = reward._tokenizer.eos_token_id
        scores[share] = reward(prompts, COMPLETIONS)
    torch.testing.assert_close(scores[True], scores[False])


def _positions_seen_by_mlps(model) -> list[list[int]]:
    """Per forward pass of each decoder layer's MLP, the positions it ran at: ``seen[layer]``."""
    seen = [[] for _ in model.base_model.layers]
    for i, layer in enumerate(model.base_model.layers):
        layer.mlp.register_forward_hook(lambda module, args, out, i=i: seen[i].append(args[0].shape[1]))
    return seen


@pytest.mark.parametrize("share_prompts", [False, True])
def test_the_last_layer_runs_its_mlp_at_the_scored_position_only_with_the_same_scores(builtin_models, share_prompts):
    prompts = [PROMPTS[i % 4] for i in (0, 1, 2, 3, 3, 2, 1, 0, 0, 2, 1, 3)]
    scores, seen = {}, {}
    for last_only in (False, True):
        reward = RewardModelScore(
            builtin_models["reward_model"], normalize=False, share_prompts=share_prompts, last_position_only=last_only
        )
        reward.setup(torch.device("cpu"))
        seen[last_only] = _positions_seen_by_mlps(reward._model)
        scores[last_only] = reward(prompts, COMPLETIONS)
    torch.testing.assert_close(scores[True], scores[False], atol=1e-5, rtol=1e-5)
    *earlier, last = seen[True]
    assert last and all(n == 1 for n in last)  # one position per row, in each pass (prompts, then completions)
    assert earlier == seen[False][:-1] and all(n > 1 for n in seen[False][-1])  # the other layers as before
    # outside a call the layer is itself again: the model's own forward reads every position
    layer = reward._model.base_model.layers[-1]
    assert "forward" not in vars(layer)
    ids = torch.tensor([[1, 5, 6, 2]])
    assert reward._model(input_ids=ids).logits.shape == (1, 1)
    assert seen[True][-1][-1] == 4


def test_the_last_layer_is_restored_when_a_scoring_call_fails(builtin_models):
    reward = RewardModelScore(builtin_models["reward_model"])
    reward.setup(torch.device("cpu"))
    layer = reward._model.base_model.layers[-1]
    layer.mlp.register_forward_pre_hook(lambda module, args: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        reward(PROMPTS, COMPLETIONS[:4])
    assert "forward" not in vars(layer)


def test_a_last_layer_whose_forward_is_already_replaced_runs_whole(builtin_models):
    """Such as accelerate's device hooks: the fast path would bypass them, and restoring would drop them."""
    reward = RewardModelScore(builtin_models["reward_model"])
    reward.setup(torch.device("cpu"))
    assert score_model.reads_last_position_only(reward._model)
    layer = reward._model.base_model.layers[-1]
    hooked = layer.forward
    layer.forward = lambda *args, **kwargs: hooked(*args, **kwargs)
    wrapper = layer.forward
    assert not score_model.reads_last_position_only(reward._model)
    seen = _positions_seen_by_mlps(reward._model)
    reward(PROMPTS, COMPLETIONS[:4])
    assert all(n > 1 for n in seen[-1]) and layer.forward is wrapper


def test_a_model_outside_the_pre_norm_decoders_runs_whole():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_layer=2, n_embd=32, n_head=1, vocab_size=32, pad_token_id=0))
    model.eval()
    assert not score_model.reads_last_position_only(model)
    prompt_ids, completion_ids = [[1, 5, 6], [1, 5, 6], [1, 7]], [[8, 2], [9, 9, 2], [2]]
    ids, mask = left_pad([p + c for p, c in zip(prompt_ids, completion_ids)], 0)
    with torch.no_grad():
        expected = score_model.score_sequences(model, ids, mask)
        torch.testing.assert_close(score_model.score_pairs(model, prompt_ids, completion_ids, 0), expected)
