"""Lightning callbacks of lightning-rlhf (installed as ``lightning_rlhf.callbacks``)."""

from lightning_rlhf.callbacks.evaluation import GoldEvaluation

__all__ = ["GoldEvaluation"]
