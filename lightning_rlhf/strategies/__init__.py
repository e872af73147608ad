"""Asynchronous-generation strategies (registered as ``async_rlhf`` and ``async_rlhf_ddp``)."""

from lightning_rlhf.strategies.async_rlhf import AsyncRLHFDDPStrategy, AsyncRLHFStrategy

__all__ = ["AsyncRLHFStrategy", "AsyncRLHFDDPStrategy"]
