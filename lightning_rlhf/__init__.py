"""lightning-rlhf: asynchronous, off-policy RLHF (online DPO, RLOO, PPO) on PyTorch Lightning."""

__version__ = "0.1.0"
