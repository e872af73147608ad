"""The off-policy correction and the linear learning-rate decay, through the modules' real training steps.

The correction is checked by what it does to an update: with SGD (no clipping, one
update per batch) a weight ``w`` on every sequence's (or token's) loss scales the
policy's parameter change by exactly ``w``. The behaviour logprobs are made older than
the policy by a known amount, so the weight is known by hand.
"""

import csv
import math
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.generation.in_process import InProcessSource
from lightning_rlhf.modules import GRPO, PPO, RLOO, OnlineDPO


class OlderBehaviour(InProcessSource):
    """Samples on-policy, then reports behaviour logprobs lowered so that pi_old / pi_behaviour is known.

    ``per_token``: every token's ratio is ``ratio``; otherwise each sequence's product of ratios is.
    """

    def __init__(self, backend, ratio: float, per_token: bool) -> None:
        super().__init__(backend)
        self.ratio, self.per_token = ratio, per_token

    def next_rollouts(self, rows, prompt_ids, sampling, version):
        rows, generations = super().next_rollouts(rows, prompt_ids, sampling, version)
        shifted = []
        for logprobs in generations.behavior_logprobs:
            shift = math.log(self.ratio) / (1 if self.per_token else len(logprobs))
            shifted.append([lp - shift for lp in logprobs])
        generations.behavior_logprobs = shifted
        return rows, generations


def _metrics(log_dir: str) -> list[dict]:
    with open(os.path.join(log_dir, "metrics.csv")) as f:
        return [row for row in csv.DictReader(f)]


def _one_update(cls, kwargs, builtin_models, tmp_path, ratio=None, per_token=False, cap=None):
    """The policy's parameter change after one SGD update, and the logged metrics."""
    L.seed_everything(0)
    module = cls(
        policy=builtin_models["sft"],
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        gradient_clip_val=None,
        temperature=0.7,
        max_new_tokens=10,
        importance_sampling_cap=cap,
        **kwargs,
    )
    module.configure_model()
    if ratio is not None:
        backend = module.rollout_source.backend
        module._source = None
        module.use_rollout_source(OlderBehaviour(backend, ratio, per_token))
    before = [p.detach().clone() for p in module.policy.parameters()]
    metrics = _fit(module, tmp_path, 1, f"{cls.__name__}_{ratio}_{cap}")
    delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(module.policy.parameters(), before)])
    return delta, metrics[0]


CASES = {
    "rloo": (RLOO, dict(k=4), False),  # sequence-level weights
    "grpo": (GRPO, dict(k=4, kl_coef=0.0), True),  # token-level weights; the KL term is not weighted, so off
    "ppo": (PPO, dict(k=2, num_epochs=1), True),  # token-level weights; a separate critic, so the policy's
    # gradient is the policy loss's alone
}


@pytest.mark.parametrize("name", CASES)
def test_correction_scales_the_update_by_the_truncated_ratio(name, builtin_models, tmp_path):
    cls, kwargs, per_token = CASES[name]
    plain, metrics = _one_update(cls, kwargs, builtin_models, tmp_path)
    assert "offpolicy/is_ratio_mean" not in metrics  # off by default: nothing computed, nothing logged
    assert plain.abs().max() > 0

    # behaviour twice less likely than pi_old: weight 2, under the cap of 3
    weighted, metrics = _one_update(cls, kwargs, builtin_models, tmp_path, ratio=2.0, per_token=per_token, cap=3.0)
    torch.testing.assert_close(weighted, 2.0 * plain, rtol=1e-3, atol=1e-6)
    assert float(metrics["offpolicy/is_ratio_mean"]) == pytest.approx(2.0, rel=1e-3)
    assert float(metrics["offpolicy/is_clipfrac"]) == 0.0

    # the same ratio truncated at 1.5
    truncated, metrics = _one_update(cls, kwargs, builtin_models, tmp_path, ratio=2.0, per_token=per_token, cap=1.5)
    torch.testing.assert_close(truncated, 1.5 * plain, rtol=1e-3, atol=1e-6)
    assert float(metrics["offpolicy/is_clipfrac"]) == 1.0

    # on-policy rollouts (the generator's logprobs are the trainer's): weight 1, the update unchanged
    on_policy, metrics = _one_update(cls, kwargs, builtin_models, tmp_path, cap=2.0)
    torch.testing.assert_close(on_policy, plain, rtol=1e-3, atol=1e-6)
    assert float(metrics["offpolicy/is_ratio_mean"]) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("cls", [RLOO, PPO, GRPO])
def test_non_positive_cap_is_refused(cls):
    with pytest.raises(ConfigError, match="importance_sampling_cap must be positive"):
        cls(policy="builtin:sft", importance_sampling_cap=0.0)


class _StopAfter(L.Callback):
    """Ends the run after ``steps`` optimizer steps, as an interruption would (the run's length stays max_steps)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, *args) -> None:
        trainer.should_stop = trainer.should_stop or trainer.global_step >= self.steps


def _fit(module, tmp_path, max_steps, name, ckpt_path=None, checkpoint=None, stop_after=None):
    logger = CSVLogger(tmp_path, name=name)
    callbacks = ([checkpoint] if checkpoint else []) + ([_StopAfter(stop_after)] if stop_after else [])
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=logger,
        log_every_n_steps=1,
        callbacks=callbacks,
        enable_checkpointing=checkpoint is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, PromptDataModule(batch_size=8, seed=0), ckpt_path=ckpt_path)
    return _metrics(logger.log_dir)


def _rates(metrics: list[dict]) -> list[float]:
    return [float(row["train/lr"]) for row in metrics if row.get("train/lr")]


def _decaying(builtin_models, **kwargs):
    return OnlineDPO(
        policy=builtin_models["sft"],
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        max_new_tokens=6,
        lr_schedule="linear",
        **kwargs,
    )


def test_linear_decay_and_its_exact_resume(builtin_models, tmp_path):
    L.seed_everything(0)
    module = _decaying(builtin_models)
    rates = _rates(_fit(module, tmp_path, 4, "full"))
    # four optimizer steps: lr * (1 - i / 4)
    assert rates == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.0)

    # two updates per batch (num_epochs 2): max_steps counts optimizer steps, eight over four batches
    L.seed_everything(0)
    rates = _rates(_fit(_decaying(builtin_models, num_epochs=2), tmp_path, 8, "epochs"))
    assert rates == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])  # each batch's first update
    # stopped after 2 of 4 steps and resumed: the schedule continues where it was
    L.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    _fit(_decaying(builtin_models), tmp_path, 4, "first_half", checkpoint=checkpoint, stop_after=2)
    rates = _rates(
        _fit(_decaying(builtin_models), tmp_path, 4, "resumed", ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    )
    assert rates == pytest.approx([0.5e-3, 0.25e-3])
    # a run of 2 steps continued to 6: the rate follows the new length from the first resumed step (1 - 2 / 6)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt2", save_last=True, every_n_train_steps=1)
    _fit(_decaying(builtin_models), tmp_path, 2, "short", checkpoint=checkpoint)
    rates = _rates(
        _fit(_decaying(builtin_models), tmp_path, 6, "longer", ckpt_path=str(tmp_path / "ckpt2" / "last.ckpt"))
    )
    assert rates == pytest.approx([1e-3 * (1 - i / 6) for i in range(2, 6)])


def test_linear_decay_needs_a_length_and_a_known_name(builtin_models, tmp_path):
    with pytest.raises(ConfigError, match="lr_schedule must be one of"):
        OnlineDPO(policy="builtin:sft", lr_schedule="cosine")
    module = _decaying(builtin_models)
    with pytest.raises(ConfigError, match="set trainer.max_steps or max_epochs"):
        L.Trainer(max_epochs=-1, accelerator="cpu", logger=False, enable_progress_bar=False).fit(
            module, PromptDataModule(batch_size=8)
        )
