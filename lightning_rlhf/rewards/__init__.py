"""Rewards: learned reward models, rule rewards, and the missing-EOS penalty."""

from lightning_rlhf.rewards.base import RewardFunction
from lightning_rlhf.rewards.model import RewardModelScore
from lightning_rlhf.rewards.rules import GSM8kExactMatch, apply_missing_eos_penalty, extract_gsm8k_answer

__all__ = ["RewardFunction", "RewardModelScore", "GSM8kExactMatch", "apply_missing_eos_penalty", "extract_gsm8k_answer"]
