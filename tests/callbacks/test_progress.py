"""StepProgressBar: what it reads for a run bounded by max_steps whose batches are not its steps."""

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_rlhf.callbacks import StepProgressBar


class SkipsFirstBatch(L.LightningModule):
    """Manual optimization that, like an asynchronous RL module, makes no update on its first batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.filled = False

    def training_step(self, batch, batch_idx):
        if not self.filled:
            self.filled = True
            return None  # the pipeline is filling up
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward((self.weight - batch.sum()) ** 2)
        optimizer.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Recording(StepProgressBar):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        task = self.progress.tasks[self.train_progress_bar_id]
        self.seen.append((task.completed, task.total, task.description.strip()))


def fit(bar, **limits):
    trainer = L.Trainer(
        accelerator="cpu",
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **limits,
    )
    trainer.fit(SkipsFirstBatch(), DataLoader(torch.ones(4, 1), batch_size=1))  # 4 batches an epoch
    return bar.seen


def test_counts_optimizer_steps_to_max_steps_across_epochs():
    # 6 steps take 7 batches (the first makes none), over two epochs of 4 batches. Lightning 2.6's bar
    # totals min(4, 6 - steps so far) and counts batches: 1/4 .. 4/4 as "Epoch 0/-2", then 1/3 .. 3/3
    seen = fit(Recording(), max_steps=6)
    assert [completed for completed, _, _ in seen] == [0, 1, 2, 3, 4, 5, 6]
    assert {total for _, total, _ in seen} == {6}
    assert [description for _, _, description in seen] == ["Epoch 0"] * 4 + ["Epoch 1"] * 3


def test_a_run_bounded_by_epochs_gets_lightnings_bar():
    seen = fit(Recording(), max_epochs=1)
    assert seen == [(1, 4, "Epoch 0/0"), (2, 4, "Epoch 0/0"), (3, 4, "Epoch 0/0"), (4, 4, "Epoch 0/0")]
