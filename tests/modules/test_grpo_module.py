"""The GRPO module's own options, on a tiny model with stand-in rollouts (the loss is tested in tests/losses)."""

import pytest
import torch
from stand_in_source import StandInSource

from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.generation import Generations
from lightning_rlhf.modules import GRPO
from lightning_rlhf.rewards import RewardFunction


class Length(RewardFunction):
    """A completion scores its number of characters; ``equal=True``: every completion scores 1."""

    def __init__(self, equal: bool = False) -> None:
        self.equal = equal

    def __call__(self, prompts, completions, rows=None):
        return torch.tensor([1.0 if self.equal else float(len(c)) for c in completions])


class StandIn(StandInSource):
    """Completions of 1 to 4 tokens, each token reported by the 'generator' with logprob -1."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def next_rollouts(self, rows, prompt_ids, sampling, version):
        word = self.tokenizer.convert_tokens_to_ids("1")
        completions = [[word] * (1 + j % 3) + [self.tokenizer.eos_token_id] for j in range(len(rows) * sampling.k)]
        logprobs = [[-1.0] * len(c) for c in completions]
        return rows, Generations(prompt_ids, completions, logprobs, ["stop"] * len(completions), version, sampling.k)


def one_update(tiny_model_dir, quiet_trainer, reward=None, **kwargs) -> tuple[GRPO, dict[str, float]]:
    optimizer = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731 (no weight decay: no signal, no move)
    module = GRPO(
        policy=tiny_model_dir, reward=reward or Length(), k=3, max_new_tokens=4, optimizer=optimizer, **kwargs
    )
    module.configure_model()
    calls = {"ref": 0}
    module.ref_policy.register_forward_hook(lambda *args: calls.__setitem__("ref", calls["ref"] + 1))
    module.use_rollout_source(StandIn(module.tokenizer))
    trainer = quiet_trainer(1)
    trainer.fit(module, PromptDataModule(batch_size=2, shuffle=False))
    return module, {"ref_forwards": calls["ref"], **{k: v.item() for k, v in trainer.callback_metrics.items()}}


def test_the_ratio_is_taken_to_the_old_weights_or_to_the_generator_s(tiny_model_dir, quiet_trainer):
    _, old = one_update(tiny_model_dir, quiet_trainer)
    assert old["train/ratio"] == pytest.approx(1.0, abs=1e-6)  # first update: the policy is the old policy
    module, behaviour = one_update(tiny_model_dir, quiet_trainer, ratio_to="behaviour")
    # the generator said -1 for every token; the tiny untrained model gives each about log(1 / vocabulary)
    assert behaviour["train/ratio"] < 0.5


def test_the_kl_goes_in_the_loss_or_in_the_reward_and_zero_skips_the_reference(tiny_model_dir, quiet_trainer):
    _, in_loss = one_update(tiny_model_dir, quiet_trainer, kl_coef=0.1)
    assert in_loss["train/kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is still the reference
    assert "objective/kl" not in in_loss and in_loss["ref_forwards"] > 0
    _, in_reward = one_update(tiny_model_dir, quiet_trainer, kl_coef=0.1, kl_in="reward")
    assert in_reward["objective/kl"] == pytest.approx(0.0, abs=1e-6) and "train/kl" not in in_reward
    _, without = one_update(tiny_model_dir, quiet_trainer, kl_coef=0.0)
    assert without["ref_forwards"] == 0 and "train/kl" not in without and "objective/kl" not in without


def test_groups_of_equal_rewards_carry_no_signal_and_are_counted(tiny_model_dir, quiet_trainer):
    initial = GRPO(policy=tiny_model_dir)
    initial.configure_model()
    module, logged = one_update(tiny_model_dir, quiet_trainer, reward=Length(equal=True), kl_coef=0.0)
    assert logged["objective/zero_advantage_groups"] == 1.0
    # advantages 0 and no KL term: no gradient, so with SGD no parameter moves
    for (name, p), q in zip(module.policy.named_parameters(), initial.policy.parameters()):
        assert torch.equal(p, q), name
    module, varied = one_update(tiny_model_dir, quiet_trainer, kl_coef=0.0)
    assert varied["objective/zero_advantage_groups"] == 0.0
    assert any(not torch.equal(p, q) for p, q in zip(module.policy.parameters(), initial.policy.parameters()))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kl_in="both"), "kl_in must be one of loss, reward"),
        (dict(loss_aggregation="mean"), "loss_aggregation must be one of sequence_mean"),
        (dict(ratio_to="new"), "ratio_to must be one of old, behaviour"),
        (dict(ratio_to="behaviour", importance_sampling_cap=2.0), "drop one of the two"),
        (dict(importance_sampling_cap=-1.0), "importance_sampling_cap must be positive"),
    ],
)
def test_bad_options_are_refused_in_one_sentence(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GRPO(policy="builtin:sft", **kwargs)
