import shutil

import pytest
import torch

from lightning_rlhf.rewards import RewardModelScore
from lightning_rlhf.rewards.model import save_reward_normalization


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
