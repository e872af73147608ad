"""Asynchronous-generation strategies (registered as ``async_rlhf``, ``async_rlhf_ddp`` and ``async_rlhf_deepspeed``).

Each takes one :class:`GenerationConfig` (``generation:`` in a recipe) with every generation option.
"""

from lightning_rlhf.strategies.async_rlhf import AsyncRLHFDDPStrategy, AsyncRLHFDeepSpeedStrategy, AsyncRLHFStrategy
from lightning_rlhf.strategies.config import GenerationConfig

__all__ = ["AsyncRLHFStrategy", "AsyncRLHFDDPStrategy", "AsyncRLHFDeepSpeedStrategy", "GenerationConfig"]
