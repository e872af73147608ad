"""Micro-batches: one update in micro-batches of 1 or 2 (a pair: 2 or 4 sequences) equals the single pass's.

Each module trains on the same rollouts (a stand-in source with seeded random completions of
different lengths, some ending with eos) and the same scores, with plain SGD so that a parameter's
change is the accumulated gradient itself: the micro-batched runs must move every parameter as the
whole mini-batch does, and log the same statistics (PPO's value loss and clip fractions included).
A mean of micro-batch means instead of the mini-batch's token-weighted mean fails these.
"""

import lightning as L
import pytest
import torch
from stand_in_source import StandInSource

from lightning_rlhf.data import DemonstrationDataModule, PreferenceDataModule, PromptDataModule
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.generation import Generations
from lightning_rlhf.modules import GRPO, PPO, RLOO, SFT, OnlineDPO, RewardModel
from lightning_rlhf.rewards import RewardFunction


class CharacterCount(RewardFunction):
    """A completion scores its number of characters: different lengths, different scores."""

    def __call__(self, prompts, completions, rows=None):
        return torch.tensor([float(len(c)) for c in completions])


class RandomRollouts(StandInSource):
    """A rollout source whose completions are seeded random tokens of random lengths, a third ending with eos."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def next_rollouts(self, rows, prompt_ids, sampling, version):
        generator = torch.Generator().manual_seed(0)
        completions, reasons = [], []
        for j in range(len(prompt_ids) * sampling.k):
            length = int(torch.randint(1, sampling.max_new_tokens + 1, (1,), generator=generator))
            tokens = torch.randint(10, 20, (length,), generator=generator).tolist()
            stops = j % 3 == 0 and length < sampling.max_new_tokens
            completions.append(tokens + [self.tokenizer.eos_token_id] if stops else tokens)
            reasons.append("stop" if stops else "length")
        logprobs = [[-2.0] * len(c) for c in completions]
        return rows, Generations(prompt_ids, completions, logprobs, reasons, version, sampling.k)


RL_CASES = {  # rollouts per mini-batch: 4 prompts x k, in one mini-batch; two epochs so the second clips
    "online_dpo": lambda **kw: OnlineDPO(beta=0.5, k=3, num_epochs=2, **kw),
    "rloo": lambda **kw: RLOO(k=2, num_epochs=2, clip_eps=0.01, **kw),
    "ppo": lambda **kw: PPO(k=2, num_epochs=2, clip_eps=0.01, value_clip_eps=0.01, **kw),
    # GRPO in each aggregation: a micro-batch weighted by its share of responses, or of tokens for token_mean
    "grpo": lambda **kw: GRPO(k=2, num_epochs=2, clip_eps=0.01, kl_coef=0.1, **kw),
    "grpo_token_mean": lambda **kw: GRPO(k=2, num_epochs=2, clip_eps=0.01, loss_aggregation="token_mean", **kw),
    "grpo_dr": lambda **kw: GRPO(
        k=2, num_epochs=2, clip_eps=0.01, loss_aggregation="sequence_sum_constant", scale_rewards=False, **kw
    ),
}
LOGGED = {
    "online_dpo": ["train/loss", "train/accuracy", "train/chosen_rewards", "train/rejected_rewards", "objective/kl"],
    "rloo": ["train/loss", "train/clipfrac", "train/approx_kl", "train/ratio", "objective/kl"],
    "ppo": ["train/loss", "train/policy_loss", "train/value_loss", "train/clipfrac", "train/value_clipfrac"],
    "grpo": ["train/loss", "train/clipfrac", "train/approx_kl", "train/ratio", "train/kl"],
    "grpo_token_mean": ["train/loss", "train/clipfrac", "train/approx_kl", "train/ratio"],
    "grpo_dr": ["train/loss", "train/clipfrac", "train/approx_kl", "train/ratio"],
}


def rl_update(name: str, micro_batch_size, tiny_model_dir, quiet_trainer, **kwargs) -> tuple[dict, dict]:
    """Parameters after one generated batch's updates, and what was logged."""
    L.seed_everything(0)
    extra = {"critic": tiny_model_dir} if name == "ppo" else {}  # a separate critic: its value loss accumulates too
    module = RL_CASES[name](
        policy=tiny_model_dir,
        reward=CharacterCount(),
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
        gradient_clip_val=0.5,  # clipped after accumulating: the whole mini-batch's norm
        max_new_tokens=6,
        micro_batch_size=micro_batch_size,
        **extra,
        **kwargs,
    )
    module.configure_model()
    module.use_rollout_source(RandomRollouts(module.tokenizer))
    trainer = quiet_trainer(module.num_epochs)
    trainer.fit(module, PromptDataModule(batch_size=4, shuffle=False))
    models = {"policy": module.policy, **({"critic": module.critic} if name == "ppo" else {})}
    params = {f"{m}.{n}": p.detach().clone() for m, model in models.items() for n, p in model.named_parameters()}
    return params, {key: trainer.callback_metrics[key].item() for key in LOGGED[name]}


def assert_same_update(before: dict, whole: dict, micro: dict) -> None:
    moved = [name for name in whole if not torch.equal(whole[name], before[name])]
    assert len(moved) > len(whole) // 2  # the update did move the model
    for name in whole:
        torch.testing.assert_close(micro[name] - before[name], whole[name] - before[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", RL_CASES)
def test_rl_update_in_micro_batches_equals_the_single_pass(name, tiny_model_dir, quiet_trainer):
    sequences = 2 if name == "online_dpo" else 1  # online DPO keeps a pair in one pass
    untrained = initial_parameters(name, tiny_model_dir)
    whole, logged = rl_update(name, None, tiny_model_dir, quiet_trainer)
    for size in (sequences, 2 * sequences):
        micro, micro_logged = rl_update(name, size, tiny_model_dir, quiet_trainer)
        assert_same_update(untrained, whole, micro)
        assert micro_logged == pytest.approx(logged, rel=1e-4, abs=1e-6)
    if name != "online_dpo":  # the clip statistics are exercised, not all zero
        assert logged["train/clipfrac"] > 0


def initial_parameters(name: str, tiny_model_dir) -> dict:
    L.seed_everything(0)
    extra = {"critic": tiny_model_dir} if name == "ppo" else {}
    module = RL_CASES[name](policy=tiny_model_dir, reward=CharacterCount(), max_new_tokens=6, **extra)
    module.configure_model()
    return named_parameters(module)


def named_parameters(module) -> dict:
    models = {"policy": module.policy, **({"critic": module.critic} if getattr(module, "critic", None) else {})}
    return {f"{m}.{n}": p.detach().clone() for m, model in models.items() for n, p in model.named_parameters()}


def sft_update(micro_batch_size, tiny_model_dir, quiet_trainer) -> tuple[dict, float]:
    L.seed_everything(0)
    module = SFT(
        policy=tiny_model_dir, optimizer=lambda p: torch.optim.SGD(p, lr=1.0), micro_batch_size=micro_batch_size
    )
    trainer = quiet_trainer(1)
    trainer.fit(module, DemonstrationDataModule(batch_size=6, shuffle=False))
    return named_parameters(module), trainer.callback_metrics["train/loss"].item()


def test_sft_update_in_micro_batches_equals_the_single_pass(tiny_model_dir, quiet_trainer):
    """The loss averages over the batch's completion tokens, whose number differs from row to row."""
    untrained = SFT(policy=tiny_model_dir)
    untrained.configure_model()
    whole, loss = sft_update(None, tiny_model_dir, quiet_trainer)
    for size in (1, 4):  # 4: micro-batches of 4 and 2 rows
        micro, micro_loss = sft_update(size, tiny_model_dir, quiet_trainer)
        assert_same_update(named_parameters(untrained), whole, micro)
        assert micro_loss == pytest.approx(loss, rel=1e-5)


def reward_model_update(micro_batch_size, tiny_model_dir, quiet_trainer) -> tuple[dict, dict]:
    L.seed_everything(0)
    module = RewardModel(
        model=tiny_model_dir, optimizer=lambda p: torch.optim.SGD(p, lr=1.0), micro_batch_size=micro_batch_size
    )
    trainer = quiet_trainer(1)
    trainer.fit(module, PreferenceDataModule(batch_size=4, shuffle=False))
    params = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    return params, {k: trainer.callback_metrics[f"train/{k}"].item() for k in ("loss", "accuracy", "margin")}


def test_reward_model_update_in_micro_batches_equals_the_single_pass(tiny_model_dir, quiet_trainer):
    L.seed_everything(0)
    untrained = RewardModel(model=tiny_model_dir)
    untrained.configure_model()
    before = {n: p.detach().clone() for n, p in untrained.model.named_parameters()}
    whole, logged = reward_model_update(None, tiny_model_dir, quiet_trainer)
    for size in (2, 4):  # a pair, two pairs
        micro, micro_logged = reward_model_update(size, tiny_model_dir, quiet_trainer)
        assert_same_update(before, whole, micro)
        assert micro_logged == pytest.approx(logged, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: OnlineDPO(micro_batch_size=3),
        lambda: RLOO(micro_batch_size=0),
        lambda: RewardModel(micro_batch_size=1),
        lambda: SFT(micro_batch_size=0),
    ],
)
def test_a_micro_batch_size_that_cannot_split_is_refused_in_one_sentence(make):
    with pytest.raises(ConfigError, match="micro_batch_size"):
        make()


@pytest.mark.parametrize("name", ["rloo", "ppo"])
def test_gradient_checkpointing_gives_the_same_update(name, tiny_model_dir, quiet_trainer):
    """Activations recomputed in the backward (policy and PPO's critic), micro-batches too: the same parameters."""
    whole, logged = rl_update(name, None, tiny_model_dir, quiet_trainer)
    checkpointed, checkpointed_logged = rl_update(name, 2, tiny_model_dir, quiet_trainer, gradient_checkpointing=True)
    untrained = initial_parameters(name, tiny_model_dir)
    assert_same_update(untrained, whole, checkpointed)
    assert checkpointed_logged == pytest.approx(logged, rel=1e-4, abs=1e-6)


def test_gradient_checkpointing_is_on_where_asked(tiny_model_dir):
    module = PPO(policy=tiny_model_dir, critic=tiny_model_dir, gradient_checkpointing=True)
    module.configure_model()
    assert module.policy.is_gradient_checkpointing and module.critic.is_gradient_checkpointing
    assert not module.ref_policy.is_gradient_checkpointing  # frozen: no backward to save memory for
    sft = SFT(policy=tiny_model_dir, gradient_checkpointing=True)
    sft.configure_model()
    assert sft.policy.is_gradient_checkpointing
