"""torchmetrics for RLHF evaluation."""

from lightning_rlhf.metrics.win_rate import GoldWinRate

__all__ = ["GoldWinRate"]
