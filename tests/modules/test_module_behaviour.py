"""What each RL module does with given rollouts, and the bad input it refuses before training.

The rollouts come from a stand-in source with fixed completions, so the scores
and losses below are derived by hand; the module, rewards and losses are real.
"""

import csv
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from stand_in_source import StandInSource

from lightning_rlhf.callbacks import GoldEvaluation, OffPolicySimulation, WeightSync
from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.generation import Generations
from lightning_rlhf.generation.source import Refresh
from lightning_rlhf.modules import GRPO, PPO, RLOO, OnlineDPO
from lightning_rlhf.rewards import RewardFunction, RewardModelScore
from lightning_rlhf.scoring import score_rollouts
from lightning_rlhf.tasks.copy import CopyGoldReward


class Constant(RewardFunction):
    """Every completion scores ``value``."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self, prompts, completions, rows=None):
        return torch.full((len(completions),), self.value)


class FixedRollouts(StandInSource):
    """A rollout source whose completions are always the same tokens; ``reasons`` says which ended with eos."""

    def __init__(self, tokenizer, reasons: list[str]) -> None:
        self.tokenizer, self.reasons = tokenizer, reasons
        self.refreshes, self.resubmitted = [], []

    def next_rollouts(self, rows, prompt_ids, sampling, version):
        word = self.tokenizer.convert_tokens_to_ids("1")
        completions = [
            [word, word, self.tokenizer.eos_token_id] if r == "stop" else [word] * sampling.max_new_tokens
            for r in self.reasons
        ]
        logprobs = [[-1.0] * len(c) for c in completions]
        return rows, Generations(prompt_ids, completions, logprobs, list(self.reasons), version, sampling.k)

    def resubmit(self, batches, prompt_ids, sampling, version):
        self.resubmitted.append((batches, version))

    def set_probe(self, probe):
        pass

    def probe_logprobs(self, version):
        return None


def fit_one_step(module, reasons: list[str], batch_size: int = 2) -> dict[str, float]:
    """Train ``module`` for one generated batch of the fixed rollouts; return what it logged."""
    module.configure_model()
    module.use_rollout_source(FixedRollouts(module.tokenizer, reasons))
    trainer = L.Trainer(
        max_steps=module.num_epochs * module.num_mini_batches,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, PromptDataModule(batch_size=batch_size, shuffle=False))
    return {key: value.item() for key, value in trainer.callback_metrics.items()}


MODULES = {
    "online_dpo": lambda **kw: OnlineDPO(beta=0.5, **kw),
    "rloo": lambda **kw: RLOO(**kw),
    "grpo": lambda **kw: GRPO(**kw),
    "ppo": lambda **kw: PPO(critic=None, **kw),
}


def test_score_rollouts_replaces_the_score_of_a_completion_without_eos():
    from lightning_rlhf.tasks.copy import make_tokenizer

    tokenizer = make_tokenizer()
    generations = FixedRollouts(tokenizer, ["stop", "length", "stop", "length"]).next_rollouts(
        [{"prompt": "a"}, {"prompt": "b"}], [[5], [6]], SimpleNamespace(k=2, max_new_tokens=4), 0
    )[1]
    scores, raw, _ = score_rollouts(
        Constant(2.0), tokenizer, generations, [{"prompt": "a"}, {"prompt": "b"}], missing_eos_penalty=-1.0
    )
    assert scores.tolist() == [2.0, -1.0, 2.0, -1.0] and raw.tolist() == [2.0] * 4
    unpenalized, _, _ = score_rollouts(
        Constant(2.0), tokenizer, generations, [{"prompt": "a"}, {"prompt": "b"}], missing_eos_penalty=None
    )
    assert unpenalized.tolist() == [2.0] * 4


def test_training_keeps_the_models_out_of_the_cyclic_collector_and_gives_them_back(builtin_models):
    import gc

    frozen = []
    module = OnlineDPO(reward=Constant(1.0), k=2, max_new_tokens=4)
    step = module.training_step
    module.training_step = lambda *args: (frozen.append(gc.get_freeze_count()), step(*args))[1]
    fit_one_step(module, ["stop"] * 4)
    assert len(frozen) == 1 and frozen[0] > 1000  # the policy, the reference, the tokenizer... frozen while training
    assert gc.get_freeze_count() == 0  # and the collector's again afterwards


class RefreshingRollouts(FixedRollouts):
    """:class:`FixedRollouts` that records a periodic weight refresh after every update,
    as a generator's source does."""

    def after_update(self, version):
        self.refreshes.append(Refresh(version, 0.001, "period"))


@pytest.mark.parametrize("every_step", [True, False])
def test_metrics_handed_over_only_when_the_logger_writes_give_the_logger_the_same_rows(
    every_step, tmp_path, builtin_models
):
    # Lightning writes every log_every_n_steps=2 batches (steps 1 and 3 of 0..4); the linear schedule makes
    # train/lr differ from step to step, so a stale value handed over at an earlier step would show
    calls = []

    class Counting(OnlineDPO):
        def log_dict(self, *args, **kwargs):
            calls.append((self.policy_version, next(iter(args[0])).split("/")[0]))  # the module's or WeightSync's
            super().log_dict(*args, **kwargs)

    module = Counting(
        beta=0.5, reward=Constant(0.0), k=2, max_new_tokens=4, lr_schedule="linear", log_every_step=every_step
    )
    module.configure_model()
    module.use_rollout_source(RefreshingRollouts(module.tokenizer, ["stop"] * 4))
    sync = WeightSync(probe_every=0, log_every_step=every_step)
    trainer = L.Trainer(
        max_steps=5,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        log_every_n_steps=2,
        callbacks=[sync],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, PromptDataModule(batch_size=2, shuffle=False))
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    lr = 1e-3  # torch.optim.AdamW's default rate
    assert [int(r["step"]) for r in rows] == [1, 3]
    assert [float(r["train/lr"]) for r in rows] == pytest.approx([lr * (1 - 1 / 5), lr * (1 - 3 / 5)])
    assert [float(r["sync/version"]) for r in rows] == [2.0, 4.0]
    handed_over = [1, 2, 3, 4, 5] if every_step else [2, 4]  # the policy version after each step that logged
    assert calls == [(version, who) for version in handed_over for who in ("train", "sync")]


class Recording(Constant):
    """A :class:`Constant` that keeps the prompts it was asked to score."""

    def __init__(self, value: float) -> None:
        super().__init__(value)
        self.asked: list[str] = []

    def __call__(self, prompts, completions, rows=None):
        self.asked += prompts
        return super().__call__(prompts, completions, rows)


def test_the_trainer_scores_only_what_the_generator_left_unscored():
    from lightning_rlhf.scoring import RewardScorer
    from lightning_rlhf.tasks.copy import make_tokenizer

    tokenizer = make_tokenizer()
    rows = [{"prompt": p} for p in "abcd"]
    generations = FixedRollouts(tokenizer, ["stop"] * 8).next_rollouts(
        rows, [[5], [6], [7], [8]], SimpleNamespace(k=2, max_new_tokens=4), 0
    )[1]
    on_generator = RewardScorer(Recording(5.0), "builtin:sft", fraction=0.5)
    on_generator.tokenizer = tokenizer  # what setup() loads in the generator process
    generations.scores = on_generator(rows, generations)  # the first half of the prompts, each with its k samples
    assert generations.scores == [5.0] * 4 + [None] * 4 and on_generator.reward.asked == ["a", "a", "b", "b"]
    on_trainer = Recording(2.0)
    scores, raw, _ = score_rollouts(on_trainer, tokenizer, generations, rows, missing_eos_penalty=-1.0)
    assert raw.tolist() == [5.0] * 4 + [2.0] * 4 and on_trainer.asked == ["c", "c", "d", "d"]


@pytest.mark.parametrize("name", MODULES)
def test_each_module_gives_a_completion_without_eos_the_penalty(name, builtin_models):
    # 2 prompts x k=2; one of the four completions hits max_new_tokens without eos: scores 2, -1, 2, 2
    logged = fit_one_step(
        MODULES[name](reward=Constant(2.0), k=2, missing_eos_penalty=-1.0, max_new_tokens=4),
        ["stop", "length", "stop", "stop"],
    )
    assert logged["objective/scores"] == pytest.approx((2.0 - 1.0 + 2.0 + 2.0) / 4)
    assert logged["rollout/eos_rate"] == pytest.approx(0.75)
    unpenalized = fit_one_step(
        MODULES[name](reward=Constant(2.0), k=2, missing_eos_penalty=None, max_new_tokens=4),
        ["stop", "length", "stop", "stop"],
    )
    assert unpenalized["objective/scores"] == pytest.approx(2.0)


@pytest.mark.parametrize("loss_type, expected", [("sigmoid", math.log(2.0)), ("ipo", 1.0)])
def test_online_dpo_module_trains_the_loss_it_was_given(loss_type, expected, builtin_models):
    # at the first step the policy is the reference, so every log-ratio h is 0:
    # DPO's loss is -log sigmoid(0) = log 2, IPO's is (0 - 1 / (2 beta))^2 = 1 with beta 0.5
    logged = fit_one_step(
        OnlineDPO(beta=0.5, loss_type=loss_type, reward=Constant(0.0), k=2, max_new_tokens=4), ["stop"] * 4
    )
    assert logged["train/loss"] == pytest.approx(expected, abs=1e-5)


def test_off_policy_simulation_trains_on_data_zero_to_n_minus_one_versions_old(builtin_models):
    module = OnlineDPO(beta=0.5, reward=RewardModelScore(builtin_models["reward_model"]), k=2, max_new_tokens=10)
    staleness = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            staleness.append(trainer.callback_metrics["rollout/staleness"].item())

    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        callbacks=[OffPolicySimulation(num_batches=3), Record()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, PromptDataModule(batch_size=4))
    assert staleness == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0]  # each round of 3 batches sampled by one snapshot


def test_off_policy_simulation_refuses_a_source_that_samples_in_another_process(quiet_trainer):
    """OffPolicySimulation asks the source (the contract's samples_in_process), not its class."""
    from lightning_rlhf.generation.pipeline import PipelinedSource

    module = OnlineDPO(beta=0.5, k=2, max_new_tokens=4)
    module.trainer = quiet_trainer()
    module.configure_model()
    simulation = OffPolicySimulation(num_batches=2)
    simulation.on_fit_start(module.trainer, module)  # its own in-process source: replaced by a snapshot
    assert module.rollout_source is not None and module.rollout_source.samples_in_process
    module.use_rollout_source(PipelinedSource(SimpleNamespace(close=lambda: None), 1, 1, weights=lambda: None))
    with pytest.raises(ConfigError, match="simulates staleness in one process"):
        simulation.on_fit_start(module.trainer, module)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: OnlineDPO(beta=0.0), "beta must be positive"),
        (lambda: OnlineDPO(beta=-0.1), "beta must be positive"),
        (lambda: OnlineDPO(loss_type="hinge"), "Unknown loss_type 'hinge'"),
        (lambda: OnlineDPO(temperature=0.0), "temperature must be positive"),
        (lambda: RLOO(temperature=-1.0), "temperature must be positive"),
        (lambda: PPO(temperature=0.0), "temperature must be positive"),
        (lambda: RLOO(max_new_tokens=0), "max_new_tokens must be at least 1"),
        (lambda: PromptDataModule(batch_size=0), "batch_size must be at least 1"),
        (lambda: RewardModelScore("/nonexistent/reward_model"), "does not exist"),
        (lambda: PPO(critic="/nonexistent/critic"), "does not exist"),
        (lambda: OnlineDPO(ref_policy="/nonexistent/reference"), "does not exist"),
        (lambda: RLOO(ref_policy="/nonexistent/reference"), "does not exist"),
    ],
)
def test_bad_arguments_are_refused_with_one_sentence(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_vllm_asked_for_but_not_installed_is_refused(monkeypatch):
    import sys

    from lightning_rlhf.strategies import AsyncRLHFStrategy, GenerationConfig

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError, as when it is not installed
    with pytest.raises(ConfigError, match=r"The vLLM backend needs vLLM: pip install"):
        AsyncRLHFStrategy(generation=GenerationConfig(backend="vllm"))


@pytest.mark.parametrize(
    "name, batch_size, num_mini_batches, message",
    [
        ("online_dpo", 4, 3, "does not split a generated batch of 4 prompts evenly; pick one of 1, 2, 4"),
        ("rloo", 2, 3, "2 prompts x k=2 completions = 4 rollouts"),
    ],
)
def test_num_mini_batches_that_does_not_divide_the_batch_is_refused_before_training(
    name, batch_size, num_mini_batches, message, builtin_models, quiet_trainer
):
    module = MODULES[name](reward=Constant(0.0), k=2, num_mini_batches=num_mini_batches)
    trainer = quiet_trainer(1)
    with pytest.raises(ConfigError, match=message):
        trainer.fit(module, PromptDataModule(batch_size=batch_size))
    assert module.policy_version == 0  # nothing was trained


def test_resume_on_another_number_of_ranks_is_refused():
    module = OnlineDPO()
    module._trainer = SimpleNamespace(global_rank=0, world_size=1)
    checkpoint = {
        "rollouts": {
            "policy_version": 3,
            "batches_drawn": 4,
            "pending_per_rank": [[[{"prompt": "a"}]], [[{"prompt": "b"}]]],
        }
    }
    with pytest.raises(
        ConfigError, match=r"saved by 2 rank\(s\) with prompts in flight and is resumed on 1; resume on 2 rank"
    ):
        module.on_load_checkpoint(checkpoint)
    module._trainer = SimpleNamespace(global_rank=1, world_size=2)  # the same layout: each rank takes back its own
    module.on_load_checkpoint(checkpoint)
    module.use_rollout_source(source := FixedRollouts(None, []))
    module.on_batch_drawn()  # the first batch after the resume asks again for this rank's prompts in flight
    assert source.resubmitted == [([[{"prompt": "b"}]], 3)] and module.batches_drawn == 5


def test_gold_evaluation_counts_a_tie_as_half_a_win_and_keeps_its_history(tmp_path, capsys):
    from lightning_rlhf.metrics import GoldWinRate

    metric = GoldWinRate()
    metric.update(torch.tensor([2.0, 1.0, 0.5, 3.0]), torch.tensor([1.0, 1.0, 0.7, 3.0]))  # win, tie, loss, tie
    assert metric.compute().item() == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)

    saved = GoldEvaluation(CopyGoldReward(), num_prompts=2)
    saved.history = [
        {"eval/gold_win_rate": 0.4, "eval/kl": 0.0, "step": 0},
        {"eval/gold_win_rate": 0.5, "eval/kl": 0.3, "step": 10},
    ]
    resumed = GoldEvaluation(CopyGoldReward(), num_prompts=2)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.history == saved.history and resumed.history is not saved.history
    resumed.history.append({"eval/gold_win_rate": 0.6, "eval/kl": 0.5, "step": 20})
    resumed._report(SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path)))
    # the summary after a resume starts from the run's first evaluation, not the resume's
    assert "gold win rate: 0.400 (step 0) -> 0.600 (step 20)" in capsys.readouterr().out
