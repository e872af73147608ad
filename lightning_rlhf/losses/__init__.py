"""RLHF losses and advantage estimators as pure functions of tensors."""

from .common import masked_mean, masked_sum, masked_whiten, token_logprobs
from .dpo import DPOStats, online_dpo_loss, online_ipo_loss
from .grpo import GRPOStats, group_advantages, grpo_loss
from .kl import kl_k1, kl_k3, kl_penalized_rewards
from .offpolicy import ISStats, truncated_importance_weights
from .ppo import PPOStats, ValueStats, clipped_value_loss, gae, ppo_policy_loss
from .reward import RewardStats, bradley_terry_loss
from .rloo import rloo_advantages

__all__ = [
    "DPOStats",
    "GRPOStats",
    "ISStats",
    "RewardStats",
    "bradley_terry_loss",
    "PPOStats",
    "ValueStats",
    "clipped_value_loss",
    "gae",
    "group_advantages",
    "grpo_loss",
    "kl_k1",
    "kl_k3",
    "kl_penalized_rewards",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "online_dpo_loss",
    "online_ipo_loss",
    "ppo_policy_loss",
    "rloo_advantages",
    "token_logprobs",
    "truncated_importance_weights",
]
