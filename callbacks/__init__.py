"""Lightning callbacks of lightning-rlhf (installed as ``lightning_rlhf.callbacks``)."""

from lightning_rlhf.callbacks.evaluation import GoldEvaluation
from lightning_rlhf.callbacks.off_policy import OffPolicySimulation
from lightning_rlhf.callbacks.weight_sync import WeightSync

__all__ = ["GoldEvaluation", "OffPolicySimulation", "WeightSync"]
