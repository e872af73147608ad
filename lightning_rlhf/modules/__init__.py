"""LightningModules, one algorithm per file."""

import warnings

# Lightning 2.6 builds torch's deprecated LeafSpec in its own lightning/pytorch/utilities/_pytree.py, which
# warns on every fit with torch 2.13; nothing a user can act on. Only that message, from that module, is ignored.
warnings.filterwarnings(
    "ignore",
    message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    module=r"lightning\.pytorch\.utilities\._pytree",
)
# ruff: noqa: E402 (the filter must be in place before the modules below import Lightning)

from lightning_rlhf.modules.base import RLModuleBase
from lightning_rlhf.modules.grpo import GRPO
from lightning_rlhf.modules.online_dpo import OnlineDPO
from lightning_rlhf.modules.ppo import PPO
from lightning_rlhf.modules.reward_model import RewardModel
from lightning_rlhf.modules.rloo import RLOO
from lightning_rlhf.modules.sft import SFT

__all__ = ["GRPO", "OnlineDPO", "PPO", "RLModuleBase", "RLOO", "RewardModel", "SFT"]
