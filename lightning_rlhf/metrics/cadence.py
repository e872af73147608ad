"""When Lightning's loggers write: for code that may skip ``self.log`` on the steps they do not."""

from __future__ import annotations

import lightning as L


def logger_writes_now(trainer: L.Trainer) -> bool:
    """Whether Lightning's loggers write the values logged in this training step.

    They write every ``Trainer(log_every_n_steps)`` batches and when training is
    told to stop; values logged on other steps reach ``trainer.callback_metrics``
    and the progress bar only. Lightning makes this decision in
    ``_LoggerConnector.should_update_logs``
    (``lightning/pytorch/trainer/connectors/logger_connector/logger_connector.py``),
    which no public API exposes; it is read from there, and should a later
    Lightning move it, every step counts as a writing step (nothing is lost, the
    saving is).
    """
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))
