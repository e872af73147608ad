import csv
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_rlhf.data import DemonstrationDataModule, PreferenceDataModule
from lightning_rlhf.modules import SFT, RewardModel


def _metric(logger, key):
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


def _trainer(steps, logger):
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.mark.slow
def test_sft_lowers_the_completion_loss_and_saves(tiny_model_dir, tmp_path):
    L.seed_everything(0)
    module = SFT(policy=tiny_model_dir, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    logger = CSVLogger(tmp_path, name="sft")
    _trainer(60, logger).fit(module, DemonstrationDataModule(batch_size=32))
    losses = _metric(logger, "train/loss")
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    module.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").exists() and (tmp_path / "out" / "tokenizer.json").exists()


def test_sft_masks_the_prompt_out_of_the_labels(tiny_model_dir):
    module = SFT(policy=tiny_model_dir)
    module.configure_model()
    ids, mask, labels = module.encode(
        [{"prompt": "copy 1 2 =", "completion": "1 2"}, {"prompt": "copy 3 =", "completion": "3"}]
    )
    tok = module.tokenizer
    # row 0: <s> copy 1 2 = | 1 2 </s> -> labels only on the last three tokens
    assert labels[0].tolist() == [-100] * 5 + tok("1 2", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # row 1: <s> copy 3 = | 3 </s> -> 6 real tokens, then padding
    assert mask[1].sum() == 6 and (labels[1][mask[1] == 0] == -100).all()


@pytest.mark.slow
def test_reward_model_learns_the_preferences(builtin_models, tmp_path):
    L.seed_everything(0)
    module = RewardModel(model=builtin_models["sft"], optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    logger = CSVLogger(tmp_path, name="rm")
    _trainer(150, logger).fit(module, PreferenceDataModule(batch_size=64))
    accuracy = _metric(logger, "train/accuracy")
    assert sum(accuracy[-10:]) / 10 > 0.65  # chance is 0.5


def test_linear_schedule_warms_up_then_decays_to_zero():
    from lightning_rlhf.modules.base import linear_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = linear_schedule(optimizer, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(11):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    # by hand: warm-up (i + 1) / 2 for i < 2, then (10 - i) / (10 - 2)
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0])
    no_warmup = linear_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), total_steps=4)
    assert [no_warmup.lr_lambdas[0](i) for i in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]  # 1 - i / total, as before


def test_reward_model_follows_its_linear_schedule(builtin_models, tmp_path):
    L.seed_everything(0)
    module = RewardModel(
        model=builtin_models["sft"],
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        lr_schedule="linear",
        warmup_steps=2,
    )
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = _trainer(4, False)
    trainer.callbacks.append(Record())
    trainer.fit(module, PreferenceDataModule(batch_size=8))
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])  # warm-up 1/2, 2/2, then (4 - i) / 2


def test_reward_model_refuses_an_unknown_schedule():
    from lightning_rlhf.errors import ConfigError

    with pytest.raises(ConfigError, match="lr_schedule must be one of constant, linear, got 'cosine'"):
        RewardModel(lr_schedule="cosine")
    with pytest.raises(ConfigError, match="warmup_steps must be 0 or more"):
        RewardModel(warmup_steps=-1)
