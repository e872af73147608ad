"""LightningModules, one algorithm per file."""

from lightning_rlhf.modules.online_dpo import OnlineDPO
from lightning_rlhf.modules.ppo import PPO
from lightning_rlhf.modules.reward_model import RewardModel
from lightning_rlhf.modules.rloo import RLOO
from lightning_rlhf.modules.sft import SFT

__all__ = ["OnlineDPO", "PPO", "RLOO", "RewardModel", "SFT"]
