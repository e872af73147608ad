"""Lightning callbacks of lightning-rlhf (installed as ``lightning_rlhf.callbacks``)."""

from lightning_rlhf.callbacks.evaluation import AccuracyEvaluation, GoldEvaluation
from lightning_rlhf.callbacks.judges import GenerativeJudge, Judge, RewardJudge
from lightning_rlhf.callbacks.off_policy import OffPolicySimulation
from lightning_rlhf.callbacks.progress import StepProgressBar
from lightning_rlhf.callbacks.weight_sync import WeightSync

__all__ = [
    "AccuracyEvaluation",
    "GenerativeJudge",
    "GoldEvaluation",
    "Judge",
    "RewardJudge",
    "OffPolicySimulation",
    "StepProgressBar",
    "WeightSync",
]
