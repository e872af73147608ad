"""Asynchronous-generation strategies (registered as ``async_rlhf``, ``async_rlhf_ddp`` and ``async_rlhf_deepspeed``)."""

from lightning_rlhf.strategies.async_rlhf import AsyncRLHFDDPStrategy, AsyncRLHFDeepSpeedStrategy, AsyncRLHFStrategy

__all__ = ["AsyncRLHFStrategy", "AsyncRLHFDDPStrategy", "AsyncRLHFDeepSpeedStrategy"]
