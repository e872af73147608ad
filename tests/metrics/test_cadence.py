"""logger_writes_now: whether Lightning's loggers write the values logged in this training step."""

from types import SimpleNamespace

from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_rlhf.metrics.cadence import logger_writes_now


class Recording(BoringModel):
    """A BoringModel that asks ``logger_writes_now`` at every training step."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.writes.append(logger_writes_now(self.trainer))
        return super().training_step(batch, batch_idx)


def test_the_loggers_write_every_log_every_n_steps_batches(quiet_trainer):
    # Lightning writes when (batches stepped + 1) % log_every_n_steps == 0: batches 2, 5 and 8 of 0..8
    module = Recording()
    quiet_trainer(9, log_every_n_steps=3).fit(module)
    assert module.writes == [False, False, True, False, False, True, False, False, True]


def test_when_the_decision_cannot_be_read_every_step_counts_as_a_writing_step():
    # a Lightning that moved the decision: nothing may be lost, so write always
    assert logger_writes_now(SimpleNamespace()) is True
    assert logger_writes_now(SimpleNamespace(_logger_connector=SimpleNamespace())) is True
    assert logger_writes_now(SimpleNamespace(_logger_connector=SimpleNamespace(should_update_logs=False))) is False
