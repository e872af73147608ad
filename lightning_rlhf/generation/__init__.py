"""Generation backends behind one interface, and the rollout tensors built from their output."""

from lightning_rlhf.generation.base import GenerationBackend, Generations, SamplingConfig, truncate_at_stop
from lightning_rlhf.generation.transformers_backend import TransformersBackend

__all__ = ["GenerationBackend", "Generations", "SamplingConfig", "TransformersBackend", "truncate_at_stop"]
